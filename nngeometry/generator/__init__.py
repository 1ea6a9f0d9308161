"""Compatibility module: ``nngeometry.generator.jacobian.Jacobian`` is the generator class."""
from .jacobian import Jacobian

__all__ = ["Jacobian"]
