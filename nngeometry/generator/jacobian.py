"""Upstream import path; re-exports `TorchHooksJacobianBackend` from `nngeometry.backend` under
the name older upstream releases gave the Jacobian generator, `Jacobian` (a class; the entry
point `nngeometry.jacobian.Jacobian` is a function)."""
from ..backend import TorchHooksJacobianBackend as Jacobian

__all__ = ["Jacobian"]
