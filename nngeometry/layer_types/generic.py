"""Any module with parameters that no specific layer type handles (a user's own layer).

Per-example gradients come from ``torch.func``: for each example (``vmap``) the vector-Jacobian
product of the module's forward, re-run on that example's recorded arguments, w.r.t. the
module's OWN direct parameters (``named_parameters(recurse=False)``; submodules with parameters
are layers of their own), applied to the ``K`` output gradients of the example (``vmap`` again).
So Dense, BlockDiag, Diag, QuasiDiag, LowRank and Implicit representations work for such a
layer; KFAC/EKFAC refuse it (no Kronecker structure is known).

Assumptions, which hold for ordinary layers:

* the module treats the examples of a batch independently, with the batch as the first axis of
  its tensor arguments: every tensor argument (positional or keyword) whose first axis has the
  batch size is split per example, the others are passed whole;
* its output is a tensor, or a tuple whose first element is the tensor that the rest of the
  model uses (the one the generator differentiates through);
* its forward is deterministic (no dropout in training mode).

Modules that are known to break the per-example assumption (recurrent ``nn.RNN``/``nn.LSTM``/
``nn.GRU``: the batch is not the first axis by default and their fused kernels do not batch
over examples) are refused by ``LayerCollection.from_model`` (``UnsupportedLayerError``).

Layout of a generic layer: the module's direct parameters in ``named_parameters()`` order, each
flattened row-major.
"""
import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from .base import AbstractLayer, Parameter, recording_paused

#: module classes refused by ``LayerCollection.from_model`` (see the module docstring)
REFUSED_MODULES = (nn.RNNBase,)


def refusal_reason(module):
    """Why ``module`` cannot be handled (a sentence), or None."""
    if isinstance(module, REFUSED_MODULES):
        return ("recurrent layers (nn.RNN / nn.LSTM / nn.GRU) are not supported: their fused "
                "kernels and time-major batch layout break the per-example computation")
    return None


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot differentiate through a module output of type {type(out).__name__}")


def per_example_vjp(module, names, args, kwargs, gy, arg_dims, kwarg_dims, call=None):
    """``(K, n, Σ numel)``: per-example gradients of ``module``'s parameters ``names``.

    Args:
        module: the module; ``names`` its parameters' qualified names (relative to it).
        args, kwargs: the recorded arguments of the forward call (batched).
        gy: ``(K, n, *out_shape)`` gradients w.r.t. the module's (first) output.
        arg_dims, kwarg_dims: the batch axis of each argument (``None``: shared by all
            examples), as ``vmap`` ``in_dims``.
        call: ``call(module, params, args_i, kwargs_i) -> output of one example`` (the per-example
            arguments have their batch axis removed); default: put back a batch axis of size 1
            at the recorded position, run the module, take the first output tensor, drop the
            axis.
    """
    params = {nm: module.get_parameter(nm).detach() for nm in names}
    K, n = gy.shape[:2]

    if call is None:
        def call(mod, p, a, kw):
            a = tuple(t.unsqueeze(d) if d is not None else t for t, d in zip(a, arg_dims))
            kw = {k: (t.unsqueeze(kwarg_dims[k]) if kwarg_dims[k] is not None else t)
                  for k, t in kw.items()}
            return _first_tensor(functional_call(mod, p, a, kw)).squeeze(0)

    def one_example(a, kw, g):
        _, vjp_fn = vjp(lambda p: call(module, p, a, kw), params)
        return vmap(vjp_fn)(g)[0]

    # fused inference kernels of attention have no batching rule: keep the plain path
    prev_fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with recording_paused(), torch.enable_grad():
        try:
            grads = vmap(one_example, in_dims=(tuple(arg_dims), dict(kwarg_dims), 1))(args, kwargs, gy)
        except RuntimeError as e:
            if "randomness" in str(e):
                raise RuntimeError(
                    f"the forward of {type(module).__name__} is random (dropout in training "
                    "mode?): per-example gradients need a deterministic forward; call model.eval() "
                    "or set the dropout probability to 0") from e
            raise
        finally:
            torch.backends.mha.set_fastpath_enabled(prev_fast)
    # grads[name]: (n, K, *shape)
    return torch.cat([grads[nm].reshape(n, K, -1) for nm in names], dim=2).transpose(0, 1)


def batch_dims(values, n):
    """``vmap`` in_dims for recorded arguments: 0 for tensors whose first axis has size ``n``."""
    return [0 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else None
            for v in values]


class GenericLayer(AbstractLayer):
    """Any other module with direct parameters; see the module docstring. Not registered: it is
    the fallback of :func:`LayerCollection.from_model`."""

    supports_kfac = False

    def __init__(self, module_type, specs):
        """``module_type``: the module's class name; ``specs``: ``[(name, shape), ...]``."""
        self.module_type = module_type
        self._specs = [(name, Parameter(*shape)) for name, shape in specs]
        self.weight = self._specs[0][1]
        self.bias = None

    @classmethod
    def from_module(cls, module):
        return cls(type(module).__name__,
                   [(name, tuple(p.shape)) for name, p in module.named_parameters(recurse=False)])

    def param_specs(self):
        return list(self._specs)

    def _key(self):
        return super()._key() + (self.module_type,)

    def __repr__(self):
        body = ", ".join(f"{n}={p.size}" for n, p in self._specs)
        return f"GenericLayer[{self.module_type}]({body})"

    def inputs_of(self, call):
        return call.args, call.kwargs

    def per_example_grad(self, module, x, gy):
        args, kwargs = x
        n = gy.shape[1]
        arg_dims = batch_dims(args, n)
        keys = list(kwargs)
        kw_dims = dict(zip(keys, batch_dims([kwargs[k] for k in keys], n)))
        return per_example_vjp(module, self.param_names(), tuple(args), dict(kwargs), gy,
                               arg_dims, kw_dims)

    def kfac_factors(self, module, x, gy, approx="expand"):
        raise NotImplementedError(
            f"KFAC/EKFAC are not available for the module {type(module).__name__} (handled by the "
            "generic layer type: no Kronecker structure is known for it); use PMatDense, "
            "PMatBlockDiag, PMatDiag, PMatQuasiDiag, PMatLowRank or PMatImplicit, or a mixed "
            "representation (PMatEKFACBlockDiag) for this layer")
