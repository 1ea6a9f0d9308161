"""Compatibility alias for the older name of the Jacobian generator."""
from ..backend import TorchHooksJacobianBackend as Jacobian

__all__ = ["Jacobian"]
