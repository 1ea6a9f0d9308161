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
module's forward, see `generic`), with the batch axis taken from ``batch_first``
(``key_padding_mask`` is split per example; a 3-D ``attn_mask`` ``(n * heads, L, S)`` too). The
attention is re-run with ``need_weights=True`` (the explicit softmax path, which vmap batches);
its first output is the same as with ``need_weights=False``. Examples are independent in
attention, so these are the exact per-example gradients. Dropout in training mode is refused
(the forward must be deterministic).

KFAC/EKFAC: the layer has several Kronecker blocks (block-diagonal inside the layer, see
``AbstractLayer.kfac_factors``): the input projections are Linear layers on sequences, and so is
``out_proj`` on the attention output ``Z``. Neither projection is a module (no hook fires on
them), so in the generator's pass the module's call runs through a recorder
(``internal_recorder``; the module instance's ``forward`` is replaced for that pass, nothing
global): the attention computation of ``F.multi_head_attention_forward``, written out, which
keeps the projections' inputs, their outputs ``Q = q W_qᵀ + b_q`` (and ``K``, ``V``), which the
backward pass then also differentiates to, and ``Z``, the input of ``out_proj``, whose output
gradient is the module's.
Masks, ``add_zero_attn`` and ``is_causal`` need no special case: the gradients are those of the
forward that actually ran. The blocks, in the Kronecker layout ``[W_q | b_q]``, ``[W_k | b_k]``,
``[W_v | b_v]`` (rows of ``in_proj_weight``/``in_proj_bias``, or ``q/k/v_proj_weight``), then
``[W_out | b_out]``, each row-major:

* consecutive projections that read the *same* input tensor share one block: self-attention
  (``query``, ``key``, ``value`` one tensor) has one ``Linear(E, 3E)`` block for ``in_proj``; a
  decoder's cross-attention (``key is value``) has a ``q`` block and a ``Linear(kdim, 2E)``
  block; otherwise one block per projection;
* ``out_proj``: a ``Linear(E, E)`` block on ``Z``.

Each block's factors are those of ``LinearLayer`` on sequences (``'expand'``: ``A`` sums over
positions, ``G`` over positions divided by their count; ``'reduce'``), so for sequences of
length 1 each block is the exact block of the Fisher. ``add_bias_kv`` (extra key/value rows that
are parameters) has no Kronecker structure here: such modules refuse KFAC (``supports_kfac`` is
False on their layer; use PMatEKFACBlockDiag).
"""
import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .base import AbstractLayer, Parameter, register_layer_type
from .generic import per_example_vjp
from .linear import LinearLayer, seq_grad_squares, seq_grads

_FORWARD_PARAMS = list(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]


def _bind_inputs(x):
    """The forward's arguments by name, from the ``(args, kwargs, ...)`` of `inputs_of`;
    unbatched (2-D) inputs are refused."""
    args, kwargs = x[:2]
    bound = dict(zip(_FORWARD_PARAMS, args))
    bound.update(kwargs)
    if bound["query"].dim() != 3:
        raise ValueError("MultiheadAttention with unbatched (2-D) inputs is not supported: "
                         "give the inputs a batch axis")
    return bound


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
        self.has_proj_bias = bias
        # the bias_k / bias_v rows are parameters inside the attention: no Kronecker structure
        self.supports_kfac = not add_bias_kv

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
        return call.args, call.kwargs, call.record, call.extra_gy

    def batch_axis(self, module):
        return 0 if module.batch_first else 1

    def per_example_grad(self, module, x, gy):
        if self.supports_kfac and x[2] is not None:
            # from the recomputed projections (see kfac_pieces): Σ_s g_s [a_s, 1]ᵀ per block,
            # one batched product each; 10-20x faster than vmap over examples of a vjp
            K, n = gy.shape[0], gy.shape[1 if module.batch_first else 2]
            kron = torch.cat([seq_grads(self._augmented(a), g).reshape(K, n, -1)
                              for a, g in self.kfac_pieces(module, x, gy)], dim=2)
            return kron[..., self._flat_to_kron().to(kron.device)]
        return self._per_example_grad_vmap(module, x, gy)

    def diag(self, module, x, gy):
        """``Σ_{k,i} g_{k,i}²``: per Kronecker block (see `kfac_pieces`), the squares of
        ``Σ_s g_s [a_s, 1]ᵀ`` formed by chunks of directions (`linear.seq_grad_squares`),
        then re-indexed to the flat layout."""
        if not self.supports_kfac or x[2] is None:
            return super().diag(module, x, gy)
        kron = torch.cat([seq_grad_squares(self._augmented(a), g).reshape(-1)
                          for a, g in self.kfac_pieces(module, x, gy)])
        return kron[self._flat_to_kron().to(kron.device)]

    def _augmented(self, a):
        """Inputs ``(n, S, d)`` with a trailing 1 when the projections have biases (the
        ``[W | b]`` layout of the Kronecker blocks)."""
        if not self.has_proj_bias:
            return a
        return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)

    def _flat_to_kron(self):
        """`kfac_permutation`, computed once per layer spec."""
        perm = getattr(self, "_perm_cache", None)
        if perm is None:
            perm = self._perm_cache = self.kfac_permutation()
        return perm

    def _per_example_grad_vmap(self, module, x, gy):
        """torch.func path (vmap over examples of the module's vjp), for the modules without a
        Kronecker layout (``add_bias_kv``)."""
        bound = _bind_inputs(x)
        query, key, value = bound["query"], bound["key"], bound["value"]
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

    # ------------------------------------------------------------------ KFAC
    def _proj_sizes(self):
        """Input widths of the q, k, v projections."""
        return [self.embed_dim, self.kdim, self.vdim]

    def kfac_permutation(self):
        """Flat -> Kronecker index; Kronecker layout: ``[W_q | b_q]``, ``[W_k | b_k]``,
        ``[W_v | b_v]``, ``[W_out | b_out]`` one after the other, each row-major ``(E, in + 1)``
        (``(E, in)`` without biases). Blocks sharing an input are contiguous runs of it."""
        if not self.supports_kfac:
            raise NotImplementedError("MultiheadAttention with add_bias_kv has no KFAC layout")
        E, nb = self.embed_dim, 1 if self.has_proj_bias else 0
        offsets, pos = {}, 0
        for name, p in self._specs:
            offsets[name] = pos
            pos += p.numel()
        # (weight flat offset, row stride, bias flat offset) of each of the 4 sub-blocks
        subs = []
        for j, d in enumerate(self._proj_sizes()):
            if "in_proj_weight" in offsets:
                w0 = offsets["in_proj_weight"] + j * E * E
            else:
                w0 = offsets[("q_proj_weight", "k_proj_weight", "v_proj_weight")[j]]
            b0 = offsets["in_proj_bias"] + j * E if nb else None
            subs.append((w0, d, b0))
        subs.append((offsets["out_proj.weight"], E, offsets["out_proj.bias"] if nb else None))
        kron_to_flat = []
        for w0, d, b0 in subs:
            rows = torch.arange(E).unsqueeze(1)
            cols = [w0 + rows * d + torch.arange(d)]
            if b0 is not None:
                cols.append(b0 + rows)
            kron_to_flat.append(torch.cat(cols, dim=1).reshape(-1))
        inv = torch.cat(kron_to_flat)
        perm = torch.empty_like(inv)
        perm[inv] = torch.arange(inv.numel())
        return perm

    def kfac_pieces(self, module, x, gy):
        """The Kronecker blocks of one call: a list of ``(inputs (n, S, d_in), output gradients
        (K, n, S, rows))`` of Linear maps on sequences, batch first, in the Kronecker layout
        order (see the module docstring). ``Σ_s g_s [a_s, 1]ᵀ`` (per example and output) is the
        block's exact per-example gradient, in the row-major ``[W | b]`` layout.

        The projections' inputs and output gradients are those recorded in the generator's
        pass (`internal_recorder`): the backward pass that gives the module's output
        gradient goes through the attention anyway, and gives the projections' output
        gradients on the way. (Re-running the attention from recorded inputs and pulling the
        output gradients back through it again cost a third of the floor on a small
        transformer.)"""
        if not self.supports_kfac:
            raise NotImplementedError(
                "KFAC/EKFAC are not available for a MultiheadAttention with add_bias_kv (its "
                "bias_k / bias_v rows have no Kronecker structure); use PMatEKFACBlockDiag, "
                "PMatBlockDiag or a PMatMixed with another representation for this layer")
        args, kwargs, record, extra_gy = x
        _bind_inputs(x)  # unbatched inputs are refused
        if module.training and module.dropout > 0:
            raise RuntimeError(
                "the forward of MultiheadAttention is random (dropout in training mode): KFAC "
                "needs a deterministic forward; call model.eval() or set dropout=0")
        if record is None:
            raise RuntimeError(
                "no input projections were recorded for this call of the MultiheadAttention: "
                "its statistics are taken in the pass of nngeometry's Jacobian generator")
        proj_inputs, z = record
        # the recorded tensors are time-major (L, n, ·), as F.multi_head_attention_forward
        # works; pieces are batch first
        pieces = []
        j = 0
        while j < len(proj_inputs):
            run = [j]
            while run[-1] + 1 < len(proj_inputs) and \
                    _same_tensor(proj_inputs[run[-1] + 1], proj_inputs[j]):
                run.append(run[-1] + 1)
            g = extra_gy[j] if len(run) == 1 else torch.cat([extra_gy[r] for r in run], dim=-1)
            pieces.append((proj_inputs[j].transpose(0, 1), g.transpose(1, 2)))
            j = run[-1] + 1
        # out_proj is Linear(E, E) on the attention output Z, rows (target position, example);
        # its output gradient is the module's
        gy_bf = gy if module.batch_first else gy.transpose(1, 2)  # (K, n, L, E)
        n, L = gy_bf.shape[1], gy_bf.shape[2]
        pieces.append((z.reshape(L, n, -1).transpose(0, 1), gy_bf))
        return pieces

    def internal_recorder(self, module):
        return _ProjectionRecorder(module)

    def _linear(self, a, g):
        return LinearLayer(a.shape[-1], g.shape[-1], bias=self.has_proj_bias)

    def kfac_factors(self, module, x, gy, approx="expand"):
        """A list of ``(A, G)`` (GramRows), one per Kronecker block (see the module docstring):
        each block's factors are ``LinearLayer``'s on sequences (``approx``: ``'expand'`` or
        ``'reduce'``)."""
        return [self._linear(a, g).kfac_factors(None, a, g, approx=approx)
                for a, g in self.kfac_pieces(module, x, gy)]

    def kfe_diag_blocks(self, module, x, gy, bases):
        """Per block, ``Σ_{k,i} (U_Gᵀ Ĝ U_A)²`` with ``Ĝ = Σ_s g_s [a_s, 1]ᵀ`` formed from the
        recomputed inputs and output gradients of the projections (no torch.func pass)."""
        pieces = self.kfac_pieces(module, x, gy)
        if len(pieces) != len(bases):
            raise ValueError(f"{len(bases)} eigenbases given for the {len(pieces)} Kronecker "
                             "blocks of this call of the attention layer")
        return [self._linear(a, g).kfe_diag(None, a, g, UA, UG)
                for (a, g), (UA, UG) in zip(pieces, bases)]


def _same_tensor(a, b):
    """Whether two recorded inputs are the same tensor (the generator's hooks record detached
    copies, so identity is lost; the memory they view is not)."""
    if a is b:
        return True
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.device == b.device and a.storage_offset() == b.storage_offset()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


class _ProjectionRecorder:
    """The record of one call of a MultiheadAttention in the generator's pass: its input
    projections (one for self-attention, two when ``key is value``, three otherwise, in q, k, v
    order, as ``F.multi_head_attention_forward`` makes them) and the input ``Z`` of
    ``out_proj``.

    Nothing global is touched: the generator replaces the ``forward`` of the module *instance*
    (never the class, never ``torch.nn.functional``) for the time of its pass (see
    ``AbstractLayer.internal_recorder``), and that forward calls `forward` of the call's
    recorder, which runs `_recorded_attention`: the computation of
    ``nn.MultiheadAttention.forward`` / ``F.multi_head_attention_forward`` (slow path) written
    out, with the projections made here so that their inputs and outputs can be kept. So two
    threads with two models, or any other ``F.linear`` call meanwhile, are not affected.
    Configurations it does not write out (unbatched inputs, ``add_bias_kv``, a newer torch's
    extra arguments, a forward overridden by a subclass or on the instance) run the module's own
    forward and record nothing: KFAC then says so, per-example gradients and diagonals take the
    ``torch.func`` path.

    ``targets``: the projections' outputs, whose gradients the backward pass gives (in
    ``Call.extra_gy``); ``record``: ``(projection inputs, out_proj input)``, detached and
    time-major like in ``F.multi_head_attention_forward``."""

    def __init__(self, module):
        self.module = module
        self.linears = []  # (input, output) of each input projection
        self.z = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def forward(self, original, *args, **kwargs):
        try:
            bound = dict(zip(_FORWARD_PARAMS, args))
            if len(args) > len(_FORWARD_PARAMS) or set(bound) & set(kwargs):
                raise TypeError
            bound.update(kwargs)
            if set(bound) - set(_RECORDED_ARGS) or not {"query", "key", "value"} <= set(bound):
                raise TypeError
        except TypeError:
            return original(*args, **kwargs)
        m = self.module
        if (getattr(original, "__func__", None) is not nn.MultiheadAttention.forward
                or bound["query"].dim() != 3 or m.bias_k is not None or m.bias_v is not None):
            # a forward of the user's (subclass or instance attribute) runs as it is
            return original(*args, **kwargs)
        return _recorded_attention(m, self, **bound)

    def _linear(self, x, w, b):
        out = F.linear(x, w, b)
        self.linears.append((x, out))
        return out

    @property
    def targets(self):
        if self.z is None:
            return []
        return [out for _, out in self.linears]

    @property
    def record(self):
        if self.z is None:
            return None
        return [a.detach() for a, _ in self.linears], self.z.detach()


#: the arguments of ``nn.MultiheadAttention.forward`` that `_recorded_attention` takes
_RECORDED_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
                  "average_attn_weights", "is_causal")


def _recorded_attention(mod, rec, query, key, value, key_padding_mask=None, need_weights=True,
                        attn_mask=None, average_attn_weights=True, is_causal=False):
    """``mod(query, key, value, ...)`` for batched inputs and no ``bias_k``/``bias_v``: the
    operations of ``nn.MultiheadAttention.forward`` and ``F.multi_head_attention_forward``
    (torch 2.x slow path: same values), with the input projections and the out projection's
    input recorded in ``rec``. Shapes: ``query (L, n, E)`` (``(n, L, E)`` if batch_first),
    ``key (S, n, kdim)``, ``value (S, n, vdim)``; returns ``(output, weights or None)``."""
    # nn.MultiheadAttention.forward
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask",
        other_type=F._none_or_dtype(attn_mask), other_name="attn_mask", target_type=query.dtype)
    attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                  other_name="", target_type=query.dtype, check_other=False)
    if mod.batch_first:
        # transposed so that the "is" relations between query, key and value are kept
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    # F.multi_head_attention_forward
    tgt_len, bsz, E = query.shape
    src_len = key.shape[0]
    H = mod.num_heads
    head_dim = E // H
    if E != mod.embed_dim:
        raise AssertionError(f"was expecting embedding dimension of {mod.embed_dim}, but got {E}")
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the "
                           "Transformer module method `generate_square_subsequent_mask` to "
                           "create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None,
                                      other_name="", target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    # the input projections (F._in_projection_packed / F._in_projection), recorded
    b = mod.in_proj_bias
    if mod._qkv_same_embed_dim:
        w = mod.in_proj_weight
        if key is value and query is key:
            proj = rec._linear(query, w, b)
            proj = proj.unflatten(-1, (3, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            q, k, v = proj[0], proj[1], proj[2]
        elif key is value:
            w_q, w_kv = w.split([E, 2 * E])
            b_q, b_kv = (None, None) if b is None else b.split([E, 2 * E])
            q = rec._linear(query, w_q, b_q)
            kv = rec._linear(key, w_kv, b_kv)
            kv = kv.unflatten(-1, (2, E)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
            k, v = kv[0], kv[1]
        else:
            w_q, w_k, w_v = w.chunk(3)
            b_q, b_k, b_v = (None,) * 3 if b is None else b.chunk(3)
            q, k, v = (rec._linear(query, w_q, b_q), rec._linear(key, w_k, b_k),
                       rec._linear(value, w_v, b_v))
    else:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match "
                                 f"value's {value.shape[:2]}")
        b_q, b_k, b_v = (None,) * 3 if b is None else b.chunk(3)
        q, k, v = (rec._linear(query, mod.q_proj_weight, b_q),
                   rec._linear(key, mod.k_proj_weight, b_k),
                   rec._linear(value, mod.v_proj_weight, b_v))
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but "
                                   f"should be {(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * H, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but "
                                   f"should be {(bsz * H, tgt_len, src_len)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    q = q.view(tgt_len, bsz * H, head_dim).transpose(0, 1)
    k = k.view(k.shape[0], bsz * H, head_dim).transpose(0, 1)
    v = v.view(v.shape[0], bsz * H, head_dim).transpose(0, 1)
    if mod.add_zero_attn:
        zeros = torch.zeros((bsz * H, 1, head_dim), dtype=k.dtype, device=k.device)
        k = torch.cat([k, zeros], dim=1)
        v = torch.cat([v, zeros.to(v.dtype)], dim=1)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        if key_padding_mask.shape != (bsz, src_len):
            raise AssertionError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                 f"{key_padding_mask.shape}")
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, H, -1, -1)
                            .reshape(bsz * H, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    dropout_p = mod.dropout if mod.training else 0.0
    weights = None
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if is_causal and attn_mask is None:
            raise AssertionError("FIXME: is_causal not implemented for need_weights")
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        z = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, E)
        weights = weights.view(bsz, H, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, H, -1, src_len)
        z = F.scaled_dot_product_attention(
            q.view(bsz, H, tgt_len, head_dim), k.view(bsz, H, src_len, head_dim),
            v.view(bsz, H, src_len, head_dim), attn_mask, dropout_p, is_causal)
        z = z.permute(2, 0, 1, 3).reshape(bsz * tgt_len, E)
    rec.z = z
    out = F.linear(z, mod.out_proj.weight, mod.out_proj.bias).view(tgt_len, bsz, -1)
    if mod.batch_first:
        out = out.transpose(1, 0)
    return out, weights
