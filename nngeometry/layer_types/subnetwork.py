"""The layer of a subnetwork: ``k`` parameters chosen by their flat indices in a model's
collection (laplace-torch's ``subnetwork_indices``). Not matched to any module: the entry points
build it for ``subnetwork_indices=``, so that a ``k × k`` ``PMatDense`` (and ``PVector`` of
``k`` entries) has a collection of its own."""
import torch

from .base import AbstractLayer, Parameter


class SubnetworkLayer(AbstractLayer):
    """``k`` parameters: entry ``j`` is the flat coordinate ``indices[j]`` of ``parent``
    (a [`LayerCollection`][nngeometry.layercollection.LayerCollection])."""

    module_types = ()

    def __init__(self, indices, parent=None):
        self.indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        self.parent = parent
        self.weight = Parameter(int(self.indices.numel()))
        self.bias = None

    def _key(self):
        return ("SubnetworkLayer", tuple(self.indices.tolist()))

    def per_example_grad(self, module, x, gy):
        raise NotImplementedError("a subnetwork's matrix is built by the entry points "
                                  "(subnetwork_indices=), not by per-layer hooks")
