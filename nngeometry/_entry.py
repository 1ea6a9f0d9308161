"""What the entry points (FIM, Hessian, Jacobian, GramMatrix) share: the defaults of their
arguments."""
from .backend.batches import default_function
from .layercollection import LayerCollection


def prepare_entry(model, function, layer_collection):
    """``(function, layer_collection)`` with the defaults: ``model(batch[0])`` and all the
    layers of the model. (Batches always go to the model's device: entry points accept
    ``device`` only for compatibility.)"""
    if layer_collection is None:
        layer_collection = LayerCollection.from_model(model)
    if function is None:
        function = default_function(model)
    return function, layer_collection
