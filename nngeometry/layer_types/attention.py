"""``torch.nn.MultiheadAttention`` as ONE layer (with its nested ``out_proj``).

``MultiheadAttention.forward`` calls ``F.multi_head_attention_forward`` with
``out_proj.weight``/``out_proj.bias`` directly, so ``out_proj`` (a ``Linear`` subclass) is never
called as a module and hooks on it never fire: the attention block is one layer whose parameters
are all of the module's parameters, in ``named_parameters()`` order:

    in_proj_weight (3E, E)              [or q_proj_weight (E, E), k_proj_weight (E, kdim),
                                         v_proj_weight (E, vdim) when kdim/vdim differ from E]
    in_proj_bias (3E,)                  if bias
    bias_k (1, 1, E), bias_v (1, 1, E)  if add_bias_kv
    out_proj.weight (E, E)
    out_proj.bias (E,)                  if bias

``LayerCollection.from_model`` does not make ``out_proj`` a layer of its own.

Per-example gradients: ``torch.func`` (vmap over examples of the vector-Jacobian product of the
module's forward, see :mod:`.generic`), with the batch axis taken from ``batch_first``
(``key_padding_mask`` is split per example; a 3-D ``attn_mask`` ``(n * heads, L, S)`` too). The
attention is re-run with ``need_weights=True`` (the explicit softmax path, which vmap batches);
its first output is the same as with ``need_weights=False``. Examples are independent in
attention, so these are the exact per-example gradients. Dropout in training mode is refused
(the forward must be deterministic). KFAC/EKFAC: no single Kronecker structure (two projections
around a bilinear attention), refused.
"""
import inspect

from torch import nn
from torch.func import functional_call

from .base import AbstractLayer, Parameter, register_layer_type
from .generic import per_example_vjp

_FORWARD_PARAMS = list(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]


@register_layer_type
class MultiheadAttentionLayer(AbstractLayer):
    module_types = (nn.MultiheadAttention,)
    supports_kfac = False

    def __init__(self, embed_dim, num_heads, bias=True, add_bias_kv=False, kdim=None, vdim=None):
        E = embed_dim
        kdim = E if kdim is None else kdim
        vdim = E if vdim is None else vdim
        self.embed_dim, self.num_heads = E, num_heads
        self.kdim, self.vdim = kdim, vdim
        specs = []
        if kdim == E and vdim == E:
            specs.append(("in_proj_weight", Parameter(3 * E, E)))
        else:
            specs += [("q_proj_weight", Parameter(E, E)), ("k_proj_weight", Parameter(E, kdim)),
                      ("v_proj_weight", Parameter(E, vdim))]
        if bias:
            specs.append(("in_proj_bias", Parameter(3 * E)))
        if add_bias_kv:
            specs += [("bias_k", Parameter(1, 1, E)), ("bias_v", Parameter(1, 1, E))]
        specs.append(("out_proj.weight", Parameter(E, E)))
        if bias:
            specs.append(("out_proj.bias", Parameter(E)))
        self._specs = specs
        self.weight = specs[0][1]
        self.bias = None

    @classmethod
    def from_module(cls, module):
        layer = cls(module.embed_dim, module.num_heads, bias=module.in_proj_bias is not None,
                    add_bias_kv=module.bias_k is not None, kdim=module.kdim, vdim=module.vdim)
        found = [(n, tuple(p.shape)) for n, p in module.named_parameters()]
        if found != [(n, p.size) for n, p in layer._specs]:
            raise TypeError(f"unexpected parameters for a MultiheadAttention: {found}")
        return layer

    def param_specs(self):
        return list(self._specs)

    def _key(self):
        return super()._key() + (self.num_heads,)

    def inputs_of(self, call):
        return call.args, call.kwargs

    def per_example_grad(self, module, x, gy):
        args, kwargs = x
        bound = dict(zip(_FORWARD_PARAMS, args))
        bound.update(kwargs)
        query, key, value = bound["query"], bound["key"], bound["value"]
        if query.dim() != 3:
            raise ValueError("MultiheadAttention with unbatched (2-D) inputs is not supported: "
                             "give the inputs a batch axis")
        axis = 0 if module.batch_first else 1
        # gy is (K, *output shape): (K, n, L, E) when batch_first, else (K, L, n, E)
        n = gy.shape[1 + axis]
        kpm = bound.get("key_padding_mask")
        attn_mask = bound.get("attn_mask")
        mask_dim = None
        if attn_mask is not None and attn_mask.dim() == 3:
            # (n * heads, L, S) -> (n, heads, L, S): one (heads, L, S) slice per example
            attn_mask = attn_mask.reshape(n, -1, *attn_mask.shape[1:])
            mask_dim = 0
        is_causal = bool(bound.get("is_causal", False))
        tensors = (query, key, value, kpm, attn_mask)
        dims = [axis, axis, axis, None if kpm is None else 0, mask_dim]

        def call(mod, p, a, kw):
            q, k, v, m, am = a
            q, k, v = q.unsqueeze(axis), k.unsqueeze(axis), v.unsqueeze(axis)
            out = functional_call(mod, p, (q, k, v), {
                "key_padding_mask": None if m is None else m.unsqueeze(0),
                "attn_mask": am, "need_weights": True, "is_causal": is_causal})[0]
            return out.squeeze(axis)

        if axis == 1:  # per-example gradients are indexed (K, n, ...)
            gy = gy.transpose(1, 2)
        return per_example_vjp(module, self.param_names(), tensors, {}, gy, dims, {}, call=call)

    def kfac_factors(self, module, x, gy, approx="expand"):
        raise NotImplementedError(
            "KFAC/EKFAC are not available for MultiheadAttention (no single Kronecker structure); "
            "use PMatDense, PMatBlockDiag, PMatDiag, PMatLowRank or PMatImplicit, or "
            "PMatEKFACBlockDiag (dense blocks for such layers)")
