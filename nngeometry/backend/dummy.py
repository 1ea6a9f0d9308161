"""A generator that computes nothing: the placeholder of a matrix that was built elsewhere."""
import torch


class DummyGenerator:
    """Stands for the generator of an object restored without its model (e.g. unpickled): it
    knows the device of the data and nothing else. Upstream nngeometry's name."""

    def __init__(self, device, layer_collection=None):
        # layer_collection: nngeometry 0.4's DummyGenerator(layer_collection=..., device=...)
        self.device = torch.device(device) if device is not None else None
        self.layer_collection = layer_collection

    def get_device(self, layer_collection=None):
        """The device given at construction (``layer_collection`` is ignored)."""
        return self.device

    def __getattr__(self, name):
        if name.startswith(("get_", "implicit_")):
            raise AttributeError(
                f"DummyGenerator has no '{name}': this object was not built from a model (e.g. "
                "it was unpickled), so nothing can be recomputed from data; build it again with "
                "a generator")
        raise AttributeError(name)


__all__ = ["DummyGenerator"]
