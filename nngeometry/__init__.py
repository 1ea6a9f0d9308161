"""nngeometry: Fisher, Gauss-Newton and related matrices of PyTorch models, in the representation
you can afford, with the linear algebra to use them."""
from .metrics import FIM, FIM_MonteCarlo, EmpiricalFisher, GGN
from .hessian import ActivationHessian, Hessian
from .jacobian import Jacobian, per_example_gradients, per_example_jacobians
from .gram import GramMatrix
from .layercollection import LayerCollection

__version__ = "0.4.0"
__all__ = ["ActivationHessian", "FIM", "FIM_MonteCarlo", "EmpiricalFisher", "GGN", "GramMatrix", "Hessian", "Jacobian", "LayerCollection",
           "per_example_gradients", "per_example_jacobians"]
