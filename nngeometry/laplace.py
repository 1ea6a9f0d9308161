"""The Laplace approximation of a trained network's posterior, over any representation.

With ``θ*`` the trained parameters (the MAP under a Gaussian prior ``N(0, Λ⁻¹)``), the posterior
is approximated by ``N(θ*, H⁻¹)`` with the generalized Gauss-Newton posterior precision::

    H = (1/T) Σ_i J_iᵀ Λ_i J_i + Λ = (n/T) · GGN + Λ

where ``Λ_i`` is the Hessian of the negative log-likelihood in the outputs (``diag(p) − ppᵀ``
for classification with softmax logits, ``I/σ²`` for Gaussian regression with noise ``σ``),
``GGN`` the mean over the ``n`` examples (``FIM`` in closed form: the two are equal for these
likelihoods) in the chosen representation, and ``T`` the temperature. ``Λ`` (the prior
precision) is a scalar, a dict ``{layer_id: scalar}`` or a per-parameter ``PVector``.

* **Log marginal likelihood** (evidence)::

      log p(D) ≈ log p(D | θ*) − ½ θ*ᵀ Λ θ* − ½ (log det H − log det Λ)

  with ``log p(D | θ*)`` the summed log-likelihood at ``θ*`` (``−Σ CE`` for classification;
  ``−Σ ||f − y||² / (2σ²) − (n K / 2) log(2π σ²)`` for regression), divided by ``T``. It is
  differentiable w.r.t. a prior precision (and ``σ``) given as tensors that require grad, which
  :meth:`Laplace.optimize_prior_precision` uses.
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

from .backend.batches import default_function, iterate_batches
from .jacobian import Jacobian
from .layercollection import LayerCollection
from .metrics import FIM
from .object.map import PFMapDense
from .object.pspace import PMatKFAC
from .object.vector import PVector

_LIKELIHOODS = ("classification", "regression")


class Laplace:
    """Laplace approximation ``N(θ*, H⁻¹)`` (see the module docstring for the maths).

    Args:
        model: the trained network (its current parameters are ``θ*``).
        likelihood: ``'classification'`` (softmax logits, cross-entropy) or ``'regression'``
            (Gaussian with noise ``sigma_noise``).
        representation: the ``PMat*`` class of the GGN (``PMatKFAC``, ``PMatEKFAC``, ``PMatDiag``,
            ``PMatBlockDiag``, ``PMatLowRank``, ``PMatDense``), or its name (``'kfac'``,
            ``'diag'``, ...).
        prior_precision: ``Λ``: a scalar, a dict ``{layer_id: scalar}``, or a ``PVector``.
        sigma_noise: ``σ`` (regression).
        temperature: ``T``.
        layer_collection: the parameters treated by the approximation (default all;
            ``LayerCollection.from_model(model).last_layer()`` for a last-layer Laplace).
        function: ``function(*batch) -> outputs``, as for ``FIM``.
        target_key: for dict batches, the key of the targets (default ``'labels'``), as for
            ``FIM``; with a model that takes one tensor, map the inputs' key with ``function=``,
            e.g. ``function=lambda b: model(b['x'])`` and ``target_key='y'``.
        **representation_kwargs: passed to the build, e.g. ``separate_weight_and_bias=True``
            for KFAC with separate weight and bias blocks (laplace-torch's ``KronLaplace``
            layout), or ``subnetwork_indices=idx`` with ``PMatDense``: a subnetwork Laplace over
            the ``k`` parameters ``θ[idx]`` (flat indices in ``layer_collection``'s layout), the
            others fixed at ``θ*`` (the posterior is ``N(θ*[idx], H⁻¹)`` with the ``k × k``
            ``H = (n/T) GGN[idx][:, idx] + Λ``; ``sample`` draws those ``k`` parameters).
    """

    #: the key of the targets in dict batches (a class default: instances saved before it
    #: existed read it from here)
    target_key = "labels"

    def __init__(self, model, likelihood="classification", representation=PMatKFAC,
                 prior_precision=1.0, sigma_noise=1.0, temperature=1.0, layer_collection=None,
                 function=None, target_key="labels", **representation_kwargs):
        if likelihood not in _LIKELIHOODS:
            raise ValueError(f"likelihood={likelihood!r}: use 'classification' or 'regression'")
        if likelihood == "classification" and not _is_one(sigma_noise):
            raise ValueError("sigma_noise is the regression noise: leave it at 1 for "
                             "classification")
        self.model = model
        self.likelihood = likelihood
        self.representation = representation
        self.prior_precision = prior_precision
        self.sigma_noise = sigma_noise
        self.temperature = float(temperature)
        self.layer_collection = layer_collection
        self.function = function
        self.target_key = target_key
        self.subnetwork_indices = representation_kwargs.pop("subnetwork_indices", None)
        self.representation_kwargs = representation_kwargs
        self.ggn = None
        self.n = 0
        self.loss = None  # Σ_i of the negative log-likelihood's data term at θ* (see fit)

    # ------------------------------------------------------------------ fitting
    def fit(self, loader):
        """Compute the GGN (mean over the examples) and the data term of the log-likelihood at
        the current parameters ``θ*``, over ``loader`` (batches ``(inputs, targets)``, or dicts
        with the targets under ``target_key``).

        Targets: classification, integer class labels ``(n,)`` in ``[0, C)`` (``(n, 1)`` is
        read as ``(n,)``); regression, the outputs' shape ``(n, K)`` (or ``(n,)`` for
        ``K = 1``). Other targets are refused (``ValueError`` saying what to pass)."""
        variant = "classif_logits" if self.likelihood == "classification" else "regression"
        extra = dict(self.representation_kwargs)
        if self.subnetwork_indices is not None:
            extra["subnetwork_indices"] = self.subnetwork_indices
        if isinstance(loader, (list, tuple, dict, torch.Tensor)):
            # in memory: the targets' kind is checked before the pass over the data
            for batch in iterate_batches(loader):
                self._targets(batch)
                break
        self.ggn = FIM(self.model, loader, self.representation, variant=variant,
                       function=self.function, layer_collection=self.layer_collection,
                       target_key=self.target_key, **extra)
        # the layout the subnetwork's indices refer to (all layers by default)
        self.base_collection = self.layer_collection or LayerCollection.from_model(self.model)
        self.layer_collection = self.ggn.layer_collection
        theta = PVector.from_model(self.model, self.base_collection).detach().clone()
        if self.subnetwork_indices is not None:
            flat = theta.get_flat_representation()
            theta = PVector(self.layer_collection,
                            vector_repr=flat[self.layer_collection["subnetwork"].indices.to(flat.device)])
        self.theta_map = theta
        n, loss, n_out = 0, 0.0, None
        with torch.no_grad():
            # the batches as the generator reads them: the data term and the GGN see the same
            for batch in iterate_batches(loader):
                out = self._outputs(batch)
                y = self._targets(batch, out)
                if self.likelihood == "classification":
                    loss += tF.cross_entropy(out, y, reduction="sum")
                else:
                    loss += 0.5 * ((out - y) ** 2).sum()
                n += out.shape[0]
                n_out = out[0].numel()
        if n == 0:
            raise ValueError("the loader gave no examples")
        self.n, self.loss, self.n_outputs = n, loss, n_out
        return self

    def _outputs(self, batch):
        f = self.function if self.function is not None else \
            default_function(self.model, self.target_key)
        out = f(*batch)
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
        if self.likelihood == "classification":
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
                raise ValueError(
                    f"likelihood='classification' needs one class label per example, shape "
                    f"({n},), for outputs of shape ({n}, {C}); got targets of shape {shape}. "
                    "Outputs with positions (sequences, images) need function= returning "
                    "(n, C) and targets (n,)")
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

    def _check_fitted(self):
        if self.ggn is None:
            raise RuntimeError("call fit(loader) first: the Laplace approximation needs the GGN "
                               "of the training data")

    # ------------------------------------------------------------------ the posterior precision
    def _scale(self, sigma_noise=None):
        """``s`` with ``H = s · (M + Λ / s)``: ``s = n / (T σ²)``."""
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        s = self.n / self.temperature
        if self.likelihood == "regression":
            s = s / sigma ** 2
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
        prior = self.prior_precision if prior_precision is None else prior_precision
        s = self._scale(sigma_noise)
        P = self.layer_collection.numel()
        logs = torch.log(s) if torch.is_tensor(s) else math.log(s)
        return _call_exact(self.ggn, "logdet", regul=self._damping(prior, s)) + P * logs

    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None):
        """``log p(D) ≈ log p(D|θ*) − ½ θ*ᵀΛθ* − ½ (log det H − log det Λ)``; a 0-d tensor,
        differentiable w.r.t. ``prior_precision`` / ``sigma_noise`` given as tensors."""
        self._check_fitted()
        prior = self.prior_precision if prior_precision is None else prior_precision
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        if self.likelihood == "classification":
            loglik = -self.loss
        else:
            K = self.n_outputs
            sig2 = sigma ** 2
            log2pisig2 = torch.log(2 * math.pi * sig2) if torch.is_tensor(sig2) else \
                math.log(2 * math.pi * sig2)
            loglik = -self.loss / sig2 - 0.5 * self.n * K * log2pisig2
        loglik = loglik / self.temperature
        scatter = _prior_quadratic(prior, self.theta_map)
        logdet_prior = _prior_logdet(prior, self.layer_collection)
        logdet_post = self.posterior_precision_logdet(prior, sigma)
        return loglik - 0.5 * scatter - 0.5 * (logdet_post - logdet_prior)

    def optimize_prior_precision(self, per_layer=False, n_steps=100, lr=0.1, init=None):
        """Maximise the log marginal likelihood over the prior precision (a scalar, or one per
        layer with ``per_layer=True``) by Adam on its logarithm; sets and returns it."""
        self._check_fitted()
        ids = list(self.layer_collection.layer_ids())
        start = init if init is not None else self.prior_precision
        if isinstance(start, (dict, PVector)):
            raise ValueError("optimize_prior_precision starts from a scalar (init=)")
        shape = (len(ids),) if per_layer else ()
        log_prior = torch.full(shape, math.log(float(start)), dtype=self.theta_map.dtype,
                               requires_grad=True)
        opt = torch.optim.Adam([log_prior], lr=lr)
        for _ in range(n_steps):
            opt.zero_grad()
            prior = ({lid: log_prior[i].exp() for i, lid in enumerate(ids)} if per_layer
                     else log_prior.exp())
            (-self.log_marginal_likelihood(prior)).backward()
            opt.step()
        with torch.no_grad():
            self.prior_precision = ({lid: float(log_prior[i].exp()) for i, lid in enumerate(ids)}
                                    if per_layer else float(log_prior.exp()))
        return self.prior_precision

    # ------------------------------------------------------------------ predictive
    def functional_variance(self, inputs):
        """``Σ(x*) = J* H⁻¹ J*ᵀ`` for a batch of inputs: shape ``(n*, K, K)``."""
        self._check_fitted()
        J = Jacobian(self.model, (inputs,), function=self._jac_function(),
                     layer_collection=self.base_collection)
        if self.subnetwork_indices is not None:  # the subnetwork's columns of J
            idx = self.layer_collection["subnetwork"].indices.to(J.to_torch().device)
            J = PFMapDense(self.layer_collection, data=J.to_torch()[..., idx])
        s = self._scale()
        HinvJ = _call_exact(self.ggn, "solve", J, regul=self._damping(self.prior_precision, s))
        Jt, St = J.to_torch(), HinvJ.to_torch() / s  # (K, n, P)
        return torch.einsum("kip,lip->ikl", Jt, St)

    def _jac_function(self):
        if self.function is not None:
            f = self.function
            return lambda *b: f(*b).reshape(b[0].shape[0], -1)
        return lambda x, *rest: self.model(x).reshape(x.shape[0], -1)

    def predictive(self, inputs, link_approx="probit", n_samples=100, generator=None):
        """GLM predictive at a batch of inputs. Classification: class probabilities
        ``(n*, C)`` by ``'probit'`` (``softmax(f / sqrt(1 + π/8 diag Σ))``) or ``'mc'``
        (``n_samples`` draws of ``f ~ N(f*, Σ)``). Regression: ``(mean, variance)``, the
        variance ``Σ + σ² I`` of shape ``(n*, K, K)``."""
        self._check_fitted()
        # the checked computation first: it refuses a model it can't use (BatchNorm in
        # training mode, dropout) before the plain forward below could update its buffers
        var = self.functional_variance(inputs).detach()
        with torch.no_grad():
            f = self._outputs((inputs,))
        if self.likelihood == "regression":
            K = var.shape[-1]
            return f, var + self.sigma_noise ** 2 * torch.eye(K, dtype=var.dtype, device=var.device)
        if link_approx == "probit":
            kappa = 1.0 / torch.sqrt(1.0 + math.pi / 8.0 * torch.diagonal(var, dim1=-2, dim2=-1))
            return torch.softmax(f * kappa, dim=-1)
        if link_approx == "mc":
            L = torch.linalg.cholesky(var + 1e-10 * var.diagonal(dim1=-2, dim2=-1).mean()
                                      * torch.eye(var.shape[-1], dtype=var.dtype))
            z = torch.randn((n_samples, *f.shape), generator=generator, dtype=f.dtype)
            samples = f + torch.einsum("ikl,sil->sik", L, z)
            return torch.softmax(samples, dim=-1).mean(0)
        raise ValueError(f"link_approx={link_approx!r}: use 'probit' or 'mc'")

    def sample(self, n_samples=1, generator=None):
        """``n_samples`` posterior draws ``θ* + H^{-1/2} z``, shape ``(n_samples, P)``."""
        self._check_fitted()
        s = self._scale()
        P = self.layer_collection.numel()
        dt = self.theta_map.dtype
        z = torch.randn((n_samples, 1, P), generator=generator, dtype=dt)
        root = _call_exact(self.ggn, "pow", -0.5, regul=self._damping(self.prior_precision, s))
        zmap = PFMapDense(self.layer_collection, data=z.transpose(0, 1).contiguous())
        draws = root.mmap(zmap).to_torch()[0] / math.sqrt(s)  # (n_samples, P)
        return self.theta_map.get_flat_representation() + draws


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


__all__ = ["Laplace"]
