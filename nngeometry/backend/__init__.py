"""Jacobian generators (backends) that fill parameter-space matrices from a model and data."""
from .jacobian import TorchHooksJacobianBackend
from .hessian import HessianBackend

__all__ = ["TorchHooksJacobianBackend", "HessianBackend"]
