"""Jacobian generators (backends) that fill parameter-space matrices from a model and data."""
from .jacobian import TorchHooksJacobianBackend

__all__ = ["TorchHooksJacobianBackend"]
