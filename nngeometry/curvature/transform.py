"""The output transform ``g = transform(function(*batch))`` that the generator differentiates,
and the language-model convention it may read the batch by.

Every curvature of this package is ``(1/n) Σ_x J_g(x)ᵀ J_g(x)`` for some ``g`` of the model's
outputs ``f``: ``g = Rᵀ f`` with ``R`` a constant of the backward pass (closed forms, output
Hessians) or ``g`` the log-likelihood of sampled targets (Monte-Carlo), the loss of observed
targets (empirical Fisher). `OutputTransform` holds ``function`` (the model, deterministic) and
the transform separately, optionally with the output-space matrix ``H = R Rᵀ`` applied to a
vector (`OutputTransform.metric`); `BatchInfo` is what a transform that reads the batch gets.

Every transform also takes a language model's convention, `LMConvention` (None for any other
model): which logits predict which label, which positions count, and the default of
``positions`` it implies (`_resolve_positions`); `lm_convention` reads it from the model at the
entry points (`is_causal_lm`). The positions' maths under a convention are in
`language_models`, entered only for outputs with positions.
"""
from ..backend.model_and_data import check_outputs
from .rng import batch_key


class BatchInfo:
    """What a batch-aware transform (``OutputTransform(..., needs_batch=True)``) gets besides the
    outputs: the batch (the tuple ``function(*batch)`` was called with), its index in the
    loader (None when unknown) and ``key``, a 63-bit integer that is a fixed function of the
    seed, the index and the content of the batch (None without a seed)."""

    __slots__ = ("batch", "index", "key")

    def __init__(self, batch, index=None, key=None):
        self.batch, self.index, self.key = batch, index, key


class OutputTransform:
    """``g(*batch) = transform(function(*batch))``: a likelihood's transform of the model's
    outputs. The generator calls the two parts itself, so that it can check that
    ``function`` (the model, deterministic) gives the same outputs twice while ``transform``
    (e.g. Monte-Carlo sampling) may draw random numbers.

    Give either ``transform(f) -> g`` or ``split(f) -> (g, columns)``, where ``columns(k0, k1)``
    recomputes ``g[:, k0:k1]`` from the same draws through a graph of its own (see
    `monte_carlo_function`).

    With ``needs_batch=True`` both take a second argument, a `BatchInfo` (the batch, its
    index, the seed's key): losses of the observed targets (empirical Fisher, GGN) and seeded
    sampling. ``seed``: the seed of `batch_key` (None: no key)."""

    #: how the transform was made (e.g. ``closed_form_function(function, 'classif_logits')``)
    origin = None

    def __init__(self, function, transform=None, split=None, needs_batch=False, seed=None,
                 metric=None):
        if (transform is None) == (split is None):
            raise TypeError("give either transform or split")
        self.function = function
        self._metric = metric
        self._transform = transform
        self._split = split
        self.needs_batch = bool(needs_batch)
        self.seed = seed

    def batch_info(self, batch, index=None):
        """The `BatchInfo` of ``batch`` (call it on real tensors, outside ``torch.func``
        transforms: the seed's key reads the batch's bytes)."""
        key = None if self.seed is None else batch_key(self.seed, batch, index)
        return BatchInfo(batch, index, key)

    def model_outputs(self, *batch):
        """The model's outputs ``function(*batch)``, checked to be a tensor."""
        return check_outputs(self.function(*batch))

    def _args(self, f, info):
        if not self.needs_batch:
            return (f,)
        if info is None:
            raise TypeError("this output transform needs the batch: call it as g(*batch), or "
                            "transform(f, g.batch_info(batch))")
        return (f, info)

    def transform(self, f, info=None):
        """``g`` from the model's outputs ``f``."""
        args = self._args(f, info)
        return self._transform(*args) if self._split is None else self._split(*args)[0]

    def split(self, f, info=None):
        """``(g, columns)`` with ``columns(k0, k1)`` the graph of ``g[:, k0:k1]``, or
        ``(g, None)``."""
        args = self._args(f, info)
        if self._split is None:
            return self._transform(*args), None
        return self._split(*args)

    @property
    def has_metric(self):
        """Whether `metric` is available: ``J_gᵀ J_g = J_fᵀ H J_f`` with ``H u``
        computable from the model's outputs ``f`` without forming ``g`` (the implicit
        products then run JVP, ``H u``, VJP on the model's outputs)."""
        return self._metric is not None

    def metric(self, f, u, info=None):
        """``H u`` (the shape of the model's outputs ``f``): the output-space matrix of the
        transform, ``J_g = R J_f`` with ``Rᵀ R = H``, applied to ``u`` without forming ``R``."""
        if self._metric is None:
            raise TypeError("this output transform has no closed-form output metric")
        return self._metric(f, u, info) if self.needs_batch else self._metric(f, u)

    def __call__(self, *batch):
        info = self.batch_info(batch) if self.needs_batch else None
        return self.transform(self.model_outputs(*batch), info)


# ------------------------------------------------------------ the language-model convention
def is_causal_lm(model):
    """Whether ``model`` is a causal language model whose own loss shifts the labels (logits at
    position ``t`` predict token ``t + 1``): Hugging Face's ``*ForCausalLM`` / ``*LMHeadModel``
    classes, or a model whose ``loss_type`` is ``'ForCausalLM'``."""
    if getattr(model, "loss_type", None) == "ForCausalLM":
        return True
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


class LMConvention:
    """How a language model's outputs ``(n, T, V)`` meet its batch, as its own loss reads them.

    * ``causal``: the logits at position ``t`` predict the label at ``t + 1`` (the last
      position predicts nothing); otherwise position ``t`` predicts label ``t``.
    * A position counts when its target's label is not ``ignore_index`` (-100) and its
      target's ``attention_mask`` entry is not 0 (padding); the labels are those of
      ``target_key`` (dict batches) or ``batch[1]``, the mask ``batch[0][mask_key]``.
      Without labels (the closed-form and Monte-Carlo Fisher need none) only the mask counts.
    * ``positions='mean'`` (the default under the convention) divides example ``i``'s terms by
      ``N_i``, its number of counted positions: its loss is the mean over its tokens, Hugging
      Face's ``loss`` on that sequence alone; ``'sum'`` sums them."""

    def __init__(self, causal, target_key="labels", mask_key="attention_mask",
                 ignore_index=-100):
        self.causal, self.target_key = bool(causal), target_key
        self.mask_key, self.ignore_index = mask_key, ignore_index

    def __repr__(self):
        return f"LMConvention(causal={self.causal}, target_key={self.target_key!r})"


def lm_convention(model, causal_lm=None, target_key="labels", function=None):
    """The `LMConvention` of ``model`` (None: no language-model convention).

    With a user ``function`` (the outputs are then the user's, e.g. logits already shifted)
    nothing is detected: only ``causal_lm=True`` / ``False`` applies a convention.

    ``causal_lm``: None detects it (`is_causal_lm`: a causal LM gets the convention with
    shifted labels, any other model none); True forces the causal convention, False the
    convention without the shift (position ``t`` with label ``t``, as a masked LM or a token
    classifier: padding and -100 excluded, ``positions='mean'`` by default)."""
    if causal_lm is not None and not isinstance(causal_lm, bool):
        raise TypeError(f"causal_lm must be True, False or None (detect), got {causal_lm!r}")
    if causal_lm is None:
        if function is None and is_causal_lm(model):
            return LMConvention(True, target_key)
        return None
    return LMConvention(causal_lm, target_key)


def _resolve_positions(positions, conv):
    """``positions`` as given, else the default: ``'mean'`` under a language-model convention
    ``conv`` (its loss averages over tokens), ``'sum'`` otherwise."""
    return positions if positions is not None else ("mean" if conv is not None else "sum")


def _origin_extras(positions=None, class_dim=None, conv=None):
    return ((f", positions={positions!r}" if positions not in (None, "sum") else "")
            + (f", class_dim={class_dim!r}" if class_dim is not None else "")
            + (f", lm={conv!r}" if conv is not None else ""))
