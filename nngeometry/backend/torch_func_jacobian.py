"""``TorchFuncJacobianBackend``: the Jacobian generator under the module path and name of
upstream nngeometry's ``torch.func`` backend.

Here one engine computes every per-example Jacobian statistic (see
`nngeometry.backend.TorchHooksJacobianBackend`): it is exact for every supported layer and for
generic modules, so this name gives the same numbers. Only the meaning of ``function`` is this
backend's own, as upstream's: it maps the model's *predictions* (and the targets), not the
batch, to the outputs whose Jacobian is taken.
"""
from .jacobian import TorchHooksJacobianBackend


class TorchFuncJacobianBackend(TorchHooksJacobianBackend):
    """The Jacobian generator (`TorchHooksJacobianBackend`, the same numbers) under the name of
    upstream's ``torch.func`` backend: ``J_i = ∂ function(model(x_i), y_i) / ∂θ`` per example,
    ``(n_output, P)`` each, and the statistics the representations ask for.

    Args:
        model: the ``torch.nn.Module``; it is called on the batch's inputs (``model(x)``, or
            ``model(**batch)`` for dict batches).
        function: ``function(predictions, targets)`` for batches ``(inputs, targets, ...)``,
            ``function(predictions)`` for batches of inputs only; ``None`` (the default): the
            predictions themselves. E.g. ``lambda out, y: out.log_softmax(-1)`` .
        verbose: as `TorchHooksJacobianBackend`'s; further keywords (``centering``,
            ``max_chunk_bytes``, ...) too.
    """

    def __init__(self, model, function=None, verbose=False, **kwargs):
        super().__init__(model, None, verbose=verbose, **kwargs)
        self.output_function = function
        if function is not None:
            predict = self.function

            def on_predictions(*batch):
                out = predict(*batch)
                return function(out, batch[1]) if len(batch) > 1 else function(out)

            self.function = on_predictions


__all__ = ["TorchFuncJacobianBackend"]
