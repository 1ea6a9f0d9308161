"""Import path kept; re-exports only: the functional (GP) Laplace lives in
`nngeometry/laplace/functional.py`, and `nngeometry.laplace_gp.FunctionalLaplace` is the same
object as `nngeometry.laplace.FunctionalLaplace`."""
from .laplace.functional import FunctionalLaplace

__all__ = ["FunctionalLaplace"]
