"""Import path kept; re-exports only: the last-layer Laplace of a language model lives in
`nngeometry/laplace/last_layer_lm.py`, and `nngeometry.laplace_lm.LastLayerLMLaplace` is the same
object as `nngeometry.laplace.LastLayerLMLaplace`."""
from .laplace.last_layer_lm import LastLayerLMLaplace

__all__ = ["LastLayerLMLaplace"]
