"""The Laplace approximation of a trained network's posterior, over any representation.

With ``θ*`` the trained parameters (the MAP under a Gaussian prior ``N(0, Λ⁻¹)``), the posterior
is approximated by ``N(θ*, H⁻¹)`` with the generalized Gauss-Newton posterior precision:

```
H = (1/T) Σ_i J_iᵀ Λ_i J_i + Λ = (n/T) · GGN + Λ
```

where ``Λ_i`` is the Hessian of the negative log-likelihood in the outputs (``diag(p) − ppᵀ``
for classification with softmax logits, ``I/σ²`` for Gaussian regression with noise ``σ``),
``GGN`` the mean over the ``n`` examples (``FIM`` in closed form: the two are equal for these
likelihoods) in the chosen representation, and ``T`` the temperature. ``Λ`` (the prior
precision) is a scalar, a dict ``{layer_id: scalar}`` or a per-parameter ``PVector``.

* **Log marginal likelihood** (evidence):

  ```
      log p(D) ≈ log p(D | θ*) − ½ θ*ᵀ Λ θ* − ½ (log det H − log det Λ)

  with ``log p(D | θ*)`` the summed log-likelihood at ``θ*`` (``−Σ CE`` for classification;
  ``−Σ ||f − y||² / (2σ²) − (n K / 2) log(2π σ²)`` for regression), divided by ``T``. It is
  differentiable w.r.t. a prior precision (and ``σ``) given as tensors that require grad, which
  `Laplace.optimize_prior_precision` uses.
  ```
* **GLM predictive**: ``f(x*) ~ N(f(x*; θ*), J* H⁻¹ J*ᵀ)``, with ``J*`` the Jacobian at the
  test inputs; for classification the class probabilities by the probit approximation
  ``softmax(f / sqrt(1 + π/8 · diag Σ))`` or by Monte-Carlo samples of ``f``.
* **Posterior samples**: ``θ = θ* + H^{-1/2} z``, ``z ~ N(0, I)``.

Everything uses the representation's exact damped operations (``(M + Λ/n)`` with exact damping
for KFAC, through the eigendecomposition of its factors): ``H = (n/T)(M + (T/n) Λ)``.
"""
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as tF
from tqdm.auto import tqdm

from .._bridge import _laplace_bridge
from ..backend.model_and_data import batch_size_of, default_function, iterate_batches
from .._entry import resolve_representation
from ..curvature import is_causal_lm
from ..jacobian import Jacobian
from ..layercollection import LayerCollection
from ..metrics import FIM, EmpiricalFisher, FIM_MonteCarlo, subnetwork_collection
from .. import object as _objects
from ..object.map import PFMapDense
from ..object.pspace import PMatDense, PMatDiag, PMatKFAC
from ..object.pspace.blocks.kron import get_unit
from ..object.vector import PVector

_LIKELIHOODS = ("classification", "regression", "reward_modeling")
_PRED_TYPES = ("glm", "nn")
_LINKS = ("probit", "bridge", "bridge_norm", "mc")


class Laplace:
    """Laplace approximation ``N(θ*, H⁻¹)`` (see the module docstring for the maths).

    Args:
        model: the trained network (its current parameters are ``θ*``).
        likelihood: ``'classification'`` (softmax logits, cross-entropy), ``'regression'``
            (Gaussian with noise ``sigma_noise``) or ``'reward_modeling'`` (laplace-torch's:
            fitted as a classification of pairs, the model's two logits for a pair being its
            rewards and the target the preferred one; its predictive is the rewards' Gaussian,
            ``(mean, variance)`` of ``f`` without noise, as for regression).
        representation: the ``PMat*`` class of the GGN (``PMatKFAC``, ``PMatEKFAC``, ``PMatDiag``,
            ``PMatBlockDiag``, ``PMatLowRank``, ``PMatDense``), or its name (``'kfac'``,
            ``'diag'``, ...).
        prior_precision: ``Λ``: a scalar, a dict ``{layer_id: scalar}`` (one per layer, weight
            and bias together), a ``PVector`` (one per parameter), or laplace-torch's 1-D tensor:
            of length 1 (scalar), of the number of parameter tensors (one per tensor, weight and
            bias apart, in the layer collection's order: laplace-torch's ``layerwise``) or of
            ``P`` (diagonal).
        prior_mean: ``m`` of the prior ``N(m, Λ⁻¹)``: a scalar, a 1-D tensor of length ``P`` or a
            ``PVector``; it enters the evidence's scatter ``(θ* − m)ᵀ Λ (θ* − m)``.
        sigma_noise: ``σ`` (regression).
        temperature: ``T``.
        layer_collection: the parameters treated by the approximation (default all;
            ``LayerCollection.from_model(model).last_layer()`` for a last-layer Laplace).
        function: ``function(*batch) -> outputs``, as for ``FIM`` (default: ``model(inputs)``,
            or ``model(**inputs).logits`` for dict batches).
        prior_mean: see above.
        curvature: the matrix ``M`` of ``H``: ``'ggn'`` (default: the GGN, the Fisher in closed
            form), ``'mc'`` (the Monte-Carlo Fisher, ``mc_samples`` targets drawn from the
            model per example: ``FIM_MonteCarlo``) or ``'ef'`` (the empirical Fisher of the
            observed targets: ``EmpiricalFisher``); laplace-torch reaches these through its
            backends.
        mc_samples: the targets per example for ``curvature='mc'``.
        target_key: for dict batches, the key of the targets (default ``'labels'``), as for
            ``FIM``; with a model that takes one tensor, map the inputs' key with ``function=``,
            e.g. ``function=lambda b: model(b['x'])`` and ``target_key='y'``.
        **representation_kwargs: passed to the build, e.g. ``separate_weight_and_bias=True``
            for KFAC with separate weight and bias blocks (laplace-torch's ``KronLaplace``
            layout), or ``subnetwork_indices=idx`` with ``PMatDense`` or ``PMatDiag`` (the
            diagonal's entries ``idx``): a subnetwork Laplace over
            the ``k`` parameters ``θ[idx]`` (flat indices in ``layer_collection``'s layout), the
            others fixed at ``θ*`` (the posterior is ``N(θ*[idx], H⁻¹)`` with the ``k × k``
            ``H = (n/T) GGN[idx][:, idx] + Λ``; ``sample`` draws those ``k`` parameters).
    """

    #: the key of the targets in dict batches (a class default: instances saved before it
    #: existed read it from here)
    target_key = "labels"

    def __init__(self, model, likelihood="classification", representation=PMatKFAC,
                 prior_precision=1.0, sigma_noise=1.0, temperature=1.0, layer_collection=None,
                 function=None, prior_mean=0.0, curvature="ggn", mc_samples=1,
                 target_key="labels", **representation_kwargs):
        if likelihood not in _LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r}: use 'classification', 'regression' or "
                             "'reward_modeling'")
        if likelihood != "regression" and not _is_one(sigma_noise):
            raise ValueError("sigma_noise is the regression noise: leave it at 1 for "
                             "classification")
        self.model = model
        self.likelihood = likelihood
        self.representation = resolve_representation(representation, "Laplace")
        self.prior_precision = prior_precision
        self.prior_mean = prior_mean
        self.sigma_noise = sigma_noise
        self.temperature = float(temperature)
        if curvature not in ("ggn", "ef", "mc"):
            raise ValueError(f"curvature={curvature!r}: use 'ggn' (closed form), 'mc' "
                             "(Monte-Carlo Fisher) or 'ef' (empirical Fisher)")
        self.curvature, self.mc_samples = curvature, int(mc_samples)
        self.layer_collection = layer_collection
        self._lc_arg = layer_collection
        self.function = function
        self.target_key = target_key
        self._fn = function if function is not None else default_function(model, target_key)
        self.subnetwork_indices = representation_kwargs.pop("subnetwork_indices", None)
        self.representation_kwargs = representation_kwargs
        self.ggn = None
        self.n = 0
        self.loss = None  # Σ_i of the negative log-likelihood's data term at θ* (see fit)

    # ------------------------------------------------------------------ fitting
    def _current_theta(self):
        """The model's parameters now, on the Laplace's layout (the subnetwork's entries
        only, for a subnetwork Laplace)."""
        theta = PVector.from_model(self.model, self.base_collection).detach().clone()
        if self.subnetwork_indices is None:
            return theta
        flat = theta.get_flat_representation()
        indices = self.layer_collection["subnetwork"].indices.to(flat.device)
        return PVector(self.layer_collection, vector_repr=flat[indices])

    def fit(self, loader, override=True):
        """Compute the GGN (mean over the examples) and the data term of the log-likelihood at
        the current parameters ``θ*``, over ``loader``: batches ``(inputs, targets)``, or dicts
        (Hugging Face style: ``model(**inputs)`` without the targets, ``.logits`` of the
        output, targets ``batch[target_key]``).

        Targets: classification, integer class labels ``(n,)`` in ``[0, C)`` (``(n, 1)`` is
        read as ``(n,)``); regression, the outputs' shape ``(n, K)`` (or ``(n,)`` for
        ``K = 1``). Other targets are refused (``ValueError`` saying what to pass).

        ``override=False`` (laplace-torch's online fit) adds this loader's examples to those
        already fitted: the curvature becomes ``(n₁ M₁ + n₂ M₂) / (n₁ + n₂)``, exact for the
        representations closed under sums (Dense, BlockDiag, Diag, LowRank); Kronecker factors are
        averaged (``factor_average``, the usual KFAC approximation of a sum, as laplace-torch
        does); others are refused. The data term adds up, ``θ*`` is the current parameters."""
        if isinstance(loader, (list, tuple, dict, torch.Tensor)):
            # in memory: the targets' kind is checked before the pass over the data
            for batch in iterate_batches(loader):
                self._targets(batch)
                break
        if not override and self.ggn is not None:
            return self._accumulate(loader)
        extra = dict(self.representation_kwargs)
        if self.subnetwork_indices is not None:
            extra["subnetwork_indices"] = self.subnetwork_indices
        self.ggn = self._curvature_of(loader, extra)
        # the layout the subnetwork's indices refer to (all layers by default)
        self.base_collection = self._lc_arg or LayerCollection.from_model(self.model)
        self.layer_collection = self.ggn.layer_collection
        self.theta_map = self._current_theta()
        self.n, self.loss, self.n_outputs = self._data_term(loader)
        return self

    def _curvature_of(self, loader, extra):
        if self._last_layer_fast():
            return self._last_layer_curvature(loader)
        if "subnetwork_indices" in extra and self.representation is PMatDiag:
            # a diagonal over a subnetwork: the whole diagonal (computed in one pass anyway),
            # restricted to the subnetwork's entries
            extra = dict(extra)
            idx = extra.pop("subnetwork_indices")
            full = self._curvature_of(loader, extra)
            idx, sub = subnetwork_collection(full.layer_collection, idx)
            return PMatDiag(sub, data=full.get_diag()[idx.to(full.get_diag().device)])
        common = dict(function=self.function, layer_collection=self._lc_arg,
                      target_key=self.target_key, **extra)
        variant = "classif_logits" if self._classif else "regression"
        if self.curvature == "ggn":
            return FIM(self.model, loader, self.representation, variant=variant, **common)
        if self.curvature == "mc":
            return FIM_MonteCarlo(self.model, loader, self.representation, variant=variant,
                                  trials=self.mc_samples, **common)
        loss_fn = None
        if self.likelihood == "regression":
            def loss_fn(out, y):
                d = out - y.reshape(out.shape)
                return 0.5 * (d.reshape(d.shape[0], -1) ** 2).sum(-1)
        return EmpiricalFisher(self.model, loader, self.representation, loss_function=loss_fn,
                               **common)

    # ------------------------------------------------------------------ last layer, no backward
    def _last_layer_fast(self):
        """The linear last layer of a classifier (``curvature='ggn'``, Dense / Diag / KFAC):
        its GGN in closed form from the layer's inputs and the softmax probabilities, one
        forward pass and no backward pass."""
        lc = self._lc_arg
        if (lc is None or len(lc.layers) != 1 or not self._classif
                or self.curvature != "ggn" or self.subnetwork_indices is not None
                or self.function is not None or self.representation_kwargs
                or self.representation not in (PMatDense, PMatDiag, PMatKFAC)):
            return False
        layer = next(iter(lc.layers.values()))
        return type(layer).__name__ == "LinearLayer"

    def _last_layer_curvature(self, loader):
        """``GGN = (1/n) Σ_i (x̃_i x̃_iᵀ) ⊗ Λ_i``, ``x̃_i = [x_i, 1]`` the layer's input,
        ``Λ_i = diag(p_i) − p_i p_iᵀ``, with ``Λ_i`` only ever applied as a product:

        * diagonal: ``W[c, j]``: ``(1/n) Σ_i x_ij² (p_ic − p_ic²)``, a ``(C, d)`` matrix product;
        * KFAC: ``A = (1/n) Σ_i x̃ x̃ᵀ``, ``G = (1/n) Σ_i Λ_i = diag(p̄) − PᵀP / n`` (the mean of
          the outputs' Hessians, as ``FIM``'s KFAC for this layer);
        * dense: ``δ_cc' Σ_i p_ic x̃_ij x̃_ij' − Σ_i (p_ic x̃_ij)(p_ic' x̃_ij')`` (for small layers:
          the matrix is ``(C(d+1))²``)."""
        lid, layer = next(iter(self._lc_arg.layers.items()))
        module = self._lc_arg.get_layerid_module_map(self.model)[lid]
        captured = []
        hook = module.register_forward_pre_hook(lambda m, inp: captured.append(inp[0].detach()))
        has_bias = layer.has_bias() if callable(layer.has_bias) else layer.has_bias
        C, d, bias = layer.out_features, layer.in_features, bool(has_bias)
        rep = self.representation
        acc, n = None, 0
        try:
            with torch.no_grad():
                for batch in iterate_batches(loader):
                    captured.clear()
                    out = self._outputs(batch)
                    x = captured[-1].reshape(out.shape[0], -1)
                    p = torch.softmax(out, dim=-1)
                    if bias:
                        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
                    if rep is PMatDiag:
                        part = ((p - p ** 2).T @ x ** 2,)  # (C, d+1)
                    elif rep is PMatKFAC:
                        part = (x.T @ x, torch.diag(p.sum(0)) - p.T @ p)
                    else:
                        px = (p[:, :, None] * x[:, None, :]).reshape(len(p), -1)
                        first = torch.einsum("ic,ij,ik->cjk", p, x, x)
                        dense = -(px.T @ px)
                        D = x.shape[1]
                        dense = dense.reshape(C, D, C, D)
                        dense[torch.arange(C), :, torch.arange(C), :] += first
                        part = (dense.reshape(C * D, C * D),)
                    acc = part if acc is None else tuple(a + b for a, b in zip(acc, part))
                    n += out.shape[0]
        finally:
            hook.remove()
        if n == 0:
            raise ValueError("the loader gave no examples")
        acc = tuple(a / n for a in acc)
        perm = layer.kfac_permutation().to(acc[0].device)  # flat index -> Kronecker index
        if rep is PMatKFAC:
            return PMatKFAC(self._lc_arg, data={lid: acc})
        if rep is PMatDiag:
            return PMatDiag(self._lc_arg, data=acc[0].reshape(-1)[perm])
        return PMatDense(self._lc_arg, data=acc[0][perm][:, perm])

    def _data_term(self, loader):
        n, loss, n_out = 0, 0.0, None
        with torch.no_grad():
            # the batches as the generator reads them: the data term and the GGN see the same
            for batch in iterate_batches(loader):
                out = self._outputs(batch)
                y = self._targets(batch, out)
                if self._classif:
                    loss += tF.cross_entropy(out, y, reduction="sum")
                else:
                    loss += 0.5 * ((out - y) ** 2).sum()
                n += out.shape[0]
                n_out = out[0].numel()
        if n == 0:
            raise ValueError("the loader gave no examples")
        return n, loss, n_out

    def _accumulate(self, loader):
        extra = dict(self.representation_kwargs)
        if self.subnetwork_indices is not None:
            extra["subnetwork_indices"] = self.subnetwork_indices
        new = self._curvature_of(loader, extra)
        n, loss, n_out = self._data_term(loader)
        if n_out != self.n_outputs:
            raise ValueError(f"the loader's examples have {n_out} outputs, the fitted ones "
                             f"{self.n_outputs}")
        w1, w2 = self.n / (self.n + n), n / (self.n + n)
        if isinstance(self.ggn, PMatKFAC):
            self.ggn = self.ggn.factor_average(new, w1, w2)
        else:
            try:
                self.ggn = self.ggn * w1 + new * w2
            except (NotImplementedError, TypeError) as err:
                raise NotImplementedError(
                    f"fit(override=False) with {type(self.ggn).__name__}: the sum of two such "
                    "matrices is not one; use PMatDense, PMatBlockDiag, PMatDiag, PMatLowRank "
                    "or PMatKFAC (factors averaged), or fit once on all the data") from err
        self.n, self.loss = self.n + n, self.loss + loss
        self.theta_map = self._current_theta()
        return self

    def _outputs(self, batch):
        out = self._fn(*batch)
        return out.reshape(out.shape[0], -1)

    def _targets(self, batch, out=None):
        """The batch's targets, checked against the likelihood (and the outputs ``(n, K)``
        when given): classification ``(n,)`` integer labels in ``[0, K)``, regression
        ``(n, K)`` in the outputs' dtype. A ``ValueError`` says what to pass otherwise."""
        first = batch[0]
        if isinstance(first, Mapping) and len(batch) == 1:
            if self.target_key not in first:
                raise ValueError(
                    f"Laplace.fit needs the targets, and the dict batch has no key "
                    f"{self.target_key!r} (its keys: {', '.join(map(repr, first))}); name the "
                    "targets' key with Laplace(..., target_key=...) (and, for a model that "
                    "takes one tensor, its input with function=lambda b: model(b[key])), or "
                    "pass batches (inputs, targets)")
            y = first[self.target_key]
        elif len(batch) < 2:
            raise ValueError(
                "Laplace.fit needs the targets (for the log-likelihood at θ*): the batches hold "
                "only inputs. Pass batches (inputs, targets), e.g. a DataLoader of "
                "TensorDataset(x, y)")
        else:
            y = batch[1]
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"Laplace.fit: the targets must be a tensor, got {type(y).__name__}")
        shape = tuple(y.shape)
        if self._classif:
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ValueError(
                    f"likelihood='classification' needs integer class labels (n,), got a "
                    f"{y.dtype} tensor of shape {shape}: use y.long() for whole-number labels, "
                    "y.argmax(-1) for one-hot or probability targets, or "
                    "likelihood='regression' for real-valued targets")
            if out is None:
                return y
            n, C = out.shape
            if y.dim() == 2 and y.shape[1] == 1:  # (n, 1): one label per example
                y = y[:, 0]
            if tuple(y.shape) != (n,):
                hint = (" For a language model's output layer, with the token positions as "
                        "the examples, use nngeometry.laplace.LastLayerLMLaplace."
                        if is_causal_lm(self.model) else "")
                raise ValueError(
                    f"likelihood='classification' needs one class label per example, shape "
                    f"({n},), for outputs of shape ({n}, {C}); got targets of shape {shape}. "
                    "Outputs with positions (sequences, images) need function= returning "
                    f"(n, C) and targets (n,).{hint}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= C):
                raise ValueError(
                    f"class labels must be in [0, {C}) for outputs of {C} classes, got labels "
                    f"from {int(y.min())} to {int(y.max())}")
            return y
        if out is None:
            return y
        n, K = out.shape
        if y.dim() == 0 or y.shape[0] != n or y[0].numel() != K:
            hint = (" Integer targets, one per example, look like class labels: use "
                    "likelihood='classification'." if not y.is_floating_point() and
                    y.numel() == n and K > 1 else "")
            raise ValueError(
                f"likelihood='regression' needs targets of the outputs' shape ({n}, {K}) (or "
                f"({n},) for one output), got shape {shape}.{hint}")
        return y.reshape(n, K).to(out.dtype)

    # ------------------------------------------------------------------ saving
    def state_dict(self):
        """What `load_state_dict` needs to restore the fitted approximation without the
        data: plain tensors, numbers and strings only (``torch.load`` with its defaults reads
        it). The model's parameters are not included (save ``model.state_dict()``). A subnetwork
        Laplace saves its flat indices (``'subnetwork_indices'``, in the base layout)."""
        self._check_fitted()
        prior = self.prior_precision
        if isinstance(prior, PVector):
            prior = prior.get_flat_representation().detach()
        return {"likelihood": self.likelihood, "representation": self.representation.__name__,
                "curvature": self.curvature, "ggn": self.ggn.data, "n": self.n,
                "loss": torch.as_tensor(self.loss).detach(), "n_outputs": self.n_outputs,
                "theta_map": self.theta_map.get_flat_representation().detach(),
                "prior_precision": prior, "prior_mean": self.prior_mean,
                "sigma_noise": self.sigma_noise, "temperature": self.temperature,
                "layer_ids": list(self.base_collection.layer_ids()),
                "subnetwork_indices": (None if self.subnetwork_indices is None else
                                       self.layer_collection["subnetwork"].indices.clone())}

    def load_state_dict(self, state):
        """Restore `state_dict` into a Laplace built with the same model, likelihood,
        representation and layer collection (a subnetwork Laplace's indices come from the
        state; a Laplace built with other ``subnetwork_indices`` is refused)."""
        for key, mine in (("likelihood", self.likelihood),
                          ("representation", self.representation.__name__),
                          ("curvature", self.curvature)):
            if state[key] != mine:
                raise ValueError(f"the state was saved with {key}={state[key]!r}, this Laplace "
                                 f"has {mine!r}: build it with the same {key}")
        base = self._lc_arg or LayerCollection.from_model(self.model)
        if list(base.layer_ids()) != state["layer_ids"]:
            raise ValueError(f"the state's layers {state['layer_ids']} are not this Laplace's "
                             f"{list(base.layer_ids())}: pass the same layer_collection")
        saved = state.get("subnetwork_indices")
        mine = self.subnetwork_indices
        if mine is not None:
            mine, _ = subnetwork_collection(base, mine)
            if saved is None or not torch.equal(mine, torch.as_tensor(saved).long().cpu()):
                raise ValueError("the state was saved with other subnetwork_indices than this "
                                 "Laplace's: build it without subnetwork_indices (the state's "
                                 "are used) or with the same ones")
        collection = base
        if saved is not None:
            idx, collection = subnetwork_collection(base, saved)
            self.subnetwork_indices = idx
        self.ggn = self.representation(collection, data=state["ggn"],
                                       **self.representation_kwargs)
        self.base_collection = base
        self.layer_collection = self.ggn.layer_collection
        self.theta_map = PVector(self.layer_collection, vector_repr=state["theta_map"])
        self.n, self.loss, self.n_outputs = state["n"], state["loss"], state["n_outputs"]
        self.prior_precision, self.prior_mean = state["prior_precision"], state["prior_mean"]
        self.sigma_noise, self.temperature = state["sigma_noise"], state["temperature"]
        return self

    @property
    def _classif(self):
        """Fitted as a classifier: classification, and reward modelling (Bradley-Terry: the
        logits of a pair are its two rewards, the target the preferred one)."""
        return self.likelihood in ("classification", "reward_modeling")

    def _check_fitted(self):
        if self.ggn is None:
            raise RuntimeError("call fit(loader) first: the Laplace approximation needs the GGN "
                               "of the training data")

    # ------------------------------------------------------------------ the posterior precision
    def _scale(self, sigma_noise=None):
        """``s`` with ``H = s · (M + Λ / s)``: ``s = n / (T σ²)`` (``n / (T σ⁴)`` for the
        empirical Fisher of regression, built from the gradients of ``½||f − y||²``, which are
        ``σ²`` times the log-likelihood's)."""
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        s = self.n / self.temperature
        if self.likelihood == "regression":
            s = s / sigma ** (4 if self.curvature == "ef" else 2)
        return s

    def _damping(self, prior, s):
        """``Λ / s`` in the form ``regul=`` takes."""
        if isinstance(prior, dict):
            return {k: v / s for k, v in prior.items()}
        if isinstance(prior, PVector):
            return prior * (1.0 / s) if not torch.is_tensor(s) else \
                PVector(prior.layer_collection, vector_repr=prior.get_flat_representation() / s)
        return prior / s

    def posterior_precision_logdet(self, prior_precision=None, sigma_noise=None):
        """``log det H``, with ``H = s (M + Λ/s)``, ``s = n/(T σ²)``."""
        self._check_fitted()
        prior = self._prior(prior_precision)
        s = self._scale(sigma_noise)
        if self._kron_prior(prior):
            return _KronPrior(self.ggn, self.prior_precision_diag(prior), s).logdet()
        P = self.layer_collection.numel()
        logs = torch.log(s) if torch.is_tensor(s) else math.log(s)
        return _call_exact(self.ggn, "logdet", regul=self._damping(prior, s)) + P * logs

    def _kron_prior(self, prior):
        """A per-parameter prior on KFAC: exact through `_KronPrior` (one precision per
        parameter tensor), where the representation's own damping takes one per layer."""
        return isinstance(prior, PVector) and type(self.ggn) is PMatKFAC

    # ------------------------------------------------------------------ the prior
    def _tensor_sizes(self):
        """``[(layer_id, numel)]`` of every parameter tensor, in the flat layout's order."""
        return [(lid, spec.numel()) for lid in self.layer_collection.layer_ids()
                for _, spec in self.layer_collection[lid].param_specs()]

    def _prior(self, prior=None):
        """The prior precision in a form the representations take: a scalar, a per-layer dict
        or a ``PVector`` (laplace-torch's 1-D tensors are converted; gradients flow through)."""
        prior = self.prior_precision if prior is None else prior
        if not torch.is_tensor(prior) or prior.dim() == 0:
            return prior
        if prior.dim() != 1:
            raise ValueError(f"prior_precision has shape {tuple(prior.shape)}: give a scalar, a "
                             "1-D tensor (one value, one per parameter tensor, or one per "
                             "parameter), a dict {layer_id: value} or a PVector")
        lc = self.layer_collection
        sizes = self._tensor_sizes()
        prior = prior.to(self.theta_map.dtype)
        if prior.numel() == 1:
            return prior.reshape(())
        if prior.numel() == len(sizes):
            counts = torch.tensor([n for _, n in sizes], device=prior.device)
            flat = torch.repeat_interleave(prior, counts)
            if not prior.requires_grad:
                # constant within every layer: a per-layer dict, which Kronecker forms keep
                per_layer, ok = {}, True
                for (lid, _), v in zip(sizes, prior.tolist()):
                    ok = ok and per_layer.setdefault(lid, v) == v
                if ok:
                    return per_layer
            return PVector(lc, vector_repr=flat)
        if prior.numel() == lc.numel():
            return PVector(lc, vector_repr=prior)
        raise ValueError(f"prior_precision has {prior.numel()} values: give 1, one per parameter "
                         f"tensor ({len(sizes)}) or one per parameter ({lc.numel()})")

    def prior_precision_diag(self, prior_precision=None):
        """The prior precision ``Λ`` as a flat tensor of length ``P`` (differentiable)."""
        self._check_fitted()
        return _prior_flat(self._prior(prior_precision), self.layer_collection,
                           self.theta_map.get_flat_representation())

    def _prior_mean_flat(self):
        m = self.prior_mean
        if isinstance(m, PVector):
            m = m.get_flat_representation()
        P = self.layer_collection.numel()
        if torch.is_tensor(m) and m.dim() > 0 and m.numel() != 1:
            if m.dim() != 1 or m.numel() != P:
                raise ValueError(f"prior_mean has shape {tuple(m.shape)}: give a scalar or a "
                                 f"1-D tensor of length P = {P}")
            return m.to(self.theta_map.dtype)
        return m.reshape(()) if torch.is_tensor(m) else m

    # ------------------------------------------------------------------ the evidence
    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None):
        """``log p(D) ≈ log p(D|θ*) − ½ (θ*−m)ᵀΛ(θ*−m) − ½ (log det H − log det Λ)``; a 0-d
        tensor, differentiable w.r.t. ``prior_precision`` / ``sigma_noise`` given as tensors
        (``prior_precision`` in any form the constructor takes)."""
        self._check_fitted()
        prior = self._prior(prior_precision)
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        if self._classif:
            loglik = -self.loss
        else:
            K = self.n_outputs
            sig2 = sigma ** 2
            log2pisig2 = torch.log(2 * math.pi * sig2) if torch.is_tensor(sig2) else \
                math.log(2 * math.pi * sig2)
            loglik = -self.loss / sig2 - 0.5 * self.n * K * log2pisig2
        loglik = loglik / self.temperature
        delta = self.theta_map.get_flat_representation() - self._prior_mean_flat()
        scatter = _prior_quadratic(prior, PVector(self.layer_collection, vector_repr=delta))
        logdet_prior = _prior_logdet(prior, self.layer_collection)
        logdet_post = self.posterior_precision_logdet(prior, sigma)
        return loglik - 0.5 * scatter - 0.5 * (logdet_post - logdet_prior)

    def optimize_prior_precision(self, pred_type="glm", method="marglik", n_steps=100, lr=0.1,
                                 init_prior_prec=None, prior_structure=None, val_loader=None,
                                 loss=None, log_prior_prec_min=-4, log_prior_prec_max=4,
                                 grid_size=100, link_approx="probit", n_samples=100,
                                 verbose=False, progress_bar=False, log_prior_prec_base=10.0,
                                 *, per_layer=False, init=None, grid=None, generator=None):
        """Choose the prior precision; sets and returns it (laplace-torch's arguments).

        * ``method='marglik'``: maximise `log_marginal_likelihood` by ``n_steps`` of Adam
          (learning rate ``lr``) on ``log Λ`` from ``init_prior_prec`` (alias ``init``; default
          the current scalar prior), with ``prior_structure``: ``'scalar'`` (default; returns a
          float), ``'layer'`` (one per layer, weight and bias together; returns a dict; alias
          ``per_layer=True``), ``'layerwise'`` (laplace-torch's: one per parameter tensor,
          weight and bias apart; returns a 1-D tensor) or ``'diag'`` (one per parameter;
          returns a 1-D tensor of length ``P``). KFAC takes all but ``'diag'`` (one precision
          per parameter tensor is exact there: a rank-one correction of each Kronecker block in
          its factors' eigenbases); EKFAC ``'scalar'`` and ``'layer'`` only.
        * ``method='gridsearch'``: the scalar of ``grid`` (default ``log_prior_prec_base **
          linspace(log_prior_prec_min, log_prior_prec_max, grid_size)``) with the lowest
          validation loss over ``val_loader``, the predictive being
          ``predictive(x, pred_type=pred_type, link_approx=link_approx, n_samples=n_samples)``.
          ``loss(prediction, y) -> float`` (summed over the batch); default the negative log
          predictive density: ``−Σ log p(y)`` of the predicted class probabilities for
          classification, the Gaussian ``N(y; mean, variance)`` for regression (laplace-torch
          uses the mean squared error there, which the GLM predictive's mean never changes).

        ``progress_bar=True`` shows a progress bar over the Adam steps or the grid; ``verbose``
        prints the value chosen. A bool as first argument is the former ``per_layer``.
        """
        self._check_fitted()
        if isinstance(pred_type, bool):
            per_layer, pred_type = pred_type, "glm"
        init = init_prior_prec if init is None else init
        if method == "gridsearch":
            return self._gridsearch(val_loader, grid, loss, log_prior_prec_min,
                                    log_prior_prec_max, grid_size, log_prior_prec_base,
                                    pred_type, link_approx, n_samples, generator, verbose,
                                    progress_bar)
        if method != "marglik":
            raise ValueError(f"method={method!r}: use 'marglik' or 'gridsearch'")
        structure = prior_structure or ("layer" if per_layer else "scalar")
        ids = list(self.layer_collection.layer_ids())
        sizes = {"scalar": None, "layer": len(ids), "layerwise": len(self._tensor_sizes()),
                 "diag": self.layer_collection.numel()}
        if structure not in sizes:
            raise ValueError(f"prior_structure={structure!r}: use 'scalar', 'layer', "
                             "'layerwise' or 'diag'")
        if structure == "diag" and type(self.ggn).__name__ in ("PMatKFAC", "PMatEKFAC"):
            raise NotImplementedError(f"prior_structure='diag' with {type(self.ggn).__name__}. "
                                      + _KRON_DIAG_PRIOR)
        start = self.prior_precision if init is None else init
        if isinstance(start, (dict, PVector)) or (torch.is_tensor(start) and start.numel() > 1):
            raise ValueError("optimize_prior_precision starts from a scalar (init_prior_prec=)")
        shape = () if sizes[structure] is None else (sizes[structure],)
        log_prior = torch.full(shape, math.log(float(start)), dtype=self.theta_map.dtype,
                               device=self.theta_map.device, requires_grad=True)

        def as_prior(t):
            if structure == "layer":
                return {lid: t[i] for i, lid in enumerate(ids)}
            return t

        opt = torch.optim.Adam([log_prior], lr=lr)
        for _ in tqdm(range(n_steps), desc="prior precision (marglik)", unit="step",
                      disable=not progress_bar, leave=False):
            opt.zero_grad()
            (-self.log_marginal_likelihood(as_prior(log_prior.exp()))).backward()
            opt.step()
        with torch.no_grad():
            value = log_prior.exp().detach()
            if structure == "scalar":
                self.prior_precision = float(value)
            elif structure == "layer":
                self.prior_precision = {lid: float(value[i]) for i, lid in enumerate(ids)}
            else:
                self.prior_precision = value
        if verbose:
            print(f"prior precision by marginal likelihood: {self.prior_precision}")
        return self.prior_precision

    def _gridsearch(self, val_loader, grid, loss, lo, hi, size, base, pred_type, link_approx,
                    n_samples, generator, verbose, progress_bar=False):
        if val_loader is None:
            raise ValueError("method='gridsearch' needs val_loader= (a validation loader of "
                             "(inputs, targets) batches)")
        if grid is None:
            grid = base ** torch.linspace(lo, hi, size, dtype=torch.float64)
        grid = [float(g) for g in grid]
        if not grid or min(grid) <= 0:
            raise ValueError("the grid of prior precisions must be non-empty and positive")
        if loss is None:
            loss = self._nlpd
        batches = list(iterate_batches(val_loader))
        saved, scores = self.prior_precision, []
        try:
            for g in tqdm(grid, desc="prior precision (grid)", unit="value",
                          disable=not progress_bar, leave=False):
                self.prior_precision = g
                total = 0.0
                for batch in batches:
                    pred = self.predictive(batch[0], link_approx=link_approx,
                                           n_samples=n_samples, generator=generator,
                                           pred_type=pred_type)
                    total += float(loss(pred, batch[1]))
                scores.append(total)
        finally:
            self.prior_precision = saved
        best = min(range(len(grid)), key=lambda i: (math.isnan(scores[i]), scores[i]))
        self.prior_precision = grid[best]
        if verbose:
            print(f"prior precision by grid search: {grid[best]} (loss {scores[best]})")
        return self.prior_precision

    def _nlpd(self, pred, y):
        """``−Σ log p(y)`` of a batch's predictive."""
        if self.likelihood == "reward_modeling":
            raise ValueError("grid search with likelihood='reward_modeling': pass loss= (the "
                             "predictive is the rewards' mean and variance)")
        if self.likelihood == "classification":
            return -torch.log(pred.gather(-1, y.reshape(-1, 1))).sum()
        mean, var = pred
        y = y.reshape(mean.shape)
        if var.dim() == mean.dim():  # diagonal_output
            var = torch.diag_embed(var)
        return -torch.distributions.MultivariateNormal(mean, var).log_prob(y).sum()

    # ------------------------------------------------------------------ the posterior
    def _precision_mv(self, v):
        """``H v`` for flat ``v`` of shape ``(P,)``."""
        s = self._scale()
        Mv = self.ggn.mv(PVector(self.layer_collection, vector_repr=v)).get_flat_representation()
        return s * Mv + self.prior_precision_diag() * v

    def log_prob(self, value, normalized=True):
        """``log N(value; θ*, H⁻¹)`` for flat parameters ``value`` (shape ``(P,)`` or
        ``(S, P)``): ``−½ (v−θ*)ᵀ H (v−θ*) + ½ log det H − (P/2) log 2π``, or only the first term
        with ``normalized=False``."""
        self._check_fitted()
        value = torch.as_tensor(value, dtype=self.theta_map.dtype)
        P = self.layer_collection.numel()
        if value.shape[-1] != P or value.dim() > 2:
            raise ValueError(f"value has shape {tuple(value.shape)}: give (P,) or (S, P) with "
                             f"P = {P}")
        d = value - self.theta_map.get_flat_representation()
        rows = d.reshape(-1, P)
        quad = torch.stack([torch.dot(r, self._precision_mv(r)) for r in rows])
        quad = quad.reshape(value.shape[:-1])
        if not normalized:
            return -0.5 * quad
        return -0.5 * quad + 0.5 * self.posterior_precision_logdet() - 0.5 * P * math.log(2 * math.pi)

    @property
    def posterior_precision(self):
        """``H = (n/T) M + Λ`` as a dense ``(P, P)`` tensor (small ``P`` only)."""
        self._check_fitted()
        return self._scale() * self.ggn.to_torch() + torch.diag(self.prior_precision_diag())

    @property
    def posterior_covariance(self):
        """``H⁻¹`` as a dense ``(P, P)`` tensor, through the representation's exact damped
        inverse (small ``P`` only)."""
        self._check_fitted()
        s = self._scale()
        prior = self._prior()
        if self._kron_prior(prior):
            eye = torch.eye(self.layer_collection.numel(), dtype=self.theta_map.dtype,
                            device=self.theta_map.device)
            return _KronPrior(self.ggn, self.prior_precision_diag(prior), s).solve(eye)
        return _call_exact(self.ggn, "inverse", regul=self._damping(prior, s)).to_torch() / s

    @property
    def posterior_variance(self):
        """The diagonal of ``H⁻¹``, shape ``(P,)``, without forming ``P × P`` where the
        representation's inverse has a cheap diagonal."""
        self._check_fitted()
        s = self._scale()
        if self._kron_prior(self._prior()):
            return torch.diagonal(self.posterior_covariance)
        inv = _call_exact(self.ggn, "inverse", regul=self._damping(self._prior(), s))
        return inv.get_diag() / s

    # ------------------------------------------------------------------ predictive
    def _jacobian(self, inputs):
        """``J*`` over the approximation's parameters, a PFMap ``(K, n*, P)``."""
        J = Jacobian(self.model, (inputs,), function=self._jac_function(),
                     layer_collection=self.base_collection)
        if self.subnetwork_indices is not None:  # the subnetwork's columns of J
            idx = self.layer_collection["subnetwork"].indices.to(J.to_torch().device)
            J = PFMapDense(self.layer_collection, data=J.to_torch()[..., idx])
        return J

    def _HinvJ(self, J):
        s = self._scale()
        prior = self._prior()
        if self._kron_prior(prior):
            Jt = J.to_torch()
            return Jt, _KronPrior(self.ggn, self.prior_precision_diag(prior), s).solve(Jt)
        HinvJ = _call_exact(self.ggn, "solve", J, regul=self._damping(self._prior(), s))
        return J.to_torch(), HinvJ.to_torch() / s  # (K, n, P)

    def functional_variance(self, inputs):
        """``Σ(x*) = J* H⁻¹ J*ᵀ`` for a batch of inputs: shape ``(n*, K, K)``."""
        self._check_fitted()
        Jt, St = self._HinvJ(self._jacobian(inputs))
        return torch.einsum("kip,lip->ikl", Jt, St)

    def functional_covariance(self, inputs):
        """The joint ``J* H⁻¹ J*ᵀ`` over a batch of inputs: shape ``(n* K, n* K)``, index
        ``i K + k`` for output ``k`` of input ``i`` (laplace-torch's layout)."""
        self._check_fitted()
        Jt, St = self._HinvJ(self._jacobian(inputs))
        K, n = Jt.shape[:2]
        return torch.einsum("kip,ljp->ikjl", Jt, St).reshape(n * K, n * K)

    def _jac_function(self):
        f = self._fn
        return lambda *b: f(*b).reshape(batch_size_of(b), -1)

    def __call__(self, x, pred_type="glm", joint=False, link_approx="probit", n_samples=100,
                 diagonal_output=False, generator=None):
        """laplace-torch's call: `predictive` with its argument order."""
        return self.predictive(x, link_approx=link_approx, n_samples=n_samples,
                               generator=generator, pred_type=pred_type, joint=joint,
                               diagonal_output=diagonal_output)

    def predictive(self, inputs, link_approx="probit", n_samples=100, generator=None,
                   pred_type="glm", joint=False, diagonal_output=False):
        """The posterior predictive at a batch of inputs (``n*`` of them, ``K`` outputs).

        ``pred_type='glm'`` (linearised network, ``f ~ N(f(x*; θ*), Σ)``, ``Σ = J* H⁻¹ J*ᵀ``):

        * classification, class probabilities ``(n*, C)`` by ``link_approx``: ``'probit'``
          (``softmax(f / sqrt(1 + π/8 diag Σ))``), ``'bridge'`` (the Laplace bridge: the mean
          of the Dirichlet ``α_k = (1 − 2/C + e^{μ_k} Σ_l e^{−μ_l} / C²) / Σ_kk`` matched to
          ``N(μ, Σ)`` after conditioning the logits on ``Σ_k f_k = 0``, which softmax does not
          see), ``'bridge_norm'`` (the same after dividing ``μ`` by ``√c`` and ``diag Σ`` by ``c``, ``c``
          chosen so that ``diag Σ`` has mean ``√(C/2)``: laplace-torch's normalised bridge) or
          ``'mc'``
          (``n_samples`` draws of ``f``);
        * regression: ``(mean (n*, K), variance (n*, K, K))``, the variance ``Σ + σ² I``
          (``(n*, K)`` with ``diagonal_output=True``);
        * ``joint=True``: the joint Gaussian over the batch, ``(mean (n* K,), covariance
          (n* K, n* K))`` (`functional_covariance`, plus ``σ² I`` for regression; for
          classification, of the logits).

        ``pred_type='nn'``: ``n_samples`` networks ``θ ~ N(θ*, H⁻¹)`` (`sample`) run at
        the inputs: classification, the mean of their softmax ``(n*, C)``; regression,
        ``(mean, covariance + σ² I)`` of their outputs (unbiased sample covariance).

        The second positional argument may be laplace-torch's ``pred_type`` (``'glm'`` or
        ``'nn'``): ``predictive(x, 'nn', 'mc', 50)`` reads as laplace-torch's
        ``predictive(x, pred_type, link_approx, n_samples)``.
        """
        if link_approx in _PRED_TYPES:
            # laplace-torch's positional order predictive(x, pred_type, link_approx, n_samples)
            pred_type, link_approx, n_samples = link_approx, n_samples, generator
            generator = None
            if not isinstance(link_approx, str):
                link_approx = "probit"
            if not isinstance(n_samples, int):
                n_samples = 100
        self._check_fitted()
        if pred_type not in _PRED_TYPES:
            raise ValueError(f"pred_type={pred_type!r}: use 'glm' or 'nn'")
        if link_approx not in _LINKS:
            raise ValueError(f"link_approx={link_approx!r}: use 'probit', 'bridge', "
                             "'bridge_norm' or 'mc'")
        if pred_type == "nn":
            if joint:
                raise ValueError("joint=True is the GLM predictive's: use pred_type='glm'")
            return self._nn_predictive(inputs, n_samples, generator, diagonal_output)
        # the checked computation first: it refuses a model it can't use (BatchNorm in
        # training mode, dropout) before the plain forward below could update its buffers
        if joint:
            cov = self.functional_covariance(inputs).detach()
            with torch.no_grad():
                f = self._outputs((inputs,))
            if self.likelihood == "regression":  # reward modelling: of the rewards, no noise
                cov = cov + self.sigma_noise ** 2 * torch.eye(cov.shape[0], dtype=cov.dtype,
                                                              device=cov.device)
            return f.reshape(-1), cov
        var = self.functional_variance(inputs).detach()
        with torch.no_grad():
            f = self._outputs((inputs,))
        if self.likelihood != "classification":
            if self.likelihood == "regression":
                K = var.shape[-1]
                var = var + self.sigma_noise ** 2 * torch.eye(K, dtype=var.dtype,
                                                              device=var.device)
            return f, (torch.diagonal(var, dim1=-2, dim2=-1) if diagonal_output else var)
        if link_approx == "probit":
            kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * torch.diagonal(var, dim1=-2, dim2=-1))
            return torch.softmax(f * kappa, dim=-1)
        if link_approx in ("bridge", "bridge_norm"):
            return _laplace_bridge(f, var, normalise=link_approx == "bridge_norm")
        if diagonal_output:
            var = torch.diag_embed(torch.diagonal(var, dim1=-2, dim2=-1))
        L = torch.linalg.cholesky(var + 1e-10 * var.diagonal(dim1=-2, dim2=-1).mean()
                                  * torch.eye(var.shape[-1], dtype=var.dtype, device=var.device))
        z = torch.randn((n_samples, *f.shape), generator=generator, dtype=f.dtype,
                        device=f.device)
        samples = f + torch.einsum("ikl,sil->sik", L, z)
        return torch.softmax(samples, dim=-1).mean(0)

    def _set_parameters(self, flat):
        """Write the approximation's parameters ``flat`` (shape ``(P,)``) into the model."""
        if self.subnetwork_indices is not None:
            full = PVector.from_model(self.model, self.base_collection).get_flat_representation()
            full = full.detach().clone()
            full[self.layer_collection["subnetwork"].indices.to(full.device)] = flat
            PVector(self.base_collection, vector_repr=full).copy_to_model(self.model)
        else:
            PVector(self.layer_collection, vector_repr=flat).copy_to_model(self.model)

    def _nn_predictive(self, inputs, n_samples, generator, diagonal_output):
        thetas = self.sample(n_samples, generator=generator)
        outs = []
        try:
            with torch.no_grad():
                for theta in thetas:
                    self._set_parameters(theta)
                    outs.append(self._outputs((inputs,)))
        finally:
            self._set_parameters(self.theta_map.get_flat_representation())
        fs = torch.stack(outs)  # (S, n*, K)
        if self.likelihood == "classification":
            return torch.softmax(fs, dim=-1).mean(0)
        mean = fs.mean(0)
        d = fs - mean
        cov = torch.einsum("sik,sil->ikl", d, d) / max(n_samples - 1, 1)
        if self.likelihood == "regression":
            cov = cov + self.sigma_noise ** 2 * torch.eye(cov.shape[-1], dtype=cov.dtype,
                                                          device=cov.device)
        return mean, (torch.diagonal(cov, dim1=-2, dim2=-1) if diagonal_output else cov)

    def sample(self, n_samples=1, generator=None):
        """``n_samples`` posterior draws ``θ* + H^{-1/2} z``, shape ``(n_samples, P)``."""
        self._check_fitted()
        s = self._scale()
        if self._kron_prior(self._prior()):
            raise NotImplementedError(
                "sample with KFAC and a prior that differs between weight and bias: H^{-1/2} "
                "has no Kronecker form there; use one precision per layer, or PMatDense / "
                "PMatDiag")
        P = self.layer_collection.numel()
        dt = self.theta_map.dtype
        z = torch.randn((n_samples, 1, P), generator=generator, dtype=dt)
        root = _call_exact(self.ggn, "pow", -0.5, regul=self._damping(self._prior(), s))
        zmap = PFMapDense(self.layer_collection, data=z.transpose(0, 1).contiguous())
        draws = root.mmap(zmap).to_torch()[0] / math.sqrt(s)  # (n_samples, P)
        return self.theta_map.get_flat_representation() + draws


_STRUCTURES = {"full": "PMatDense", "diag": "PMatDiag", "kron": "PMatKFAC",
               "lowrank": "PMatLowRank"}


def marglik_training(model, train_loader, likelihood="classification", hessian_structure="kron",
                     backend=None, optimizer_cls=torch.optim.Adam, optimizer_kwargs=None,
                     scheduler_cls=None, scheduler_kwargs=None, n_epochs=300, lr_hyp=0.1,
                     prior_structure="layerwise", n_epochs_burnin=0, n_hypersteps=10,
                     marglik_frequency=1, prior_prec_init=1.0, sigma_noise_init=1.0,
                     temperature=1.0, fix_sigma_noise=False, progress_bar=False,
                     enable_backprop=False, dict_key_x="input_ids", dict_key_y="labels", *,
                     representation=None, curvature="ggn", **representation_kwargs):
    """Train a network and its prior precision (and ``σ`` for regression) jointly by the
    Laplace marginal likelihood (Immer et al., 2021), with laplace-torch's arguments.

    Every epoch trains the network on the negative log joint per example, in laplace-torch's
    scale: ``mean_i ℓ_i + c · ½ θᵀΛθ / N`` per batch, ``N`` the examples of an epoch, with
    ``ℓ_i`` the cross-entropy and ``c = T`` (classification), or ``ℓ_i = ||f_i − y_i||²`` and
    ``c = 2σ²T`` (regression: the Gaussian negative log-likelihood times ``2σ²T``). Every
    ``marglik_frequency`` epochs from ``n_epochs_burnin`` on, a `Laplace` is fitted at
    the current parameters and ``n_hypersteps`` Adam steps (learning rate ``lr_hyp``) on
    ``log Λ`` (and ``log σ`` unless ``fix_sigma_noise``) maximise its evidence. The network,
    prior and ``σ`` of the best evidence (after the last step of a round) are kept and a final
    Laplace is fitted with them.

    Args:
        model: the network (trained in place).
        train_loader: its training batches (``(x, y)`` or dicts).
        likelihood: ``'classification'`` or ``'regression'``.
        hessian_structure: ``'full'``, ``'diag'``, ``'kron'`` or ``'lowrank'`` (our
            ``PMatDense``, ``PMatDiag``, ``PMatKFAC``, ``PMatLowRank``); ``representation=`` a
            ``PMat*`` class instead.
        backend: laplace-torch's curvature backend: not used (pass ``None``); ``curvature=``
            chooses ``'ggn'``, ``'mc'`` or ``'ef'``.
        optimizer_cls: the network's optimiser class (Adam).
        optimizer_kwargs: its arguments (a ``weight_decay`` is refused: the prior is the
            weight decay).
        scheduler_cls: a learning-rate scheduler class, stepped every batch as laplace-torch
            does, or None.
        scheduler_kwargs: its arguments.
        n_epochs: epochs of training.
        lr_hyp: Adam's learning rate on the log hyper-parameters.
        prior_structure: ``'scalar'``, ``'layer'`` (one per layer), ``'layerwise'`` (one per
            parameter tensor; exact with KFAC, not EKFAC) or ``'diag'`` (not KFAC, EKFAC).
        n_epochs_burnin: no hyper-parameter step before this epoch.
        n_hypersteps: hyper-parameter steps per round.
        marglik_frequency: a round every this many epochs.
        prior_prec_init: the initial prior precision (a scalar).
        sigma_noise_init: the initial ``σ`` (regression).
        temperature: ``T``.
        fix_sigma_noise: keep ``σ = sigma_noise_init``.
        progress_bar: show a progress bar over the epochs.
        enable_backprop: accepted for laplace-torch's signature; not used.
        dict_key_x: accepted for laplace-torch's signature (dict batches pass every key but
            the targets' to the model).
        dict_key_y: the targets' key of dict batches.
        representation: a ``PMat*`` class, instead of ``hessian_structure``.
        curvature: ``'ggn'``, ``'mc'`` or ``'ef'`` (see `Laplace`).
        **representation_kwargs: passed to `Laplace`.

    Returns:
        ``(laplace, model, margliks, losses)``: the final `Laplace`, the model (its best
        parameters loaded), the negative log marginal likelihood after every hyper-parameter
        step, and the training loss of every epoch.
    """
    if backend is not None:
        raise ValueError("backend= is laplace-torch's curvature backend: leave it None and "
                         "choose curvature='ggn' | 'mc' | 'ef'")
    if representation is not None:
        representation = resolve_representation(representation, "marglik_training")
    if representation is None:
        if hessian_structure not in _STRUCTURES:
            raise ValueError(f"hessian_structure={hessian_structure!r}: use one of "
                             f"{list(_STRUCTURES)} or representation=")
        representation = getattr(_objects, _STRUCTURES[hessian_structure])
    if prior_structure == "diag" and representation.__name__ == "PMatKFAC":
        raise NotImplementedError("prior_structure='diag' with PMatKFAC. " + _KRON_DIAG_PRIOR)
    if prior_structure in ("layerwise", "diag") and representation.__name__ == "PMatEKFAC":
        raise NotImplementedError(
            f"prior_structure={prior_structure!r} with PMatEKFAC: a precision that differs "
            "inside a Kronecker block has no exact form there; use prior_structure='layer' or "
            "'scalar', or PMatKFAC (exact with one precision per parameter tensor)")
    if likelihood not in _LIKELIHOODS:
        raise ValueError(f"likelihood={likelihood!r}: use 'classification' or 'regression'")
    optimizer_kwargs = dict(optimizer_kwargs or {})
    if optimizer_kwargs.get("weight_decay", 0):
        raise ValueError("weight_decay: the prior precision is the weight decay here, learnt by "
                         "marginal likelihood; drop it from optimizer_kwargs")
    lc = LayerCollection.from_model(model)
    modules = lc.get_layerid_module_map(model)
    params = lc.parameters(modules)
    like = params[0].detach()
    ids = list(lc.layer_ids())
    counts = [spec.numel() for lid in ids for _, spec in lc[lid].param_specs()]
    per_layer = [lc[lid].numel() for lid in ids]
    sizes = {"scalar": (), "layer": (len(ids),), "layerwise": (len(counts),), "diag": (lc.numel(),)}
    if prior_structure not in sizes:
        raise ValueError(f"prior_structure={prior_structure!r}: use 'scalar', 'layer', "
                         "'layerwise' or 'diag'")
    log_prior = torch.full(sizes[prior_structure], math.log(prior_prec_init), dtype=like.dtype,
                           device=like.device, requires_grad=True)
    hyper = [log_prior]
    log_sigma = None
    if likelihood == "regression" and not fix_sigma_noise:
        log_sigma = torch.full((), math.log(sigma_noise_init), dtype=like.dtype,
                               device=like.device, requires_grad=True)
        hyper.append(log_sigma)

    def prior_of(lp):
        lam = lp.exp()
        if prior_structure == "layer":
            return {lid: lam[i] for i, lid in enumerate(ids)}
        return lam

    def flat_prior(lam):
        if prior_structure == "scalar":
            return lam
        reps = per_layer if prior_structure == "layer" else counts
        if prior_structure == "diag":
            return lam
        return torch.repeat_interleave(lam, torch.tensor(reps, device=lam.device))

    def sigma_now():
        if likelihood == "classification":
            return 1.0
        return sigma_noise_init if log_sigma is None else log_sigma.exp()

    forward = default_function(model, dict_key_y)
    probe = Laplace(model, likelihood, representation, target_key=dict_key_y)  # target checks
    optimizer = optimizer_cls(model.parameters(), **optimizer_kwargs)
    scheduler = scheduler_cls(optimizer, **(scheduler_kwargs or {})) if scheduler_cls else None
    hyper_opt = torch.optim.Adam(hyper, lr=lr_hyp)
    try:
        N = len(train_loader.dataset)
    except (AttributeError, TypeError):
        N = sum(batch_size_of(tuple(b)) for b in iterate_batches(train_loader))
    best, best_state, margliks, losses = math.inf, None, [], []
    for epoch in tqdm(range(1, n_epochs + 1), desc="marglik training", unit="epoch",
                      disable=not progress_bar, leave=False):
        total = 0.0
        for batch in iterate_batches(train_loader):
            batch = tuple(batch)
            optimizer.zero_grad()
            out = forward(*batch)
            y = probe._targets(batch, out.detach().reshape(out.shape[0], -1))
            with torch.no_grad():
                lam = flat_prior(log_prior.exp())
                sig = sigma_now()
                sig = float(sig) if torch.is_tensor(sig) else sig
            if likelihood == "classification":
                data = tF.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
                c = temperature
            else:
                o = out.reshape(out.shape[0], -1)
                data = ((o - y.reshape(o.shape)) ** 2).sum() / o.shape[0]
                c = 2 * sig ** 2 * temperature
            theta = torch.cat([p.reshape(-1) for p in params])
            m = out.shape[0]
            loss = data + c * 0.5 * (lam * theta ** 2).sum() / N
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * m
        losses.append(total / N)
        if epoch % marglik_frequency != 0 or epoch < n_epochs_burnin:
            continue
        with torch.no_grad():
            sig0 = sigma_now()
        la = Laplace(model, likelihood, representation,
                     prior_precision=prior_of(log_prior.detach()), sigma_noise=(
                         float(sig0) if torch.is_tensor(sig0) else sig0),
                     temperature=temperature, curvature=curvature, target_key=dict_key_y,
                     **representation_kwargs).fit(train_loader)
        for _ in range(n_hypersteps):
            hyper_opt.zero_grad()
            # the hyper-parameters this evidence is of (kept with it: the step moves them)
            evaluated = (log_prior.detach().clone(),
                         None if log_sigma is None else log_sigma.detach().clone())
            sigma = log_sigma.exp() if log_sigma is not None else None
            neg = -la.log_marginal_likelihood(prior_of(log_prior), sigma)
            neg.backward()
            hyper_opt.step()
            margliks.append(float(neg))
        if margliks[-1] < best:
            best = margliks[-1]
            best_state = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                          *evaluated)
    if best_state is not None:
        model.load_state_dict(best_state[0])
        with torch.no_grad():
            log_prior.copy_(best_state[1])
            if log_sigma is not None:
                log_sigma.copy_(best_state[2])
    with torch.no_grad():
        final_prior = prior_of(log_prior.detach())
        if prior_structure == "layer":
            final_prior = {k: float(v) for k, v in final_prior.items()}
        elif prior_structure == "scalar":
            final_prior = float(final_prior)
        sigma = sigma_now()
        sigma = float(sigma) if torch.is_tensor(sigma) else sigma
    la = Laplace(model, likelihood, representation, prior_precision=final_prior,
                 sigma_noise=sigma, temperature=temperature, curvature=curvature,
                 target_key=dict_key_y, **representation_kwargs).fit(train_loader)
    return la, model, margliks, losses


# ---------------------------------------------------------------------- KFAC, per-entry prior
#: why a general per-parameter prior has no Kronecker form, and what to use instead
_KRON_DIAG_PRIOR = (
    "A per-parameter (diagonal) prior has no exact Kronecker form: in the factors' eigenbases "
    "diag(λ) becomes a dense P × P matrix, so log det H and H⁻¹ would cost the dense O(P³). "
    "KFAC takes one precision per layer or per parameter tensor (prior_structure='layer' or "
    "'layerwise', exact with PMatKFAC); for a per-parameter prior use a PMatDiag or PMatDense "
    "representation")
class _KronPrior:
    """``H = s · KFAC + diag(Λ)`` for a KFAC matrix and a prior that, in each layer's Kronecker
    layout ``(d_G, d_A)``, is ``I ⊗ diag(d_A)`` with ``d_A = λ 1 + δ e_k`` (one coordinate
    apart: the bias column of ``[W | b]`` with its own precision). Each layer's block is, in
    ``G``'s eigenbasis ``(g_j)`` and ``A``'s ``(a_i, U_A)``, ``⊕_j (diag(s g_j a + λ) + δ u uᵀ)``
    with ``u = U_Aᵀ e_k``: a diagonal plus a rank one, so ``log det`` (matrix determinant lemma)
    and solves (Sherman-Morrison) are exact and cost ``O(d_G d_A)`` per layer after the factors'
    eigendecompositions."""

    def __init__(self, ggn, prior_flat, s):
        self.s, self.units = s, []
        lc = ggn.layer_collection
        for lid in lc.layer_ids():
            A, G = get_unit(ggn.data, lid)
            layer = lc[lid]
            perm = layer.kfac_permutation()
            sl = lc.slice(lid)
            lam = prior_flat[sl]
            dG = G.shape[0]
            dA = A.shape[0]
            kron = torch.zeros(dG * dA, dtype=lam.dtype, device=lam.device)
            kron = kron.index_put((perm.to(lam.device),), lam).reshape(dG, dA)
            base = kron[0]
            if not torch.equal(kron.detach(), base.detach().expand(dG, dA)):
                raise NotImplementedError(
                    f"layer '{lid}': the prior precision is not the same for every output unit "
                    f"(in the Kronecker layout). {_KRON_DIAG_PRIOR}")
            vals = base.detach()
            uniq, counts = torch.unique(vals, return_counts=True)
            if len(uniq) == 1:
                k = dA - 1
            elif len(uniq) == 2 and int(counts.min()) == 1:
                rare = uniq[int(counts.argmin())] if int(counts.max()) > 1 else vals[-1]
                k = int((vals == rare).nonzero().flatten()[-1])
            else:
                raise NotImplementedError(
                    f"layer '{lid}': the prior precision differs on several input coordinates "
                    f"of the Kronecker layout. {_KRON_DIAG_PRIOR}")
            lam0 = base[(k + 1) % dA] if dA > 1 else base[0]
            delta = base[k] - lam0
            a, UA = _eig(A)
            g, UG = _eig(G)
            if UA is not None:
                u = UA[k]
            else:
                u = torch.zeros(dA, dtype=A.dtype, device=A.device)
                u[k] = 1.0
            self.units.append((sl, perm, dG, dA, a, UA, g, UG, lam0, delta, u))

    def logdet(self):
        total = 0.0
        for _, _, _, _, a, _, g, _, lam0, delta, u in self.units:
            c = self.s * g[:, None] * a[None, :] + lam0  # (d_G, d_A)
            total = total + torch.log(c).sum() + torch.log1p(delta * (u ** 2 / c).sum(-1)).sum()
        return total

    def solve(self, V):
        """``H⁻¹ V`` for ``V`` of shape ``(..., P)`` in the flat layout."""
        out = torch.empty_like(V)
        for sl, perm, dG, dA, a, UA, g, UG, lam0, delta, u in self.units:
            v = V[..., sl]
            vk = v.new_empty(v.shape)
            vk[..., perm.to(v.device)] = v
            vk = vk.reshape(*v.shape[:-1], dG, dA)
            t = _to_basis(vk, UG, UA)
            c = self.s * g[:, None] * a[None, :] + lam0
            tc = t / c
            uc = u / c  # (d_G, d_A)
            coef = (tc * u).sum(-1, keepdim=True) / (1 + delta * (u * uc).sum(-1, keepdim=True))
            x = tc - delta * uc * coef
            xk = _from_basis(x, UG, UA).reshape(*v.shape[:-1], dG * dA)
            out[..., sl] = xk[..., perm.to(v.device)]
        return out


def _eig(F):
    if F.dim() == 1:
        return F, None
    w, U = torch.linalg.eigh(F)
    return w.clamp_min(0), U


def _to_basis(V, UG, UA):
    if UG is not None:
        V = UG.transpose(-1, -2) @ V
    if UA is not None:
        V = V @ UA
    return V


def _from_basis(V, UG, UA):
    if UG is not None:
        V = UG @ V
    if UA is not None:
        V = V @ UA.transpose(-1, -2)
    return V


# ---------------------------------------------------------------------- helpers
def _call_exact(M, name, *args, regul):
    """``M.<name>(*args, regul=regul)`` with exact damping (every representation takes
    ``damping='exact'``; KFAC's π-damping is the default of its solve / inverse / pow)."""
    return getattr(M, name)(*args, regul=regul, damping="exact")


def _prior_quadratic(prior, theta):
    """``θᵀ Λ θ``."""
    if isinstance(prior, dict):
        d = theta.get_dict_representation()
        return sum(prior.get(lid, 0.0) * sum((t ** 2).sum() for t in d[lid]) for lid in d)
    if isinstance(prior, PVector):
        return (prior.get_flat_representation() * theta.get_flat_representation() ** 2).sum()
    return prior * (theta.get_flat_representation() ** 2).sum()


def _prior_flat(prior, layer_collection, like):
    """``Λ`` as a flat tensor of length ``P`` (``like``: a tensor giving dtype and device)."""
    P = layer_collection.numel()
    if isinstance(prior, PVector):
        return prior.get_flat_representation()
    if isinstance(prior, dict):
        return torch.cat([prior[lid] * torch.ones(layer_collection[lid].numel(),
                                                  dtype=like.dtype, device=like.device)
                          for lid in layer_collection.layer_ids()])
    return prior * torch.ones(P, dtype=like.dtype, device=like.device)


def _prior_logdet(prior, layer_collection):
    """``log det Λ``."""
    if isinstance(prior, dict):
        missing = [lid for lid in layer_collection.layer_ids() if lid not in prior]
        if missing:
            raise ValueError(f"the prior precision has no value for layers {missing}: a prior "
                             "needs a positive precision for every parameter")
        return sum(layer_collection[lid].numel() * _log(prior[lid])
                   for lid in layer_collection.layer_ids())
    if isinstance(prior, PVector):
        return torch.log(prior.get_flat_representation()).sum()
    return layer_collection.numel() * _log(prior)


def _log(x):
    return torch.log(x) if torch.is_tensor(x) else math.log(x)


def _is_one(x):
    return float(x) == 1.0


__all__ = ["Laplace", "marglik_training"]
