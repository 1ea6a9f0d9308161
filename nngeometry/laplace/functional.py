"""Functional (GP) Laplace: the linearised network's posterior seen as a Gaussian process.

With the network linearised at ``θ*``, ``f_lin(x; θ) = f(x; θ*) + J(x)(θ − θ*)``, and the prior
``θ ~ N(m, Λ⁻¹)``, the outputs are a Gaussian process with mean ``f(x; θ*) + J(x)(m − θ*)`` and
kernel ``k(x, x') = J(x) Λ⁻¹ J(x')ᵀ`` (the neural tangent kernel weighed by the prior). The
Laplace approximation of that GP (Immer et al., 2021, "Improving predictions of Bayesian neural
nets via local linearization") conditions it on ``M`` training points (all of them, or a random
subset of ``n_subset``): with ``K`` the ``(MC, MC)`` kernel of those points (index ``i C + c``),
``L = blockdiag(Λ_i) / T`` their output Hessians (``diag(p_i) − p_i p_iᵀ`` for softmax
classification, ``I/σ²`` for regression) and ``d = J (θ* − m)`` (``MC``):

* predictive covariance at test points ``x*``: ``Σ* = K** − K*M (I + L K)⁻¹ L K_M*``;
* log marginal likelihood: ``log p(D | θ*) − ½ dᵀ K⁺ d − ½ log det(I + L K)``.

With all the training points (``M = n``) the predictive equals the weight-space GGN Laplace's
``J* H⁻¹ J*ᵀ`` (Woodbury) and ``log det(I + L K) = log det H − log det Λ`` (Sylvester); the scatter
``dᵀ K⁺ d = (θ* − m)ᵀ Λ^{1/2} Π Λ^{1/2} (θ* − m)``, ``Π`` the projection on the range of
``Λ^{-1/2} Jᵀ``, equals the weight-space ``(θ* − m)ᵀ Λ (θ* − m)`` when ``J`` has full column rank
(more outputs ``nC`` than parameters ``P``) and is smaller otherwise: the GP's own evidence sees
the parameters only through the functions they change.
"""
import math
from collections.abc import Mapping

import torch

from ..backend.model_and_data import iterate_batches
from ..jacobian import Jacobian
from ..layercollection import LayerCollection
from ..object.pspace import PMatDense
from ..object.vector import PVector
from .weight_space import Laplace


class FunctionalLaplace(Laplace):
    """Functional (GP) Laplace, laplace-torch's ``FunctionalLaplace`` (``hessian_structure='gp'``):
    the linearised network's GP posterior conditioned on ``n_subset`` training points (see the
    module docstring for the maths).

    Args:
        model: the trained network.
        likelihood: ``'classification'`` or ``'regression'``.
        n_subset: the number ``M`` of training points the GP is conditioned on (a random subset
            drawn with ``seed``), or None for all of them. The kernel is ``(MC, MC)``: ``M C``
            is what bounds the cost (``O((MC)³)``), and the Jacobian ``(C, M, P)`` is formed.
        prior_precision: ``Λ`` in any form `Laplace` takes (a scalar, one per layer, one per
            parameter tensor, one per parameter).
        sigma_noise: ``σ`` (regression).
        temperature: ``T``.
        layer_collection: the parameters of the kernel (default all).
        function: as for `Laplace`.
        prior_mean: ``m``.
        target_key: the targets' key of dict batches.
        seed: the seed of the subset.

    `fit`, `log_marginal_likelihood`, `optimize_prior_precision` (``method='marglik'`` or
    ``'gridsearch'``, every ``prior_structure``), `predictive` (``pred_type='glm'``, every
    ``link_approx``, ``joint=``), `functional_variance` and `functional_covariance` read as for
    `Laplace`; there is no weight-space posterior (no ``sample``, ``pred_type='nn'``,
    ``posterior_covariance``, ``state_dict``, online fit)."""

    def __init__(self, model, likelihood="classification", n_subset=None, prior_precision=1.0,
                 sigma_noise=1.0, temperature=1.0, layer_collection=None, function=None,
                 prior_mean=0.0, target_key="labels", seed=0):
        if likelihood not in ("classification", "regression"):
            raise ValueError(f"likelihood={likelihood!r}: the functional Laplace takes "
                             "'classification' or 'regression'")
        super().__init__(model, likelihood, PMatDense, prior_precision=prior_precision,
                         sigma_noise=sigma_noise, temperature=temperature,
                         layer_collection=layer_collection, function=function,
                         prior_mean=prior_mean, target_key=target_key)
        if n_subset is not None and int(n_subset) < 1:
            raise ValueError(f"n_subset={n_subset!r}: a positive number of training points, "
                             "or None for all")
        self.n_subset = None if n_subset is None else int(n_subset)
        self.seed = int(seed)
        self._J = None

    # ------------------------------------------------------------------ fitting
    def fit(self, loader, override=True):
        """The data term over all of ``loader``, and the Jacobian, outputs and output Hessians
        of the ``M`` points the GP is conditioned on."""
        if not override:
            raise NotImplementedError("fit(override=False) with the functional Laplace: the GP "
                                      "is conditioned on one set of points; fit once")
        batches = [tuple(b) for b in iterate_batches(loader)]
        inputs, targets = _concatenate(batches, self.target_key)
        self.n, self.loss, self.n_outputs = self._data_term(batches)
        n = self.n
        if self.n_subset is not None and self.n_subset > n:
            raise ValueError(f"n_subset={self.n_subset} is more than the {n} training points")
        idx = torch.arange(n)
        if self.n_subset is not None and self.n_subset < n:
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(n, generator=g)[:self.n_subset].sort().values
        self.subset = idx
        sub = _take(inputs, idx)
        self.base_collection = self._lc_arg or LayerCollection.from_model(self.model)
        self.layer_collection = self.base_collection
        self.theta_map = PVector.from_model(self.model, self.base_collection).detach().clone()
        J = Jacobian(self.model, (sub,), function=self._jac_function(),
                     layer_collection=self.base_collection).to_torch()  # (C, M, P)
        C, M, P = J.shape
        self._J = J.permute(1, 0, 2).reshape(M * C, P).detach()
        with torch.no_grad():
            f = self._outputs((sub,))
        if self._classif:
            p = torch.softmax(f, -1)
            L = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        else:
            L = torch.eye(C, dtype=f.dtype, device=f.device).expand(M, C, C)
        self._L = torch.block_diag(*L)  # (MC, MC), without 1/σ² and 1/T
        self.ggn = "gp"  # fitted (the base class's check); there is no weight-space matrix
        return self

    def _check_fitted(self):
        if self._J is None:
            raise RuntimeError("call fit(loader) first")

    def _noise_scale(self, sigma_noise=None):
        """``L = L₀ · c`` with ``c = 1/T`` (classification) or ``1/(σ² T)`` (regression)."""
        c = 1.0 / self.temperature
        if self.likelihood == "regression":
            sigma = self.sigma_noise if sigma_noise is None else sigma_noise
            c = c / sigma ** 2
        return c

    def _kernel(self, prior_precision=None):
        lam = self.prior_precision_diag(prior_precision)
        return (self._J / lam) @ self._J.T, lam

    # ------------------------------------------------------------------ the evidence
    def log_marginal_likelihood(self, prior_precision=None, sigma_noise=None):
        """``log p(D | θ*) − ½ dᵀ K⁺ d − ½ log det(I + L K)`` (module docstring), a 0-d tensor
        differentiable in ``prior_precision`` and ``sigma_noise`` given as tensors."""
        self._check_fitted()
        sigma = self.sigma_noise if sigma_noise is None else sigma_noise
        if self._classif:
            loglik = -self.loss
        else:
            sig2 = sigma ** 2
            log2pisig2 = torch.log(2 * math.pi * sig2) if torch.is_tensor(sig2) else \
                math.log(2 * math.pi * sig2)
            loglik = -self.loss / sig2 - 0.5 * self.n * self.n_outputs * log2pisig2
        loglik = loglik / self.temperature
        K, _ = self._kernel(prior_precision)
        d = self._J @ (self.theta_map.get_flat_representation() - self._prior_mean_flat())
        # d lies in K's range (d = J δ, K = J Λ⁻¹ Jᵀ): the pseudo-inverse is exact there
        scatter = d @ torch.linalg.pinv(K, hermitian=True) @ d
        eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        logdet = torch.linalg.slogdet(eye + self._noise_scale(sigma_noise) * self._L @ K)[1]
        return loglik - 0.5 * scatter - 0.5 * logdet

    def posterior_precision_logdet(self, prior_precision=None, sigma_noise=None):
        """``log det(I + L K) + log det Λ``: ``log det H`` of the weight-space Laplace when the
        GP is conditioned on all the training points."""
        self._check_fitted()
        K, lam = self._kernel(prior_precision)
        eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        return (torch.linalg.slogdet(eye + self._noise_scale(sigma_noise) * self._L @ K)[1]
                + torch.log(lam).sum())

    # ------------------------------------------------------------------ predictive
    def _cross(self, inputs):
        """``(Js, Λ⁻¹-weighted test Jacobian, X)``: the test Jacobian ``(C, n*, P)`` and
        ``X = (I + L K)⁻¹ L K_M*`` ``(MC, n* C)``."""
        Js = self._jacobian(inputs).to_torch()  # (C, n*, P)
        C, ns, P = Js.shape
        lam = self.prior_precision_diag()
        Jl = Js.permute(1, 0, 2).reshape(ns * C, P) / lam
        K = (self._J / lam) @ self._J.T
        KMs = self._J @ Jl.T  # (MC, n*C)
        Lc = self._noise_scale() * self._L
        eye = torch.eye(K.shape[0], dtype=K.dtype, device=K.device)
        X = torch.linalg.solve(eye + Lc @ K, Lc @ KMs)
        return Js.permute(1, 0, 2).reshape(ns * C, P), Jl, KMs, X, C, ns

    def functional_covariance(self, inputs):
        """The joint ``Σ* = K** − K*M (I + L K)⁻¹ L K_M*`` over a batch: ``(n* C, n* C)``, index
        ``i C + c``."""
        self._check_fitted()
        Js, Jl, KMs, X, C, ns = self._cross(inputs)
        return Js @ Jl.T - KMs.T @ X

    def functional_variance(self, inputs):
        """``Σ*`` per test input: ``(n*, C, C)``."""
        self._check_fitted()
        Js, Jl, KMs, X, C, ns = self._cross(inputs)
        Jr, Jlr = Js.reshape(ns, C, -1), Jl.reshape(ns, C, -1)
        prior_part = torch.einsum("icp,idp->icd", Jr, Jlr)
        data_part = torch.einsum("mic,mid->icd", KMs.reshape(-1, ns, C), X.reshape(-1, ns, C))
        return prior_part - data_part

    def predictive(self, inputs, link_approx="probit", n_samples=100, generator=None,
                   pred_type="glm", joint=False, diagonal_output=False):
        """As [`Laplace.predictive`][nngeometry.laplace.Laplace.predictive] with the GP's
        ``Σ*``; ``pred_type='glm'`` (laplace-torch's ``'gp'`` is read as it) only."""
        if pred_type == "gp":
            pred_type = "glm"
        if link_approx == "gp":  # laplace-torch's positional predictive(x, 'gp', link_approx)
            link_approx = n_samples if isinstance(n_samples, str) else "probit"
            n_samples = 100
        if pred_type == "nn" or link_approx == "nn":
            raise ValueError("pred_type='nn' samples weights: the functional Laplace has no "
                             "weight-space posterior; use pred_type='glm' (or 'gp')")
        return super().predictive(inputs, link_approx=link_approx, n_samples=n_samples,
                                  generator=generator, pred_type=pred_type, joint=joint,
                                  diagonal_output=diagonal_output)

    # ------------------------------------------------------------------ no weight-space posterior
    def _no_weights(self, name):
        raise NotImplementedError(f"{name}: the functional Laplace has no weight-space "
                                  "posterior (use Laplace with PMatDense for it)")

    def sample(self, n_samples=1, generator=None):
        self._no_weights("sample")

    def log_prob(self, value, normalized=True):
        self._no_weights("log_prob")

    @property
    def posterior_precision(self):
        return self._no_weights("posterior_precision")

    @property
    def posterior_covariance(self):
        return self._no_weights("posterior_covariance")

    @property
    def posterior_variance(self):
        return self._no_weights("posterior_variance")

    def state_dict(self):
        self._no_weights("state_dict")


def _concatenate(batches, target_key):
    """All the examples' inputs (a tensor, or a dict of tensors) and targets."""
    first = batches[0][0] if batches else None
    if first is None:
        raise ValueError("the loader gave no examples")
    if isinstance(first, Mapping):
        keys = list(first)
        inputs = {k: torch.cat([b[0][k] for b in batches]) for k in keys}
        return inputs, inputs.get(target_key)
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches]) if len(batches[0]) > 1 else None
    return inputs, targets


def _take(inputs, idx):
    if isinstance(inputs, Mapping):
        return {k: v[idx.to(v.device)] for k, v in inputs.items()}
    return inputs[idx.to(inputs.device)]


__all__ = ["FunctionalLaplace"]
