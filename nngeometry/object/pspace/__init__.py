"""Parameter-space matrix representations: one module per representation."""
from .abstract import PMatAbstract, bdot
from .dense import PMatDense

__all__ = ["PMatAbstract", "bdot", "PMatDense"]
