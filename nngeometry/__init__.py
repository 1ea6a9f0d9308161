"""nngeometry: Fisher, Gauss-Newton and related matrices of PyTorch models, in the representation
you can afford, with the linear algebra to use them."""
from .metrics import FIM, FIM_MonteCarlo, EmpiricalFisher, GGN
from .hessian import Hessian
from .jacobian import Jacobian
from .gram import GramMatrix
from .layercollection import LayerCollection

__version__ = "0.4.0"
__all__ = ["FIM", "FIM_MonteCarlo", "EmpiricalFisher", "GGN", "GramMatrix", "Hessian", "Jacobian", "LayerCollection"]
