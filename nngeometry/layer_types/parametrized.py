"""Modules reparametrized with ``torch.nn.utils.parametrize`` (``weight_norm``,
``spectral_norm``, ``orthogonal`` of ``torch.nn.utils.parametrizations``, or a user's own
parametrization).

Such a module computes its ``weight`` as ``W = φ(θ)`` from the tensors it stores,
``parametrizations.weight.original`` (``original0``, ``original1``, ... for parametrizations
with several), which are what an optimizer updates. The curvature is taken with respect to
those *original* (unconstrained) parameters: with ``D`` the per-example gradient w.r.t. ``W``,
the gradient w.r.t. ``θ`` is ``(∂φ/∂θ)ᵀ D``. It is computed by the generic path (``torch.func``
on the module's forward, parametrization included; see `generic`), so every
representation built from per-example gradients is exact: Dense, BlockDiag, Diag, QuasiDiag,
LowRank, Implicit. KFAC/EKFAC refuse the layer: ``(∂φ/∂θ)ᵀ`` mixes the rows and columns of
``W``, which breaks the Kronecker structure of the block.

Layout: the module's own direct parameters (e.g. ``bias``) in ``named_parameters()`` order,
then the originals of each parametrized tensor, in the order of ``module.parametrizations``.

While a matrix is computed the parametrization modules are in evaluation mode
(``spectral_norm`` then uses its stored power-iteration vectors instead of advancing them, so
that every forward pass computes the same function), and their training flags and buffers are
restored afterwards: building a matrix does not change the model.
"""
from torch.nn.utils import parametrize

from .generic import GenericLayer


def own_parameters(module):
    """``[(name, parameter), ...]``: the module's direct parameters and, for a parametrized
    module, the originals of its parametrized tensors (names relative to the module)."""
    own = list(module.named_parameters(recurse=False))
    if parametrize.is_parametrized(module):
        own += list(module.parametrizations.named_parameters(prefix="parametrizations"))
    return own


class ParametrizedLayer(GenericLayer):
    """A module with ``torch.nn.utils.parametrize`` parametrizations; see the module docstring.
    Not registered: ``LayerCollection.from_model`` picks it for every parametrized module."""

    no_kfac_reason = (" (a module reparametrized with torch.nn.utils.parametrize: the curvature "
                      "is w.r.t. its original parameters, and the parametrization's Jacobian "
                      "breaks the Kronecker structure)")

    @classmethod
    def from_module(cls, module):
        return cls(type(module).__name__,
                   [(name, tuple(p.shape)) for name, p in own_parameters(module)])

    def __repr__(self):
        body = ", ".join(f"{n}={p.size}" for n, p in self._specs)
        return f"ParametrizedLayer[{self.module_type}]({body})"

    def kfac_factors(self, module, x, gy, approx="expand"):
        names = ", ".join(module.parametrizations.keys())
        raise NotImplementedError(
            f"KFAC/EKFAC are not available for the parametrized module {type(module).__name__} "
            f"(torch.nn.utils.parametrize on {names}): the curvature is w.r.t. the original "
            "parameters, and the parametrization's Jacobian breaks the Kronecker structure. Use "
            "PMatDense, PMatBlockDiag, PMatDiag, PMatQuasiDiag, PMatLowRank or PMatImplicit, or "
            "PMatEKFACBlockDiag (a dense block for this layer)")


def _weight_norm_composite(module):
    """``module``'s forward (a ``weight_norm`` parametrization, ``g · v / ||v||``) written with
    operations that have forward-mode derivatives (``torch._weight_norm`` has none, and the
    implicit products are Jacobian-vector products); same values."""
    def forward(weight_g, weight_v):
        dim = module.dim
        if dim == -1:
            norm = weight_v.norm()
        else:
            dim = dim % weight_v.dim()
            rest = [d for d in range(weight_v.dim()) if d != dim]
            norm = weight_v.norm(dim=rest, keepdim=True) if rest else weight_v.abs()
        return weight_v * (weight_g / norm)
    return forward


def parametrizations_prepared(model):
    """Put every parametrization module of ``model`` in evaluation mode (and give the
    ``weight_norm`` ones a forward with forward-mode derivatives); returns a function that
    restores them."""
    from torch.nn.utils.parametrizations import _WeightNorm

    import torch.nn.utils.parametrize as parametrize_module

    saved, patched = [], []
    # inside parametrize.cached() every access returns the tensor computed at the first one:
    # the per-layer recomputations from the originals (and torch.func's calls with other
    # originals) would read that stale tensor, and the gradients w.r.t. the originals would be
    # wrong; the cache is switched off for the computation (same values: the originals do not
    # change during it)
    cache_depth = 0
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        cache_depth = getattr(parametrize_module, "_cache_enabled", 0)
        if cache_depth:
            parametrize_module._cache_enabled = 0
    for m in model.modules():
        if parametrize.is_parametrized(m):
            for pm in m.parametrizations.modules():
                saved.append((pm, pm.training))
                pm.training = False
                if isinstance(pm, _WeightNorm) and "forward" not in vars(pm):
                    vars(pm)["forward"] = _weight_norm_composite(pm)
                    patched.append(pm)

    def restore():
        if cache_depth:
            parametrize_module._cache_enabled = cache_depth
        for pm, training in saved:
            pm.training = training
        for pm in patched:
            vars(pm).pop("forward", None)
    return restore
