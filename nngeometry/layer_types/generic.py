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
from torch.utils._pytree import tree_flatten, tree_unflatten

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


def _run(module, params, leaves, spec):
    """The module's output on arguments given as pytree leaves (see ``tree_flatten``)."""
    args, kwargs = tree_unflatten(list(leaves), spec)
    return functional_call(module, params, tuple(args), dict(kwargs))


def _slice(leaves, batched, i0, i1):
    """The leaves with the batched ones cut to examples ``i0 .. i1 - 1``."""
    return [t[i0:i1] if j in batched else t for j, t in enumerate(leaves)]


def _leaf_vjp(module, names, leaves, spec, batched, gy, method):
    """``(K, n, Σ numel)`` per-example gradients, the leaves ``batched`` split per example;
    ``method`` ``'vmap'`` (all examples at once) or ``'loop'`` (one example at a time: for
    modules whose operations have no correct batching rule under nested vmap)."""
    batched = set(batched)
    n = gy.shape[1]
    if method == "vmap":
        dims = [0 if j in batched else None for j in range(len(leaves))]

        def call(mod, p, a, kw):
            flat = tree_flatten((a, kw))[0]
            flat = [t.unsqueeze(0) if d == 0 else t for t, d in zip(flat, dims)]
            return _first_tensor(_run(mod, p, flat, spec)).squeeze(0)

        args, kwargs = tree_unflatten(list(leaves), spec)
        arg_dims, kw_dims = tree_unflatten(dims, spec)
        return per_example_vjp(module, names, tuple(args), dict(kwargs), gy, tuple(arg_dims),
                               dict(kw_dims), call=call)
    params = {nm: module.get_parameter(nm).detach() for nm in names}
    K = gy.shape[0]
    rows = []
    with recording_paused(), torch.enable_grad():
        for i in range(n):
            part = _slice(leaves, batched, i, i + 1)
            _, fn = vjp(lambda p: _first_tensor(_run(module, p, part, spec)), params)
            gi = [fn(gy[k, i:i + 1])[0] for k in range(K)]
            rows.append(torch.stack([torch.cat([g[nm].reshape(-1) for nm in names])
                                     for g in gi]))
    return torch.stack(rows, dim=1)


class GenericLayer(AbstractLayer):
    """Any other module with direct parameters; see the module docstring. Not registered: it is
    the fallback of [`LayerCollection.from_model`][nngeometry.layercollection.LayerCollection.from_model]."""

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

    def __getstate__(self):
        # the cached decisions of per_example_grad hold module classes (maybe local, not
        # picklable) and are cheap to redo
        state = dict(self.__dict__)
        state.pop("_decisions", None)
        return state

    def per_example_grad(self, module, x, gy):
        """``(K, n, numel)`` per-example gradients (see `AbstractLayer`).

        Which tensor arguments hold one row per example is decided from the data, not from
        their shape alone: an argument whose first axis merely has the batch size (a table of
        ``T`` rows with ``T == n``) is shared by the examples. The arguments (nested tuples,
        lists and dicts included, e.g. ``nn.LSTMCell``'s ``(h, c)``) are flattened; every tensor
        whose first axis has size ``n`` is a candidate, and the first hypothesis, among "all
        candidates are batched" and "only the first one (the module's input) is", under which
        running the module example by example reproduces its output on the whole batch is
        kept; none: ``ValueError``. Then the per-example gradients are taken with ``vmap``, or,
        for modules whose batching rules fail or are wrong under nested ``vmap`` (``nn.PReLU``),
        one example at a time; the choice is checked once against the whole batch's
        vector-Jacobian product with random weights per example. Both decisions are cached
        per module class and argument shapes."""
        args, kwargs = x
        n = gy.shape[1]
        leaves, spec = tree_flatten((tuple(args), dict(kwargs)))
        key = (type(module), n, tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor)
                                      else None for t in leaves))
        cache = self.__dict__.setdefault("_decisions", {})
        decision = cache.get(key)
        if decision is None:
            decision = self._decide(module, leaves, spec, gy)
            cache[key] = decision
        batched, method = decision
        return _leaf_vjp(module, self.param_names(), leaves, spec, batched, gy, method)

    def _decide(self, module, leaves, spec, gy):
        """``(batched leaf indices, 'vmap' | 'loop')`` for these arguments (see
        `per_example_grad`)."""
        n = gy.shape[1]
        names = self.param_names()
        cand = [j for j, t in enumerate(leaves)
                if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n]
        hypotheses = [cand] + ([cand[:1]] if len(cand) > 1 else [])
        params = {nm: module.get_parameter(nm).detach() for nm in names}
        with recording_paused(), torch.no_grad():
            full = _first_tensor(_run(module, params, leaves, spec))
        batched = None
        if len(hypotheses) == 1:
            batched = cand
        else:
            for h in hypotheses:
                try:
                    with recording_paused(), torch.no_grad():
                        outs = [_first_tensor(_run(module, params, _slice(leaves, h, i, i + 1),
                                                   spec)) for i in range(n)]
                    same = all(o.shape == full[i:i + 1].shape for i, o in enumerate(outs)) \
                        and torch.allclose(torch.cat(outs), full, rtol=1e-4, atol=1e-6)
                except RuntimeError:
                    same = False
                if same:
                    batched = h
                    break
            if batched is None:
                shapes = ", ".join(str(tuple(leaves[j].shape)) for j in cand)
                raise ValueError(
                    f"cannot tell which arguments of {type(module).__name__} hold one row per "
                    f"example: the tensors of shapes {shapes} all have the batch size {n} as first "
                    "axis, and running the module example by example reproduces its output on "
                    "the batch neither when all of them are split per example nor when only its "
                    "input is. Make a tensor shared by the examples a buffer or an attribute of "
                    "the module (not an argument), or use a batch size different from its "
                    "first dimension")
        # the per-example gradients, checked with random weights per example:
        # Σ_{k,i} w_i g_{k,i} = vjp of the whole batch with cotangent Σ_k w_i gy_{k,i}
        gen = torch.Generator().manual_seed(0)  # no global RNG state touched
        w = torch.rand(n, generator=gen, dtype=gy.dtype).to(gy.device) + 0.5
        cot = (gy * w.view(1, n, *([1] * (gy.dim() - 2)))).sum(0)
        if full.dim() and full.shape[0] == 1 and n > 1:
            # an output shared by the examples (expanded to the batch by the hooks)
            cot = cot.sum(0, keepdim=True)
        with recording_paused(), torch.enable_grad():
            _, fn = vjp(lambda p: _first_tensor(_run(module, p, leaves, spec)), params)
            ref = torch.cat([g.reshape(-1) for g in (fn(cot)[0][nm] for nm in names)])
        for method in ("vmap", "loop"):
            try:
                g = _leaf_vjp(module, names, leaves, spec, batched, gy, method)
            except RuntimeError as e:
                if "randomness" in str(e) or "is random" in str(e):
                    raise
                continue
            if tuple(g.shape) != (gy.shape[0], n, self.numel()):
                continue  # a batching rule that broadcast the examples together
            got = (g * w.view(1, n, 1)).sum((0, 1))
            scale = (g.norm(dim=2) * w.view(1, n)).sum() + ref.norm()
            if (got - ref).norm() <= 1e4 * torch.finfo(g.dtype).eps * scale:
                return batched, method
        raise RuntimeError(
            f"the per-example gradients of {type(module).__name__} (generic layer type, through "
            "torch.func) do not add up to the gradient of the whole batch: the module is not "
            "applied to each example independently, or an operation it uses has no correct "
            "per-example rule. Use PMatImplicit, or leave this module out of the "
            "LayerCollection (its parameters are then constants)")

    def kfac_factors(self, module, x, gy, approx="expand"):
        raise NotImplementedError(
            f"KFAC/EKFAC are not available for the module {type(module).__name__} (handled by the "
            "generic layer type: no Kronecker structure is known for it); use PMatDense, "
            "PMatBlockDiag, PMatDiag, PMatQuasiDiag, PMatLowRank or PMatImplicit, or a mixed "
            "representation (PMatEKFACBlockDiag) for this layer")
