"""``TorchFuncJacobianBackend``: the Jacobian generator under the module path and name of
upstream nngeometry's ``torch.func`` backend.

Here one engine computes every per-example Jacobian statistic (see
`nngeometry.backend.TorchHooksJacobianBackend`): it is exact for every supported layer and for
generic modules, so this name gives the same numbers, with the same constructor arguments.
"""
from .jacobian import TorchHooksJacobianBackend


class TorchFuncJacobianBackend(TorchHooksJacobianBackend):
    """The Jacobian generator (`TorchHooksJacobianBackend`, same arguments and numbers) under
    the name of upstream's ``torch.func`` backend: ``J_i = ∂ function(x_i) / ∂θ`` per example,
    ``(n_output, P)`` each, and the statistics the representations ask for."""


__all__ = ["TorchFuncJacobianBackend"]
