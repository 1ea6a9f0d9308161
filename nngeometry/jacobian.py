"""Entry point: the per-example Jacobians of a model's outputs."""
from ._entry import build_from_jacobians, prepare_entry
from .backend import TorchHooksJacobianBackend
from .backend.model_and_data import unwrap_model
from .curvature import check_class_dim, check_positions, empirical_function, lm_convention
from .layercollection import LayerCollection
from .object.map import PFMapDense


def Jacobian(model, loader, function=None, representation=PFMapDense, layer_collection=None,
             device=None, verbose=False, centering=False, check_deterministic=True,
             distributed=None, process_group=None):
    """The per-example Jacobians ``J[k, i, :] = ∂f_k(x_i)/∂θ`` of ``function`` (default: the
    model's outputs ``model(batch[0])``, flattened to ``(n, K)``), as a parameter-to-function
    map of shape ``(K, n, P)``; not normalized.

    Args:
        model: the ``torch.nn.Module``.
        loader: a DataLoader (or a single mini-batch) of ``(inputs, targets, ...)``.
        function: ``function(*batch) -> outputs (n, K)``.
        representation: the map class (default ``PFMapDense``), built with
            ``layer_collection=``, ``generator=`` and ``examples=``.
        layer_collection: the parameters to differentiate; default all layers of the model.
        device: kept for compatibility; batches are moved to the model's device.
        verbose: show a progress bar.
        centering: subtract the mean Jacobian over the whole data set from each example's.
        check_deterministic: refuse a random model (dropout in training mode, or outputs that
            differ when the model runs twice on the first batch); ``False`` skips the check.
        distributed: data parallelism over ``torch.distributed`` (default ``None``: on when a
            process group of more than one rank is initialised): the examples of every rank,
            in rank order (see ``TorchHooksJacobianBackend``).
        process_group: the group of ranks (default: the world).
    """
    return build_from_jacobians(model, loader, representation, function, layer_collection,
                                centering, verbose, check_deterministic,
                                distributed=distributed, process_group=process_group)


def _collection(model, layer_collection, last_layer):
    if last_layer:
        if layer_collection is not None:
            raise ValueError("pass either layer_collection= or last_layer=True, not both")
        return LayerCollection.from_model(model).last_layer()
    return layer_collection


def per_example_gradients(model, loader, loss_function=None, function=None,
                          layer_collection=None, last_layer=False, positions=None,
                          target_key="labels", check_deterministic=True, class_dim=None,
                          causal_lm=None):
    """``(n, P)``: the gradient of each example's loss for its observed target,
    ``∇θ ℓ(f(x_i), y_i)`` (laplace-torch's ``gradients``), in the collection's layout (all the
    layers, or the last one with ``last_layer=True``: no backward pass below it).

    ``loss_function(outputs, *targets) -> (n,)`` per-example losses, default cross-entropy on
    logits; targets, positions, ``class_dim``, ``causal_lm`` (language models: the model's own
    loss convention) and dict batches as for [`nngeometry.EmpiricalFisher`][nngeometry.EmpiricalFisher] (whose matrix
    is ``GᵀG / n`` for the ``G`` returned here)."""
    check_positions(positions)
    check_class_dim(class_dim)
    lm = lm_convention(unwrap_model(model), causal_lm, target_key, function)
    layer_collection = _collection(model, layer_collection, last_layer)
    function, layer_collection = prepare_entry(model, function, layer_collection, target_key)
    generator = TorchHooksJacobianBackend(
        model, empirical_function(function, loss_function, positions, target_key, class_dim,
                                  lm),
        layer_collection=layer_collection, check_deterministic=check_deterministic)
    return generator.get_jacobian(loader, layer_collection)[0]


def per_example_jacobians(model, loader, function=None, layer_collection=None,
                          last_layer=False, target_key="labels", check_deterministic=True):
    """``(n, D, P)``: the Jacobian of each example's outputs (flattened to ``D``) w.r.t. the
    parameters, ``J[i, d, :] = ∂f_d(x_i)/∂θ`` (laplace-torch's ``jacobians``), on all the
    layers or the last one (``last_layer=True``). [`Jacobian`][nngeometry.Jacobian] gives the same numbers as a
    ``(D, n, P)`` ``PFMapDense``."""
    layer_collection = _collection(model, layer_collection, last_layer)
    function, layer_collection = prepare_entry(model, function, layer_collection, target_key)
    generator = TorchHooksJacobianBackend(model, function, layer_collection=layer_collection,
                                          check_deterministic=check_deterministic)
    return generator.get_jacobian(loader, layer_collection).transpose(0, 1)


__all__ = ["Jacobian", "per_example_gradients", "per_example_jacobians"]
