"""Jacobian generators (backends) that fill parameter-space matrices from a model and data."""
from .jacobian import TorchHooksJacobianBackend
from .hessian_products import HessianBackend
from .torch_func_hessian import TorchFuncHessianBackend
from .dummy import DummyGenerator
from .torch_func_jacobian import TorchFuncJacobianBackend
from . import torch_hooks

__all__ = ["TorchHooksJacobianBackend", "HessianBackend", "TorchFuncHessianBackend",
           "DummyGenerator", "TorchFuncJacobianBackend", "torch_hooks"]
