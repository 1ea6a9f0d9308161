"""The Laplace bridge (Hobbhahn et al. 2022): a Gaussian on the logits, ``N(μ, Σ)``, mapped to
a Dirichlet whose mean approximates the predictive class probabilities. Shared by the Laplace
approximations (the modules of `nngeometry.laplace`)."""
import math

import torch


def _laplace_bridge(mu, var, normalise=False):
    """The Laplace bridge from logits ``N(μ, Σ)`` (``(n, C)``, ``(n, C, C)``) to a Dirichlet,
    returning its mean ``α / Σ_k α_k`` (see `_bridge_from_parts`)."""
    row = var.sum(-1)
    return _bridge_from_parts(mu, torch.diagonal(var, dim1=-2, dim2=-1), row,
                              row.sum(-1, keepdim=True), normalise)


def _bridge_from_parts(mu, diag, row, tot, normalise=False):
    """The Laplace bridge's Dirichlet mean from the parts of ``Σ`` it reads: ``diag Σ``
    ``(n, C)``, ``Σ1`` ``(n, C)`` and ``1ᵀΣ1`` ``(n, 1)``. The logits are first conditioned on
    ``1ᵀ f = 0`` (softmax is invariant along ``1``): ``μ ← μ − Σ1 (1ᵀμ) / (1ᵀΣ1)``, ``diag Σ ←
    diag Σ − (Σ1)² / (1ᵀΣ1)``; then ``α_k = (1 − 2/C + e^{μ_k} Σ_l e^{−μ_l} / C²) / Σ_kk``."""
    C = mu.shape[-1]
    mu = mu - row * mu.sum(-1, keepdim=True) / tot
    d = diag - row ** 2 / tot
    if normalise:
        scale = d.mean(-1, keepdim=True) / math.sqrt(C / 2)
        mu = mu / scale.sqrt()
        d = d / scale
    alpha = (1 - 2 / C + mu.exp() * torch.exp(-mu).sum(-1, keepdim=True) / C ** 2) / d
    return alpha / alpha.sum(-1, keepdim=True)
