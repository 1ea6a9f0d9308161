"""Entry point: the Gram matrix of the per-example Jacobians (empirical neural tangent kernel).

(The Gram-matrix accumulator used inside the statistics lives in
`nngeometry.maths.gram_accumulator`.)
"""
from ._entry import build_from_jacobians
from .object.fspace import FMatDense


def GramMatrix(model, loader, function=None, representation=FMatDense, layer_collection=None,
               device=None, verbose=False, centering=False, check_deterministic=True,
               distributed=None, process_group=None):
    """``G[k, i, l, j] = <J_k(x_i), J_l(x_j)>`` with ``J_k(x_i) = ∂f_k(x_i)/∂θ`` the per-example
    Jacobians of ``function`` (default ``model(batch[0])``): a function-space matrix of shape
    ``(K, n, K, n)``, not normalized (the empirical NTK for ``K`` outputs).

    Args:
        model: the ``torch.nn.Module``.
        loader: a DataLoader (or a single mini-batch) of ``(inputs, targets, ...)``.
        function: ``function(*batch) -> outputs (n, K)``.
        representation: the function-space class (default ``FMatDense``), built with
            ``layer_collection=``, ``generator=`` and ``examples=``.
        layer_collection: the parameters to differentiate; default all layers of the model.
        device: kept for compatibility; batches are moved to the model's device.
        verbose: show a progress bar.
        centering: use ``J(x) - J̄`` (``J̄`` the data set's mean Jacobian), i.e. ``C G C`` with
            ``C = I - 11ᵀ/n`` on the example axes.
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


__all__ = ["GramMatrix"]

# Upstream import paths: re-exports only (upstream's module exposed these through its imports)
from .backend import TorchHooksJacobianBackend  # noqa: E402,F401
