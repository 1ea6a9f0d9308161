"""Upstream import path; re-exports `TorchHooksJacobianBackend` from `nngeometry.backend.jacobian`
(and the names upstream's module exposed through its imports, at the end), and holds upstream's
no-op decorator `instance_buffer_handles`."""
import functools

from ..jacobian import TorchHooksJacobianBackend


def instance_buffer_handles(func):
    """Decorator for a generator method: whatever the method leaves in the instance's
    ``handles`` list (forward/backward hook handles) is removed when it returns or raises.

    Kept for code written against upstream nngeometry, whose generator stored hooks and
    buffers on the instance. This package's generator installs its hooks in a context manager
    and removes them itself, so on its own methods the decorator has nothing to do."""
    @functools.wraps(func)
    def wrapper(self, *args, **kwargs):
        try:
            return func(self, *args, **kwargs)
        finally:
            handles = getattr(self, "handles", None)
            while handles:
                handles.pop().remove()
    return wrapper


__all__ = ["TorchHooksJacobianBackend", "instance_buffer_handles"]

# Upstream import paths: re-exports only (upstream's module exposed these through its imports)
from ...layercollection import LayerCollection  # noqa: E402,F401
from ...object.vector import FVector, PVector  # noqa: E402,F401
