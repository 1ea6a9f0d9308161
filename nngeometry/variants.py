"""Output transforms that turn a model's outputs into functions ``g(x)`` with
``J_g(x)ᵀ J_g(x)`` equal to the example's Fisher information (closed form), or to a Monte-Carlo
sample of it. The Jacobian generator then computes ``(1/n) Σ_x J_g(x)ᵀ J_g(x)``.

Closed forms (``F = (1/n) Σ_x J_f(x)ᵀ Σ_{y|x} J_f(x)``, ``f`` the model's outputs):

* ``regression``: ``Σ = I``: ``g = f``.
* ``classif_binary_logits``: Bernoulli on one logit, ``Σ = σ(f)(1 - σ(f))``: ``g = sqrt(Σ) f``.
* ``classif_logits``: ``Σ = diag(p) - p pᵀ``, ``p = softmax(f)``. ``Σ`` has rank ``C - 1``; with
  ``L`` its ``C × (C-1)`` Cholesky-type factor (``L Lᵀ = Σ``), ``g = Lᵀ f``: ``C - 1`` outputs, one
  backward direction fewer than the naive ``C``.

The factors are computed from detached probabilities: they are constants of the backward pass.
"""
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .backend.batches import all_finite, check_finite, check_outputs

CLOSED_FORM_VARIANTS = ("classif_logits", "classif_binary_logits", "regression")
MC_VARIANTS = ("classif_logits", "classif_logsoftmax", "segmentation_logits", "regression")


def multinomial_covariance_sqrt(p):
    """``L`` of shape ``(n, C, C-1)`` with ``L Lᵀ = diag(p) - p pᵀ`` for each row of ``p``.

    Column ``j`` (0-based) is the ``j``-th step of a Cholesky factorization of the multinomial
    covariance: with ``r_j = Σ_{i≥j} p_i`` (tail mass),
    ``L[j, j] = sqrt(p_j r_{j+1} / r_j)`` and ``L[i, j] = -p_i sqrt(p_j / (r_j r_{j+1}))`` for
    ``i > j``, zero above the diagonal.
    """
    n, C = p.shape
    r = torch.flip(torch.cumsum(torch.flip(p, [1]), 1), [1])  # r[:, j] = sum_{i>=j} p_i
    r = r.clamp(min=0)
    r_j = r[:, :-1]                       # (n, C-1)
    r_next = r[:, 1:]                     # (n, C-1)
    p_j = p[:, :-1]
    tiny = torch.finfo(p.dtype).tiny
    diag = torch.sqrt(p_j * r_next / r_j.clamp(min=tiny))
    # -p_i sqrt(p_j / (r_j r_{j+1})) written so that r_{j+1} = 0 (then all p_i, i>j, are 0) is 0
    coef = torch.sqrt(p_j / r_j.clamp(min=tiny)) / torch.sqrt(r_next.clamp(min=tiny))
    rows = torch.arange(C, device=p.device).unsqueeze(1)
    cols = torch.arange(C - 1, device=p.device).unsqueeze(0)
    below = (rows > cols).to(p.dtype)     # (C, C-1)
    on = (rows == cols).to(p.dtype)
    L = -p.unsqueeze(2) * coef.unsqueeze(1) * below + diag.unsqueeze(1) * on
    return L


def _as_2d(out):
    return out.reshape(out.shape[0], -1)


POSITIONS = ("sum", "mean")


def check_positions(positions):
    """``ValueError`` unless ``positions`` is ``'sum'``, ``'mean'`` or None (the default: the
    language-model convention's ``'mean'``, ``'sum'`` otherwise)."""
    if positions is not None and positions not in POSITIONS:
        raise ValueError(f"positions must be 'sum' (the log-likelihood sums over the positions "
                         f"of an output (n, T, C) / (n, C, H, W)) or 'mean' (the "
                         f"per-position terms averaged, for losses that are means over tokens), "
                         f"got {positions!r}")


def check_class_dim(class_dim):
    """``TypeError`` unless ``class_dim`` is None or an int."""
    if class_dim is not None and (isinstance(class_dim, bool) or not isinstance(class_dim, int)):
        raise TypeError(f"class_dim must be an int (the axis of the outputs that holds the "
                        f"classes, e.g. -1 or 1) or None, got {type(class_dim).__name__}")


def _layout_error(out):
    shape = tuple(out.shape)
    return ValueError(
        f"outputs of shape {shape} have more than 2 dimensions: which axis holds the classes? "
        f"Pass class_dim=-1 for classes last, (n, T, C) (sequences, Hugging Face's (batch, "
        f"tokens, vocabulary)), or class_dim=1 for classes along dimension 1, (n, C, L) / "
        f"(n, C, H, W) (PyTorch's cross_entropy layout, segmentation). (Hugging Face outputs "
        f"with .logits are read with classes last.)")


def output_class_dim(function, class_dim=None):
    """The class axis of ``function``'s outputs: ``class_dim`` when given, else the one the
    function reports (the default function on a Hugging Face output reads ``.logits`` with
    classes last and sets ``function.output_class_dim = -1`` when it does), else None."""
    if class_dim is not None:
        return class_dim
    return getattr(function, "output_class_dim", None)


def class_positions(out, class_dim=None):
    """The outputs ``out`` as ``(n, S, C)``: ``S`` positions of ``C`` classes each.

    * ``(n, C)``: one position (``class_dim`` ignored, or -1 / 1);
    * more dimensions: the classes along ``class_dim`` (``-1``: ``(n, T, C)``, Hugging Face's
      ``(batch, tokens, vocabulary)``; ``1``: ``(n, C, L)``, ``(n, C, H, W)``, PyTorch's
      ``cross_entropy`` layout), the other axes flattened (row-major) into the positions.
      Without ``class_dim`` a ``ValueError`` names both layouts: the class axis is never
      guessed from the shape."""
    n = out.shape[0]
    if out.dim() <= 2:
        return out.reshape(n, 1, -1)
    if class_dim is None:
        raise _layout_error(out)
    d = class_dim % out.dim()
    if d == 0:
        raise ValueError(f"class_dim={class_dim} is the batch axis of outputs of shape "
                         f"{tuple(out.shape)}; the classes are along another axis")
    C = out.shape[d]
    if d != out.dim() - 1:
        out = out.movedim(d, -1)
    return out.reshape(n, -1, C)


def _from_positions(fp, shape, class_dim):
    """The inverse of `class_positions`: ``(n, S, C)`` back to the outputs' ``shape``."""
    if len(shape) <= 2:
        return fp.reshape(shape)
    d = class_dim % len(shape)
    moved = list(shape[:d]) + list(shape[d + 1:]) + [shape[d]]
    out = fp.reshape(moved)
    return out if d == len(shape) - 1 else out.movedim(-1, d)


def _position_scale(S, positions):
    """The factor of the per-example output transform ``g``: 1 for the sum over the ``S``
    positions, ``1/sqrt(S)`` for their mean (``gᵀg`` scales by ``1/S``)."""
    return 1.0 if positions != "mean" or S == 1 else S ** -0.5


# ------------------------------------------------------------------ language-model conventions
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


def _batch_parts(batch, conv):
    first = batch[0] if batch else None
    if isinstance(first, Mapping):
        return first.get(conv.target_key), first.get(conv.mask_key)
    return (batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None), None


def lm_positions(out, batch, conv, class_dim=-1, positions="mean"):
    """``(fp, y, w)`` for a language model's outputs ``out`` under ``conv``:

    * ``fp`` ``(n, S, V)``: the logits of the positions that predict something (``S = T - 1``
      for a causal LM);
    * ``y`` ``(n, S)``: their labels (``ignore_index`` where a position does not count), or
      None when the batch has none;
    * ``w`` ``(n, S)``: the weight of each position, 0 where it does not count, else 1
      (``positions='sum'``) or ``1 / N_i`` (``'mean'``, ``N_i`` the counted positions of
      example ``i``; an example with none has weights 0)."""
    fp = class_positions(out, class_dim)
    n, T, _ = fp.shape
    labels, mask = _batch_parts(batch, conv)
    for name, t in (("labels", labels), ("attention_mask", mask)):
        if t is not None and tuple(t.shape) != (n, T):
            raise ValueError(
                f"the language-model convention pairs logits {tuple(out.shape)} ((n, T, V)) with "
                f"{name} of shape (n, T) = ({n}, {T}), got {tuple(t.shape)}; pass causal_lm=False "
                "and a loss_function for another layout")
    if conv.causal:
        fp = fp[:, :-1]
        labels = None if labels is None else labels[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    keep = torch.ones(fp.shape[:2], dtype=torch.bool, device=fp.device)
    if labels is not None:
        keep = keep & (labels != conv.ignore_index)
    if mask is not None:
        keep = keep & (mask != 0)
    w = keep.to(fp.dtype)
    if positions == "mean":
        w = w / keep.sum(1, keepdim=True).clamp(min=1).to(fp.dtype)
    y = None if labels is None else torch.where(keep, labels, conv.ignore_index)
    return fp, y, w


def _takes_full_outputs(loss_function):
    """Whether ``loss_function`` applies a language model's convention itself (it sets
    ``nngeometry_full_outputs = True``, e.g. [`nngeometry.influence.causal_lm_loss`][nngeometry.influence.causal_lm_loss],
    which shifts the labels): it then gets the full logits and labels, no convention."""
    return bool(getattr(loss_function, "nngeometry_full_outputs", False))


def _lm_active(conv, out):
    return conv is not None and out.dim() == 3


class BatchInfo:
    """What a batch-aware transform (``OutputTransform(..., needs_batch=True)``) gets besides the
    outputs: the batch (the tuple ``function(*batch)`` was called with), its index in the
    loader (None when unknown) and ``key``, a 63-bit integer that is a fixed function of the
    seed, the index and the content of the batch (None without a seed)."""

    __slots__ = ("batch", "index", "key")

    def __init__(self, batch, index=None, key=None):
        self.batch, self.index, self.key = batch, index, key


def _tensors_in(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in obj:
            yield from _tensors_in(obj[k])
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _tensors_in(v)


def batch_key(seed, batch, index=None):
    """A 63-bit integer, a fixed function of ``seed``, the batch's ``index`` in the loader and the
    bytes, dtypes and shapes of its tensors (hashed with BLAKE2b). Computed on real tensors
    (the generator calls it outside ``torch.func`` transforms)."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    h.update(repr((int(seed), index)).encode())
    for t in _tensors_in(batch):
        h.update(repr((str(t.dtype), tuple(t.shape))).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _signed64(c):
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN = _signed64(0x9E3779B97F4A7C15)
_MIX1 = _signed64(0xBF58476D1CE4E5B9)
_MIX2 = _signed64(0x94D049BB133111EB)


def _shr(z, s):
    """Logical right shift of int64 ``z`` (``>>`` is arithmetic on signed tensors)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def counter_uniform(key, shape, dtype, device):
    """Uniform numbers in ``(0, 1)`` of ``shape``: SplitMix64 (Steele et al. 2014) of the
    counters ``key·φ + 1, 2, ...``, top 53 bits. Plain integer arithmetic, no RNG state: the
    same numbers on every call, device and ``torch.func`` transform (``vmap`` refuses random
    ops), which is what makes a seeded Monte-Carlo matrix one fixed matrix."""
    numel = 1
    for d in shape:
        numel *= d
    z = torch.arange(1, numel + 1, dtype=torch.int64, device=device) * _GOLDEN
    z = z + _signed64(((key * 0x2545F4914F6CDD1D) + 0x632BE59BD9B4E019) % (1 << 64))
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    z = z ^ _shr(z, 31)
    u = (_shr(z, 11).to(torch.float64) + 0.5) * 2.0 ** -53
    return u.to(dtype).clamp_(min=torch.finfo(dtype).tiny, max=1 - torch.finfo(dtype).eps / 2)\
        .reshape(shape)


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


def _resolve_positions(positions, conv):
    return positions if positions is not None else ("mean" if conv is not None else "sum")


def _origin_extras(positions=None, class_dim=None, conv=None):
    return ((f", positions={positions!r}" if positions not in (None, "sum") else "")
            + (f", class_dim={class_dim!r}" if class_dim is not None else "")
            + (f", lm={conv!r}" if conv is not None else ""))


def closed_form_function(function, variant, positions="sum", class_dim=None, lm=None):
    """``g(*batch)`` with ``J_gᵀ J_g`` the example's Fisher under ``variant``.

    Outputs with positions (more than 2 dimensions, the class axis ``class_dim``, see
    `class_positions`): the likelihood factorises over positions, the Fisher is the sum of
    the per-position terms (``positions='sum'``) or their mean (``'mean'``, for losses averaged
    over tokens). ``lm``: a `LMConvention` (language models ``(n, T, V)``: shifted
    positions for a causal LM, padding excluded, ``positions=None`` meaning ``'mean'`` over the
    counted positions, see `lm_positions`).

    ``classif_logits`` also has the closed-form output metric `OutputTransform.metric`:
    ``H u = p ⊙ u − p (pᵀu)`` per position, which the implicit products use instead of the
    ``C × (C − 1)`` square roots (``O(n·S·C)`` memory)."""
    check_positions(positions)
    check_class_dim(class_dim)
    g = _closed_form(function, variant, _resolve_positions(positions, lm), class_dim, lm)
    # named in the error of an unpickled PMatImplicit, which needs this function again
    g.origin = (f"nngeometry.variants.closed_form_function(function, {variant!r}"
                + _origin_extras(positions, class_dim, lm) + ")")
    return g


class _SoftmaxLayout:
    """The positions of a softmax output for one batch: ``view(t)`` ``(n, S, C)`` (the
    positions that count for the likelihood, the class axis last), ``unview(tp)`` back to the
    outputs' shape (zeros where a position was dropped), ``w`` the weight of each position
    (``(n, S)`` tensor, a float, or None for 1) and ``y`` the labels ``(n, S)`` when known."""

    def __init__(self, out, info, function, class_dim, conv, positions):
        self.shape = out.shape
        cd = output_class_dim(function, class_dim)
        self.lm = _lm_active(conv, out)
        if self.lm:
            self.cd = -1 if cd is None else cd
            batch = info.batch if info is not None else ()
            fp, self.y, self.w = lm_positions(out, batch, conv, self.cd, positions)
            self.causal = conv.causal
        else:
            self.cd, self.y, self.causal = cd, None, False
            fp = class_positions(out, cd)
            S = fp.shape[1]
            self.w = 1.0 / S if positions == "mean" and S > 1 else None
        self.fp = fp

    def view(self, t):
        tp = class_positions(t, self.cd)
        return tp[:, :-1] if self.causal else tp

    def unview(self, tp):
        if self.causal:
            tp = F.pad(tp, (0, 0, 0, 1))
        return _from_positions(tp, self.shape, self.cd)

    def weighted(self, tp, power=1.0):
        """``tp`` ``(n, S, ...)`` times ``w ** power`` per position."""
        if self.w is None:
            return tp
        if isinstance(self.w, float):
            return tp * self.w ** power
        w = self.w if power == 1.0 else self.w.sqrt()
        return tp * w.reshape(w.shape + (1,) * (tp.dim() - 2))


def _softmax_root_g(fp, weights_sqrt_fn):
    n, S, C = fp.shape
    if C < 2:
        raise ValueError("variant 'classif_logits' needs at least 2 logits per example "
                         "(per position); use 'classif_binary_logits' for one logit")
    fl = fp.reshape(n * S, C)
    L = multinomial_covariance_sqrt(torch.softmax(fl.detach(), dim=1)).reshape(n, S, C, C - 1)
    L = weights_sqrt_fn(L)
    return torch.einsum("nsc,nsck->nsk", fp, L).reshape(n, S * (C - 1))


def softmax_metric(fp, up):
    """``H u = p ⊙ u − p (pᵀu)`` per position (``p = softmax(fp)``, classes last): the
    multinomial covariance applied to ``up`` in ``O(C)`` per position."""
    p = torch.softmax(fp.detach(), dim=-1)
    pu = p * up
    return pu - p * pu.sum(-1, keepdim=True)


def _closed_form(function, variant, positions="sum", class_dim=None, conv=None):
    if variant == "regression":
        def g(out):
            # Σ = I: every entry is its own unit-variance Gaussian, the positions are summed
            f = _as_2d(out)
            if positions != "mean" or out.dim() <= 2:
                return f
            S = class_positions(out, output_class_dim(function, class_dim)).shape[1]
            return f * _position_scale(S, positions)
        return OutputTransform(function, g)
    if variant == "classif_binary_logits":
        def g(out):
            if out.dim() <= 2:
                f = _as_2d(out)
                if f.shape[1] != 1:
                    raise ValueError(
                        f"variant 'classif_binary_logits' expects one logit per example, the "
                        f"model gives {f.shape[1]}; use 'classif_logits' for several classes")
                S = 1
            else:
                fp = class_positions(out, output_class_dim(function, class_dim))
                if fp.shape[2] != 1:
                    raise ValueError(
                        f"variant 'classif_binary_logits' expects one logit per position, "
                        f"outputs of shape {tuple(out.shape)} have {fp.shape[2]} along the "
                        "class axis class_dim; use 'classif_logits' for several classes")
                f, S = _as_2d(out), fp.shape[1]
            s = torch.sigmoid(f.detach())
            return torch.sqrt(s * (1 - s)) * f * _position_scale(S, positions)
        return OutputTransform(function, g)
    if variant == "classif_logits":
        needs = conv is not None

        def layout(out, info):
            return _SoftmaxLayout(out, info, function, class_dim, conv, positions)

        def g(out, info=None):
            lay = layout(out, info)  # one softmax per counted position
            return _softmax_root_g(lay.fp, lambda L: lay.weighted(L, 0.5))

        def metric(out, u, info=None):
            lay = layout(out, info)
            return lay.unview(lay.weighted(softmax_metric(lay.fp, lay.view(u))))
        return OutputTransform(function, g, needs_batch=needs, metric=metric)
    raise ValueError(f"unknown variant '{variant}' for FIM; expected one of {CLOSED_FORM_VARIANTS}")


def monte_carlo_function(function, variant, trials, covariance=1.0, positions="sum",
                         seed=None, class_dim=None, lm=None):
    """``g(*batch)`` of shape ``(n, trials)`` with ``g_t = log p(y_t | x) / sqrt(trials)`` and
    ``y_t ~ p(· | x)`` sampled (constant for the backward pass), so that
    ``J_gᵀ J_g = (1/T) Σ_t ∇ log p(y_t|x) ∇ log p(y_t|x)ᵀ``.

    Outputs with positions (``(n, T, C)``: classes last; ``(n, C, H, W)``: classes along
    dimension 1, see `class_positions`): one label is drawn per position and the
    log-probabilities are summed over positions (``positions='sum'``), or averaged
    (``'mean'``: ``g`` scaled by ``1/sqrt(S)``, so the matrix is the sum's divided by ``S``).

    Without ``seed`` the labels are drawn from PyTorch's global RNG (of the outputs' device):
    ``torch.multinomial`` (``Exponential`` draws for one trial; for one trial of 1024 classes
    or more, the inverse CDF of one ``torch.rand`` per row) for the classification
    variants, ``torch.randn`` for ``regression``; seed it with ``torch.manual_seed`` for
    reproducible matrices. With ``seed`` (an int) no RNG state is used: the draws are a fixed
    function of the seed, the batch's index in the loader and its content (`batch_key`,
    `counter_uniform`; labels by the Gumbel-max rule, Gaussians by Box-Muller), so that
    every pass over the same loader sees the same targets: ``PMatImplicit`` is then one fixed
    matrix (CG, Lanczos and Hutchinson need that); the uniform numbers behind the draws are
    the same on every device (the labels then agree up to floating-point ties).

    The transform also gives the generator each chunk of columns ``g[:, k0:k1]`` as its own
    small graph (``OutputTransform.split``): the backward pass of ``K`` directions then works on
    ``(K, n, K)`` tensors, not on the ``(K, n, trials)`` one-hot cotangents of the whole output,
    whose memory and time grow as ``trials² · n``."""
    check_positions(positions)
    check_class_dim(class_dim)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int (or None for PyTorch's global RNG), got "
                        f"{type(seed).__name__}")
    g = _monte_carlo(function, variant, trials, covariance, _resolve_positions(positions, lm),
                     seed, class_dim, lm)
    extra = (f", covariance={covariance!r}" if covariance != 1.0 else "") + \
        _origin_extras(positions, class_dim, lm) + \
        (f", seed={seed!r}" if seed is not None else "")
    g.origin = f"nngeometry.variants.monte_carlo_function(function, {variant!r}, {trials!r}{extra})"
    return g


#: from this many classes the one-trial sampler draws by the inverse CDF
_INVERSE_CDF_CLASSES = 1024


def _monte_carlo(function, variant, trials, covariance, positions="sum", seed=None,
                 class_dim=None, conv=None):
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    check_covariance(covariance)
    scale = trials ** -0.5

    def draw_labels(logp, from_softmax, key):
        # logp: (m, C) normalized log-probabilities -> labels (m, T)
        probs = logp.detach().exp()
        # checked here because sampling comes before the generator's check of the outputs;
        # torch.multinomial needs finite rows before it runs (a device-side assert on CUDA),
        # the other draws only need the error before the matrix is used (deferred on
        # accelerators: no host synchronisation per batch)
        msg = ("the model's outputs contain NaN or Inf; check the inputs (NaN/Inf in the data?) "
               "and the model's parameters")
        if key is None and not (trials == 1 and from_softmax):
            if not all_finite(probs):
                raise ValueError(msg)
        else:
            check_finite(probs, msg)
        if key is not None:
            # Gumbel-max: argmax_c (log p_c + G_c), G_c = -log(-log u_c), is a draw from p
            m, C = logp.shape
            u = counter_uniform(key, (m, trials, C), logp.dtype, logp.device)
            return (logp.detach().unsqueeze(1) - torch.log(-torch.log(u))).argmax(2)
        if trials == 1 and from_softmax and logp.shape[1] >= _INVERSE_CDF_CLASSES:
            # many classes (a vocabulary): the inverse CDF, one uniform per row and a binary
            # search in the cumulative sums (in float64), instead of one exponential per class
            # (which costs more than the model's forward for a 50k vocabulary)
            cdf = torch.cumsum(probs.to(torch.float64), dim=1)
            u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device)
            u = (u * cdf[:, -1:]).clamp_(min=torch.finfo(torch.float64).tiny)
            return torch.searchsorted(cdf, u).clamp_(max=cdf.shape[1] - 1)
        if trials == 1 and from_softmax:
            # one draw per row: argmax_c p_c / E_c with E_c ~ Exp(1) is a draw from p (the
            # smallest of independent Exp(p_c) times), and it is the computation torch.multinomial
            # itself runs for one sample (same generator use, so the same labels for a seed),
            # minus its checks of the rows (non-negative, finite, positive sum: true here, for
            # finite log-softmax outputs), which cost more than the draw on small batches
            E = torch.empty_like(probs).exponential_(1).clamp_(min=torch.finfo(probs.dtype).tiny)
            return torch.div(probs, E).argmax(1, keepdim=True)  # (E = 0: 0/0 a NaN max)
        return torch.multinomial(probs, trials, replacement=True)

    def sampled(logp, from_softmax, key, n=None, root_w=None):
        """``(g, columns)`` for normalized log-probabilities ``logp`` (m, C); with ``n``, the
        m = n · positions rows are summed per example (sequences, segmentation), weighted by
        ``root_w`` ``(n, positions)`` when given (the square roots of the positions' weights
        in the matrix)."""
        y = draw_labels(logp, from_softmax, key)
        pos_scale = 1.0 if n is None else _position_scale(logp.shape[0] // max(n, 1), positions)

        def columns(k0, k1):
            lp = torch.gather(logp, 1, y[:, k0:k1].contiguous())  # (5x faster backward)
            if n is not None and root_w is not None:
                return (lp.reshape(n, -1, k1 - k0) * root_w.unsqueeze(2)).sum(1) * scale
            if n is not None:
                return lp.reshape(n, -1, k1 - k0).sum(1) * (scale * pos_scale)
            # one trial: scale = 1, no multiplication (one op less forward and backward)
            return lp if trials == 1 else lp * scale
        return columns(0, trials), columns

    def key_of(info):
        return None if info is None else info.key

    def classif(out, info, log_softmax):
        lay = _SoftmaxLayout(out, info, function, class_dim, conv, positions)
        fp = lay.fp
        n, S, C = fp.shape
        logp = fp.reshape(n * S, C)
        if log_softmax:
            logp = F.log_softmax(logp, dim=1)
        root_w = lay.w.sqrt() if isinstance(lay.w, torch.Tensor) else None
        return sampled(logp, log_softmax and trials == 1, key_of(info), None if S == 1 and
                       out.dim() <= 2 else n, root_w)

    needs = seed is not None or conv is not None
    if variant == "classif_logits":
        return OutputTransform(function, split=lambda out, info=None: classif(out, info, True),
                               needs_batch=needs, seed=seed)
    if variant == "classif_logsoftmax":
        return OutputTransform(function, split=lambda out, info=None: classif(out, info, False),
                               needs_batch=needs, seed=seed)
    if variant == "segmentation_logits":
        def split(f, info=None):  # f: (n, C, *spatial)
            if f.dim() < 3:
                raise ValueError("variant 'segmentation_logits' expects outputs (n, C, H, W, ...)")
            n, C = f.shape[:2]
            logp = F.log_softmax(f, dim=1).movedim(1, -1).reshape(-1, C)  # (n*pixels, C)
            return sampled(logp, True, key_of(info), n)
        return OutputTransform(function, split=split, needs_batch=needs, seed=seed)
    if variant == "regression":
        sigma2 = float(covariance)

        def split(out, info=None):
            f = _as_2d(out)
            S = class_positions(out, output_class_dim(function, class_dim)).shape[1] \
                if out.dim() > 2 and positions == "mean" else 1
            pos_scale = _position_scale(S, positions)
            shape = (f.shape[0], trials, f.shape[1])
            key = key_of(info)
            if key is None:
                noise = torch.randn(*shape, dtype=f.dtype, device=f.device)
            else:  # Box-Muller from two counter-based uniforms
                u = counter_uniform(key, (2,) + shape, f.dtype, f.device)
                noise = torch.sqrt(-2 * torch.log(u[0])) * torch.cos(2 * math.pi * u[1])
            y = f.detach().unsqueeze(1) + (sigma2 ** 0.5) * noise

            def columns(k0, k1):
                return -((y[:, k0:k1] - f.unsqueeze(1)) ** 2).sum(2) / (2 * sigma2) * \
                    (scale * pos_scale)
            return columns(0, trials), columns
        return OutputTransform(function, split=split, needs_batch=needs, seed=seed)
    raise ValueError(f"unknown variant '{variant}' for FIM_MonteCarlo; expected one of {MC_VARIANTS}")


def check_covariance(covariance):
    """``ValueError`` unless ``covariance`` (the variance ``σ²`` of the Gaussian of the
    ``regression`` variant) is a finite positive number."""
    try:
        value = float(covariance)
    except (TypeError, ValueError):
        raise TypeError(f"covariance must be a positive number (the variance σ² of the "
                        f"regression likelihood), got {type(covariance).__name__}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"covariance must be a finite positive number (the variance σ² of the "
                         f"regression likelihood N(f, σ²I)), got {covariance!r}")


# ====================================================================== losses of observed targets
def targets_of(batch, target_key="labels", who="this matrix"):
    """The targets that a loss of the observed targets takes after the outputs:
    ``batch[1:]`` for a batch ``(inputs, targets, ...)``; for a dict batch (Hugging Face
    style) the value of ``target_key`` (``'labels'``) when the batch has no other element."""
    first = batch[0]
    if isinstance(first, dict) and len(batch) == 1:
        if target_key not in first:
            raise ValueError(
                f"{who} needs the observed targets, and the dict batch has no key "
                f"{target_key!r} (its keys: {', '.join(map(repr, first))}); name the targets' key "
                "with target_key=, or pass batches (inputs, targets)")
        return (first[target_key],)
    if len(batch) < 2:
        raise ValueError(
            f"{who} needs the observed targets: the batches hold only inputs. Pass batches "
            "(inputs, targets, ...) (a DataLoader of a TensorDataset(x, y)), or dicts with a "
            f"{target_key!r} key")
    return tuple(batch[1:])


def cross_entropy_losses(outputs, targets, class_dim=None):
    """``-log softmax(outputs)[targets]`` per position, shape ``(n, S)`` (positions as in
    `class_positions`, the classes along ``class_dim``); targets equal to -100 (PyTorch's
    and Hugging Face's ``ignore_index``) give 0."""
    fp = class_positions(outputs, class_dim)
    n, S, C = fp.shape
    if targets.is_floating_point() or targets.numel() != n * S:
        raise ValueError(
            f"the default loss (cross-entropy on logits) needs integer class targets, one per "
            f"position: {n * S} for outputs of shape {tuple(outputs.shape)}, got a "
            f"{targets.dtype} tensor of shape {tuple(targets.shape)}; pass loss_function= for "
            "another loss")
    y = targets.reshape(n * S)
    return F.cross_entropy(fp.reshape(n * S, C), y, reduction="none").reshape(n, S)


def per_example_losses(losses, n, positions="sum", who="loss_function"):
    """The per-example losses ``(n,)`` from what a loss returned: ``(n,)`` as is, ``(n, ...)``
    (a loss per position) summed, or averaged with ``positions='mean'``, over the positions."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{who} must return a tensor of per-example losses (n,), got "
                        f"{type(losses).__name__}")
    if losses.dim() == 0 or losses.shape[0] != n:
        raise ValueError(
            f"{who} must return one loss per example, shape ({n},) (reduction='none', e.g. "
            f"lambda out, y: F.cross_entropy(out, y, reduction='none')), got shape "
            f"{tuple(losses.shape)}: a loss reduced over the batch has no per-example gradients")
    if losses.dim() == 1:
        return losses
    flat = losses.reshape(n, -1)
    return flat.sum(1) if positions == "sum" else flat.mean(1)


def _loss_or_default(loss_function, class_dim_of=lambda: None):
    """The loss ``(outputs, *targets) -> losses`` of ``loss_function``; the cross-entropy on
    logits (default, ``'cross_entropy'``) reads the class axis ``class_dim_of()`` at call
    time."""
    if loss_function is None or (isinstance(loss_function, str)
                                 and loss_function == "cross_entropy"):
        return lambda out, y, *rest: cross_entropy_losses(out, y, class_dim_of())
    if isinstance(loss_function, str) or (isinstance(loss_function, torch.nn.Module)
                                          and known_loss(loss_function) is not None):
        return known_loss(loss_function).losses  # (checks the name and the reduction)
    if not callable(loss_function):
        raise TypeError(f"loss_function must be callable, loss_function(outputs, *targets) -> "
                        f"per-example losses (n,), got {type(loss_function).__name__}")
    return loss_function


def empirical_function(function, loss_function=None, positions="sum", target_key="labels",
                       class_dim=None, lm=None):
    """``g(*batch)`` of shape ``(n, 1)``: the per-example loss ``ℓ_i`` of the observed target,
    so that ``J_gᵀ J_g = ∇θℓ_i ∇θℓ_iᵀ``, the empirical Fisher's term of example ``i``.

    ``loss_function(outputs, *targets) -> (n,)`` (or ``(n, ...)``, reduced over positions by
    ``positions``); default `cross_entropy_losses` (classes along ``class_dim``).
    ``targets``: see `targets_of`.

    ``lm`` (a `LMConvention`), for outputs ``(n, T, V)``: the loss is called on the
    positions that predict something and their labels (`lm_positions`: ``(n, S, V)``
    logits, ``(n, S)`` labels, -100 where a position does not count: a -100 label or padding),
    a per-position result ``(n, S)`` weighted by the positions' weights: summed over the
    counted positions (``positions='sum'``) or averaged over them (``'mean'``, the default:
    Hugging Face's ``loss`` of the sequence alone). ``nn.CrossEntropyLoss`` gets its classes
    along dimension 1 (the logits transposed)."""
    check_positions(positions)
    check_class_dim(class_dim)
    lm = None if _takes_full_outputs(loss_function) else lm
    positions = _resolve_positions(positions, lm)
    loss = _loss_or_default(loss_function, lambda: output_class_dim(function, class_dim))
    known = known_loss(loss_function) if isinstance(loss_function, (str, torch.nn.Module)) \
        else None

    def g(out, info):
        if _lm_active(lm, out):
            cd = output_class_dim(function, class_dim)
            fp, y, w = lm_positions(out, info.batch, lm, -1 if cd is None else cd, positions)
            if y is None:
                raise ValueError(
                    f"the empirical Fisher needs the observed targets: the batch has no "
                    f"{lm.target_key!r} (dict batches) or targets (batch[1])")
            if known is not None and known.kind == "softmax" and known.classes == 1:
                losses = loss(fp.transpose(1, 2), y)
            elif known is not None and known.kind != "softmax":
                raise ValueError(f"{known.name} is not a loss of a language model's logits; "
                                 "pass causal_lm=False for other outputs")
            else:
                losses = loss(fp, y)
            if losses.dim() == 2 and tuple(losses.shape) == tuple(w.shape):
                return (losses * w).sum(1, keepdim=True)
            return per_example_losses(losses, out.shape[0], positions).unsqueeze(1)
        targets = targets_of(info.batch, target_key, "the empirical Fisher")
        losses = per_example_losses(loss(out, *targets), out.shape[0], positions)
        return losses.unsqueeze(1)
    t = OutputTransform(function, g, needs_batch=True)
    t.origin = ("nngeometry.variants.empirical_function(function, loss_function"
                + _origin_extras(positions, class_dim, lm) + ")")
    return t


def _vmap_dims(targets, n):
    return tuple(0 if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n else None
                 for t in targets)


def output_hessians(loss_function, outputs, targets, positions="sum"):
    """``(n, D, D)``: ``H_i = ∇²_f ℓ_i``, the Hessian of example ``i``'s loss w.r.t. its own
    outputs (flattened, ``D`` entries), by ``torch.func.hessian`` vmapped over the examples
    (a loss that ``vmap`` cannot batch is run example by example). The loss is
    ``loss_function(f_i[None], *targets_i[None])`` reduced as `per_example_losses`."""
    n = outputs.shape[0]
    f = outputs.detach()
    shape = f.shape[1:]
    try:
        H = _output_hessians_autograd(loss_function, f, targets, positions)
        if H is not None:
            return H
    except RuntimeError:
        pass  # inside a torch.func transform (implicit products): the functional form below

    def one(fi, *ti):
        ti = tuple(t.unsqueeze(0) if isinstance(t, torch.Tensor) and d == 0 else t
                   for t, d in zip(ti, dims))
        return per_example_losses(loss_function(fi.unsqueeze(0), *ti), 1, positions).sum()

    dims = _vmap_dims(targets, n)
    # reverse-over-reverse (torch.func.hessian is forward-over-reverse: the implicit products
    # already run inside a forward-mode level, which cannot be nested)
    hess = torch.func.jacrev(torch.func.jacrev(one))
    try:
        H = torch.func.vmap(hess, in_dims=(0,) + dims)(f, *targets)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        if "must return one loss per example" in str(e):
            raise
        # ops without a batching rule (or .item() in the loss): one example at a time
        dims = tuple(None for _ in targets)
        H = torch.stack([
            hess(f[i], *[t[i:i + 1] if d0 == 0 else t for t, d0 in
                         zip(targets, _vmap_dims(targets, n))])
            for i in range(n)]) if n else f.new_zeros((0,) + shape + shape)
    D = shape.numel()
    return H.reshape(n, D, D)


def _output_hessians_autograd(loss_function, f, targets, positions):
    """`output_hessians` by plain autograd (5-50x faster than ``torch.func`` on small
    outputs): the per-example losses depend on their own outputs only, so the gradient of
    their sum w.r.t. ``f`` holds every example's gradient, and one backward per output
    coordinate (batched) gives row ``d`` of every ``H_i``. None when the loss does not
    support double backward."""
    n = f.shape[0]
    D = f[0].numel() if n else f.shape[1:].numel()
    flat = f.reshape(n, D).clone().requires_grad_(True)
    with torch.enable_grad():
        losses = per_example_losses(loss_function(flat.reshape(f.shape), *targets), n,
                                    positions)
        (g,) = torch.autograd.grad(losses.sum(), flat, create_graph=True)
        if not g.requires_grad:  # a loss linear in the outputs: H = 0
            return flat.new_zeros(n, D, D)
        eye = torch.eye(D, dtype=f.dtype, device=f.device).unsqueeze(1).expand(D, n, D)
        try:
            (rows,) = torch.autograd.grad(g, flat, eye, is_grads_batched=True,
                                          allow_unused=True)
        except RuntimeError:
            rows = torch.stack([torch.autograd.grad(g, flat, eye[d], retain_graph=True,
                                                    allow_unused=True)[0]
                                for d in range(D)])
    if rows is None:
        return flat.new_zeros(n, D, D)
    return rows.transpose(0, 1).detach()  # (n, D, D): H[i, d, :] = ∂g_{i,d}/∂f_i


def psd_sqrt(H, who="the loss"):
    """``S`` with ``S Sᵀ = H`` for a batch of symmetric PSD matrices ``H`` (``(n, D, D)``), from
    their eigendecompositions ``H = V Λ Vᵀ``: ``S = V Λ^{1/2}``. Eigenvalues below zero by more
    than round-off are refused (``ValueError``): the Gauss-Newton matrix needs a loss convex in
    the outputs."""
    H = 0.5 * (H + H.transpose(1, 2))
    lam, V = torch.linalg.eigh(H)
    if lam.numel():
        top = lam.abs().amax(dim=1)
        tol = 100 * H.shape[1] * torch.finfo(H.dtype).eps * top + torch.finfo(H.dtype).tiny
        worst = (lam[:, 0] + tol)
        if bool((worst < 0).any()):
            i = int(torch.argmin(lam[:, 0] / top.clamp_min(torch.finfo(H.dtype).tiny)))
            raise ValueError(
                f"{who} is not convex in the outputs: the Hessian of example {i}'s loss w.r.t. "
                f"its outputs has the eigenvalue {float(lam[i, 0]):.3g} (largest "
                f"{float(lam[i, -1]):.3g}). The generalized Gauss-Newton matrix J^T H J needs a "
                "positive semi-definite H (a loss convex in the outputs: cross-entropy, (weighted) "
                "MSE, Gaussian/Poisson negative log-likelihood in the natural parameter...); for "
                "this loss use Hessian(...) or EmpiricalFisher(...)")
    S = V * lam.clamp_min(0).sqrt().unsqueeze(1)
    # directions whose eigenvalue is zero for every example (the softmax's constant direction:
    # cross-entropy has rank C - 1) contribute nothing: dropped, one backward direction less
    if lam.numel():
        # (below eigh's own error, D·eps·top, an eigenvalue is round-off)
        null = 4 * H.shape[1] * torch.finfo(H.dtype).eps * top + torch.finfo(H.dtype).tiny
        keep = (lam > null.unsqueeze(1)).any(dim=0)
        if not bool(keep.all()) and bool(keep.any()):
            S = S[:, :, keep]
    return S


# ------------------------------------------------------- losses with a closed-form output Hessian
#: the losses that ``GGN(..., loss_function=name)`` / ``EmpiricalFisher`` accept by name
LOSS_NAMES = ("cross_entropy", "mse", "bce_with_logits")


class _KnownLoss:
    """A loss whose per-example output Hessian ``H_i`` has a closed-form square root, so the GGN
    needs neither output Hessians by double backward nor their eigendecompositions.

    ``kind``:

    * ``'softmax'``: cross-entropy on logits, ``H = diag(p) - p pᵀ`` per position
      (``p = softmax``), square root `multinomial_covariance_sqrt` (``C - 1`` columns).
      ``classes``: ``'last'`` (the library's convention, `class_positions`: ``(n, C)``,
      ``(n, T, C)``, ``(n, C, H, W)``) or ``1`` (``torch.nn.CrossEntropyLoss``: classes along
      dimension 1 for every shape). Positions whose target is ``ignore_index`` have ``H = 0``.
      Label smoothing ``ε`` leaves ``H`` unchanged (the smoothed targets sum to one).
    * ``'elementwise'``: a loss that is a sum over the output entries of a function of one
      entry, ``H = diag(h)``: ``h = 2`` (squared error ``(f - y)²``), ``σ(f)(1 - σ(f))``
      (binary cross-entropy on logits), ``1 / max(var, eps)`` (Gaussian NLL
      ``0.5 (log var + (f - y)² / var)``), ``exp(f)`` (Poisson NLL with log-rate outputs);
      square root ``sqrt(h)``.

    ``losses(out, *targets)`` is the loss itself (per position / per entry), for the empirical
    Fisher and for error messages."""

    def __init__(self, name, kind, losses, curvature=None, classes="last", ignore_index=None):
        self.name, self.kind, self.losses = name, kind, losses
        self.curvature = curvature      # elementwise: h(f_detached, targets) -> broadcastable
        self.classes = classes
        self.ignore_index = ignore_index

    def __call__(self, out, *targets):
        return self.losses(out, *targets)


def _mse_losses(out, y):
    return (out - y) ** 2


def _bce_losses(out, y):
    return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none")


def _ce_string_losses(out, y):
    return cross_entropy_losses(out, y)


def known_loss(loss_function):
    """The `_KnownLoss` behind ``loss_function`` (a name of `LOSS_NAMES` or a
    ``torch.nn`` loss module of an exact known type), or None for any other callable (the GGN
    then uses the generic output Hessians).

    Modules: ``nn.CrossEntropyLoss`` (class indices; with ``weight=`` or probability targets:
    generic path), ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (with ``weight`` / ``pos_weight``:
    generic), ``nn.GaussianNLLLoss`` (targets ``(y, var)``), ``nn.PoissonNLLLoss(log_input=True)``.
    A module must have ``reduction='none'`` (``ValueError`` otherwise: a loss reduced over the
    batch has no per-example Hessians, and a mean would scale them by ``1/n``)."""
    nn = torch.nn
    if isinstance(loss_function, str):
        if loss_function == "cross_entropy":
            return _KnownLoss("cross_entropy", "softmax", _ce_string_losses, classes="last",
                              ignore_index=-100)
        if loss_function == "mse":
            return _KnownLoss("mse", "elementwise", _mse_losses,
                              lambda f, t: torch.full((), 2.0, dtype=f.dtype, device=f.device))
        if loss_function == "bce_with_logits":
            return _KnownLoss("bce_with_logits", "elementwise", _bce_losses, _bernoulli_h)
        raise ValueError(f"unknown loss_function {loss_function!r}: the names are "
                         f"{', '.join(map(repr, LOSS_NAMES))}; or pass a torch.nn loss module "
                         "with reduction='none', or a callable loss_function(outputs, *targets) "
                         "-> per-example losses (n,)")
    known_types = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss, nn.GaussianNLLLoss,
                   nn.PoissonNLLLoss)
    if type(loss_function) not in known_types:
        return None  # (a subclass may redefine forward: the generic path is always right)
    m = loss_function
    if m.reduction != "none":
        raise ValueError(
            f"{type(m).__name__}(reduction={m.reduction!r}) reduces the losses over the batch: "
            "the GGN and the empirical Fisher need one loss per example (a 'mean' would also "
            f"scale every Hessian by 1/n). Use {type(m).__name__}(reduction='none')")
    if type(m) is nn.CrossEntropyLoss:
        if m.weight is not None:
            return None  # H scales with the target's class weight: generic path
        return _KnownLoss("CrossEntropyLoss", "softmax", m, classes=1,
                          ignore_index=m.ignore_index)
    if type(m) is nn.MSELoss:
        return _KnownLoss("MSELoss", "elementwise", m,
                          lambda f, t: torch.full((), 2.0, dtype=f.dtype, device=f.device))
    if type(m) is nn.BCEWithLogitsLoss:
        if m.weight is not None or m.pos_weight is not None:
            return None
        return _KnownLoss("BCEWithLogitsLoss", "elementwise", m, _bernoulli_h)
    if type(m) is nn.GaussianNLLLoss:
        eps = m.eps

        def gaussian_h(f, targets):
            if len(targets) < 2 or not isinstance(targets[1], torch.Tensor):
                raise ValueError("nn.GaussianNLLLoss needs the variances: batches "
                                 "(inputs, targets, var), called as loss(outputs, targets, var)")
            var = targets[1].detach().to(f.dtype)
            if var.shape != f.shape and var.shape == f.shape[:-1]:
                var = var.unsqueeze(-1)  # (torch's rule: the last dimension dropped = shared)
            return 1.0 / var.clamp(min=eps)
        return _KnownLoss("GaussianNLLLoss", "elementwise", m, gaussian_h)
    if not m.log_input:
        return None  # H = y / f² depends on the targets: generic path
    return _KnownLoss("PoissonNLLLoss", "elementwise", m, lambda f, t: torch.exp(f))


def _bernoulli_h(f, targets):
    s = torch.sigmoid(f)
    return s * (1 - s)


def _ggn_softmax_layout(known, out, targets, positions, function, class_dim, conv, info):
    """``(lay, kept)`` for a softmax loss: the `_SoftmaxLayout` of the outputs (the
    convention's under ``conv``) and the ``(n, S)`` 0/1 weights of the positions whose target
    is not ``ignore_index`` (None: all), or None where the closed form does not apply
    (probability targets: generic path)."""
    if _lm_active(conv, out):
        cd = output_class_dim(function, class_dim)
        lay = _SoftmaxLayout(out, info, function, -1 if cd is None else cd, conv, positions)
        return lay, None  # (the convention's weights exclude -100 and padding)
    y = targets[0] if targets else None
    if not isinstance(y, torch.Tensor) or y.is_floating_point():
        return None  # class probabilities: H = (Σ q)(diag p - ppᵀ), left to the generic path
    n = out.shape[0]
    if known.classes != "last" and out.dim() < 2:
        raise ValueError(f"{known.name} expects outputs (n, C) or (n, C, d1, ...), got "
                         f"shape {tuple(out.shape)}")
    cd = output_class_dim(function, class_dim) if known.classes == "last" else 1
    lay = _SoftmaxLayout(out, None, function, cd, None, positions)
    _, S, C = lay.fp.shape
    if y.numel() != n * S:
        raise ValueError(
            f"{known.name}: outputs of shape {tuple(out.shape)} have {n * S} positions of "
            f"{C} classes, the targets have shape {tuple(y.shape)} ({y.numel()} class "
            "indices); classes are " + ("along class_dim" if known.classes == "last" else
                                        "dimension 1, as for torch.nn.CrossEntropyLoss"))
    kept = None
    if known.ignore_index is not None:
        k = (y.reshape(n, S) != known.ignore_index)
        if not bool(k.all()):
            kept = k.to(out.dtype)
    return lay, kept


def _closed_form_ggn(known, out, targets, positions, function=None, class_dim=None, conv=None,
                     info=None):
    """``g`` (``(n, K)``) with ``J_gᵀ J_g = J_fᵀ H J_f`` from the closed form of ``known``, or
    None where it does not apply (probability targets of the cross-entropy: generic path)."""
    n = out.shape[0]
    if known.kind == "softmax":
        got = _ggn_softmax_layout(known, out, targets, positions, function, class_dim, conv,
                                  info)
        if got is None:
            return None
        lay, kept = got

        def roots(L):
            L = lay.weighted(L, 0.5)
            return L if kept is None else L * kept.reshape(kept.shape + (1, 1))
        return _softmax_root_g(lay.fp, roots)
    f = out
    h = known.curvature(f.detach(), targets)
    y = targets[0] if targets else None
    if isinstance(y, torch.Tensor) and torch.broadcast_shapes(f.shape, y.shape) != f.shape:
        raise ValueError(
            f"{known.name}: targets of shape {tuple(y.shape)} broadcast against outputs of "
            f"shape {tuple(f.shape)} to a larger shape: the loss would compare every output "
            "with every target. Give targets of the outputs' shape")
    if isinstance(h, torch.Tensor) and torch.broadcast_shapes(f.shape, h.shape) != f.shape:
        raise ValueError(f"{known.name}: the curvature of shape {tuple(h.shape)} does not "
                         f"broadcast to the outputs' shape {tuple(f.shape)}")
    D = f[0].numel() if n else f.shape[1:].numel()
    g = (f * torch.sqrt(h.clamp(min=0))).reshape(n, D)
    return g * _position_scale(D, positions) if positions == "mean" else g


def ggn_function(function, loss_function, positions="sum", target_key="labels",
                 class_dim=None, lm=None):
    """``g(*batch)`` of shape ``(n, D)`` (``D`` outputs per example) with
    ``J_gᵀ J_g = J_fᵀ H J_f``, ``H = ∇²_f ℓ`` the per-example loss's Hessian in output space:
    ``g = S_iᵀ f_i`` with ``S_i S_iᵀ = H_i`` (`psd_sqrt` of `output_hessians`),
    ``S_i`` a constant of the backward pass.

    The cross-entropy (``'cross_entropy'``, ``nn.CrossEntropyLoss``) has the closed-form output
    metric (`OutputTransform.metric`), used by the implicit products. ``lm`` (a
    `LMConvention`): the language model's positions and weights (`lm_positions`);
    a callable ``loss_function`` then gets the shifted logits ``(n, S, V)`` and labels
    ``(n, S)`` (-100 where a position does not count), a per-position result ``(n, S)``
    weighted by the positions' weights (generic output Hessians)."""
    check_positions(positions)
    check_class_dim(class_dim)
    lm = None if _takes_full_outputs(loss_function) else lm
    positions = _resolve_positions(positions, lm)
    known = known_loss(loss_function) if isinstance(loss_function, (str, torch.nn.Module)) \
        else None
    if known is None and (loss_function is None or not callable(loss_function)):
        raise TypeError("GGN needs loss_function(outputs, *targets) -> per-example losses (n,), "
                        "e.g. lambda out, y: F.cross_entropy(out, y, reduction='none'), a "
                        f"torch.nn loss module with reduction='none', or one of {LOSS_NAMES}")

    def lm_generic(out, info):
        """``(loss, targets)`` of a callable under the convention: the loss of the full
        outputs ``(m, T, V)`` given the convention's labels and weights ``(m, S)``, per
        example, so that its output Hessians are those of the model's own loss."""
        cd = output_class_dim(function, class_dim)
        cd = -1 if cd is None else cd
        _, y, w = lm_positions(out, info.batch, lm, cd, positions)
        if y is None:
            raise ValueError(f"the GGN needs the observed targets: the batch has no "
                             f"{lm.target_key!r} (dict batches) or targets (batch[1])")

        def loss(o, yy, ww):
            fp = class_positions(o, cd)
            fp = fp[:, :-1] if lm.causal else fp
            losses = loss_function(fp, yy)
            if losses.dim() == 2 and tuple(losses.shape) == tuple(ww.shape):
                return (losses * ww).sum(1)
            return losses
        return loss, (y, w)

    def g(out, info):
        if _lm_active(lm, out) and known is not None and known.kind != "softmax":
            raise ValueError(f"{known.name} is not a loss of a language model's logits; pass "
                             "causal_lm=False for other outputs")
        if _lm_active(lm, out) and known is None:
            generic_loss, targets = lm_generic(out, info)
            S = psd_sqrt(output_hessians(generic_loss, out, targets, positions))
            n = out.shape[0]
            return torch.einsum("nd,nde->ne", out.reshape(n, -1), S.to(out.dtype))
        targets = () if _lm_active(lm, out) else targets_of(info.batch, target_key, "the GGN")
        if known is not None:
            closed = _closed_form_ggn(known, out, targets, positions, function, class_dim, lm,
                                      info)
            if closed is not None:
                return closed
        n = out.shape[0]
        D = out[0].numel() if n else out.shape[1:].numel()
        need = n * D * D * out.element_size() * 3
        if need > 2 ** 26:  # (reading the memory available costs more than small Hessians)
            from .backend.consumers import check_fits
            check_fits(need,
                       f"the per-example output Hessians of the loss ({n} × {D}² entries)",
                       "use fewer outputs per example, smaller batches, or FIM(variant=...) / "
                       "EmpiricalFisher for this model")
        generic_loss = loss_function if known is None else known.losses
        S = psd_sqrt(output_hessians(generic_loss, out, targets, positions))
        return torch.einsum("nd,nde->ne", out.reshape(n, D), S.to(out.dtype))

    metric = None
    if known is not None and known.kind == "softmax":
        def metric(out, u, info):
            targets = () if _lm_active(lm, out) else targets_of(info.batch, target_key,
                                                               "the GGN")
            got = _ggn_softmax_layout(known, out, targets, positions, function, class_dim, lm,
                                      info)
            if got is None:  # probability targets: the generic output Hessians
                S = psd_sqrt(output_hessians(known.losses, out, targets, positions))
                n = out.shape[0]
                uf = u.reshape(n, -1)
                return torch.einsum("nde,ne->nd", S, torch.einsum("nde,nd->ne", S, uf))\
                    .reshape(u.shape)
            lay, kept = got
            hu = lay.weighted(softmax_metric(lay.fp, lay.view(u)))
            if kept is not None:
                hu = hu * kept.unsqueeze(2)
            return lay.unview(hu)
    t = OutputTransform(function, g, needs_batch=True, metric=metric)
    t.origin = ("nngeometry.variants.ggn_function(function, loss_function"
                + _origin_extras(positions, class_dim, lm) + ")")
    return t
