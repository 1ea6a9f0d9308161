"""Upstream nngeometry's package of the Jacobian generator, and its switches between two
convolution implementations.

This package has a single implementation of the per-example gradients of convolutions
(unfolded patches; see ``nngeometry.layer_types.conv``), so `use_conv_impl_for_convs`
and `use_unfold_impl_for_convs` select nothing: inside either, every number is the same
as outside. They exist so that code written for upstream runs unchanged.
"""
import contextlib

from . import torch_hooks
from .torch_hooks import TorchHooksJacobianBackend, instance_buffer_handles


class _NoSwitch(contextlib.ContextDecorator):
    """A context manager (and decorator) that changes nothing: there is one convolution
    implementation (see the package docstring)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class use_conv_impl_for_convs(_NoSwitch):
    """Upstream: compute convolution statistics with convolutions. Here: no effect (one
    implementation), same numbers."""


class use_unfold_impl_for_convs(_NoSwitch):
    """Upstream: compute convolution statistics with unfolded patches. Here: no effect (that
    is the one implementation), same numbers."""


__all__ = ["torch_hooks", "TorchHooksJacobianBackend", "instance_buffer_handles",
           "use_conv_impl_for_convs", "use_unfold_impl_for_convs"]
