"""Upstream import path; re-exports `Jacobian` (the Jacobian generator,
`nngeometry.backend.TorchHooksJacobianBackend`, under the name older upstream releases gave it)
from `nngeometry.generator.jacobian`. Not to be confused with the entry point
`nngeometry.jacobian.Jacobian`, a function that returns the per-example Jacobians."""
from .jacobian import Jacobian

__all__ = ["Jacobian"]
