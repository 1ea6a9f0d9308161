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
(the forward must be deterministic).

KFAC/EKFAC: the layer has several Kronecker blocks (block-diagonal inside the layer, see
``AbstractLayer.kfac_factors``): the input projections are Linear layers on sequences, and so is
``out_proj`` on the attention output. From the recorded call, the attention is re-run from the
projections' outputs ``Q = q W_qᵀ + b_q`` (and ``K``, ``V``), made autograd leaves, to the
attention output ``Z`` fed to ``out_proj`` (through ``F.multi_head_attention_forward`` with
identity projections, so that masks, ``add_zero_attn`` and ``is_causal`` mean exactly what they
mean to the module); the output gradients ``gy`` are pulled back to ``∂/∂Q``, ``∂/∂K``,
``∂/∂V`` per position in one batched backward (``is_grads_batched``), and ``Z``'s are
``gy W_out``. The blocks, in the Kronecker layout ``[W_q | b_q]``, ``[W_k | b_k]``,
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

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .base import AbstractLayer, Parameter, recording_paused, register_layer_type
from .generic import per_example_vjp
from .linear import LinearLayer, seq_grad_squares, seq_grads

_FORWARD_PARAMS = list(inspect.signature(nn.MultiheadAttention.forward).parameters)[1:]


def _bind_inputs(x):
    """The forward's arguments by name, from the ``(args, kwargs)`` the hook recorded; unbatched
    (2-D) inputs are refused."""
    args, kwargs = x
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
        return call.args, call.kwargs

    def per_example_grad(self, module, x, gy):
        if self.supports_kfac:
            # from the recomputed projections (see kfac_pieces): Σ_s g_s [a_s, 1]ᵀ per block,
            # one batched product each; 10-20x faster than vmap over examples of a vjp
            K, n = gy.shape[0], gy.shape[1 if module.batch_first else 2]
            kron = torch.cat([seq_grads(self._augmented(a), g).reshape(K, n, -1)
                              for a, g in self.kfac_pieces(module, x, gy)], dim=2)
            return kron[..., self._flat_to_kron().to(kron.device)]
        return self._per_example_grad_vmap(module, x, gy)

    def diag(self, module, x, gy):
        """``Σ_{k,i} g_{k,i}²``: per Kronecker block (see :meth:`kfac_pieces`), the squares of
        ``Σ_s g_s [a_s, 1]ᵀ`` formed by chunks of directions (:func:`.linear.seq_grad_squares`),
        then re-indexed to the flat layout."""
        if not self.supports_kfac:
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
        """:meth:`kfac_permutation`, computed once per layer spec."""
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
        block's exact per-example gradient, in the row-major ``[W | b]`` layout."""
        if not self.supports_kfac:
            raise NotImplementedError(
                "KFAC/EKFAC are not available for a MultiheadAttention with add_bias_kv (its "
                "bias_k / bias_v rows have no Kronecker structure); use PMatEKFACBlockDiag, "
                "PMatBlockDiag or a PMatMixed with another representation for this layer")
        bound = _bind_inputs(x)
        query, key, value = bound["query"], bound["key"], bound["value"]
        if module.training and module.dropout > 0:
            raise RuntimeError(
                "the forward of MultiheadAttention is random (dropout in training mode): KFAC "
                "needs a deterministic forward; call model.eval() or set dropout=0")
        E = self.embed_dim
        if module._qkv_same_embed_dim:
            Ws = module.in_proj_weight.detach().split(E)
        else:
            Ws = (module.q_proj_weight.detach(), module.k_proj_weight.detach(),
                  module.v_proj_weight.detach())
        bs = (None,) * 3 if module.in_proj_bias is None else module.in_proj_bias.detach().split(E)
        W_out = module.out_proj.weight.detach()
        # time-major (what F.multi_head_attention_forward takes)
        tm = (query, key, value) if module.batch_first is False else \
            tuple(t.transpose(0, 1) for t in (query, key, value))
        # gy is (K, n, L, E) batch first, else (K, L, n, E); grad of Z (before out_proj) = gy W_out
        gz = gy @ W_out
        plain = (bound.get("key_padding_mask") is None and bound.get("attn_mask") is None
                 and not bound.get("is_causal", False) and not module.add_zero_attn)
        if plain:
            # no mask / zero-attention row: closed-form backward of softmax(Q Kᵀ/√d) V per
            # head (batched matmuls, no autograd graph; ~4x faster than the general path)
            inputs = [t.transpose(0, 1) for t in tm] if module.batch_first is False \
                else [query, key, value]
            with torch.no_grad():
                if module._qkv_same_embed_dim and _same_tensor(tm[0], tm[1]) \
                        and _same_tensor(tm[0], tm[2]):
                    # self-attention: one product with in_proj, split into column views
                    projs = F.linear(inputs[0], module.in_proj_weight.detach(),
                                     None if bs[0] is None else module.in_proj_bias.detach()
                                     ).split(E, dim=-1)
                else:
                    projs = [F.linear(t, W, b) for t, W, b in zip(inputs, Ws, bs)]
                z, grads = _sdpa_pullback(*projs, module.num_heads,
                                          gz if module.batch_first else gz.transpose(1, 2))
        else:
            with torch.no_grad():
                leaves = [F.linear(t, W, b).contiguous().requires_grad_()
                          for t, W, b in zip(tm, Ws, bs)]
            eye = torch.eye(E, dtype=W_out.dtype, device=W_out.device)
            gz_tm = gz if not module.batch_first else gz.transpose(1, 2)
            with recording_paused(), torch.enable_grad():
                Z = F.multi_head_attention_forward(
                    *leaves, E, module.num_heads, None, None, None, None, module.add_zero_attn,
                    0.0, eye, None, training=False,
                    key_padding_mask=bound.get("key_padding_mask"), need_weights=True,
                    attn_mask=bound.get("attn_mask"), use_separate_proj_weight=True,
                    q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
                    is_causal=bool(bound.get("is_causal", False)))[0]
                grads = _batched_vjp(Z, leaves, gz_tm)
            # batch first: inputs (n, S, d), gradients (K, n, S, E)
            inputs = [t.transpose(0, 1) for t in tm]
            grads = [g.transpose(1, 2) for g in grads]
            z = Z.detach().transpose(0, 1)
        pieces = []
        j = 0
        while j < 3:
            run = [j]
            while run[-1] + 1 < 3 and _same_tensor(tm[run[-1] + 1], tm[j]):
                run.append(run[-1] + 1)
            g = grads[j] if len(run) == 1 else torch.cat([grads[r] for r in run], dim=-1)
            pieces.append((inputs[j], g))
            j = run[-1] + 1
        # out_proj is Linear(E, E) on Z: its output gradient is gy itself
        pieces.append((z, gy if module.batch_first else gy.transpose(1, 2)))
        return pieces

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


def _sdpa_pullback(q, k, v, heads, gz):
    """Multi-head attention without masks, batch first: ``q`` ``(n, L, E)``, ``k``, ``v``
    ``(n, S, E)`` (projected), ``gz`` ``(K, n, L, E)`` gradients of the attention output.

    Per head ``h`` (columns ``h·d .. (h+1)·d`` of ``E``, ``d = E / heads``): ``P = softmax(Q Kᵀ /
    √d)`` over keys, ``Z = P V``; the pullback of ``gZ`` is ``∂V = Pᵀ gZ``, ``∂S = P ⊙ (gZ Vᵀ -
    rowsum(P ⊙ gZ Vᵀ))``, ``∂Q = ∂S K / √d``, ``∂K = ∂Sᵀ Q / √d``. Returns ``Z`` ``(n, L, E)``
    and ``[∂Q, ∂K, ∂V]`` ``(K, n, ·, E)``, for all ``K`` directions in batched products."""
    n, L, E = q.shape
    S = k.shape[1]
    K = gz.shape[0]
    d = E // heads
    scale = d ** -0.5
    z = q.new_empty(n, L, E)
    gq, gk, gv = q.new_empty(K, n, L, E), q.new_empty(K, n, S, E), q.new_empty(K, n, S, E)

    def over_k(t):  # (n, T, d) -> (K n, T, d): the same for every direction
        return t if K == 1 else t.expand(K, *t.shape).reshape(K * n, *t.shape[1:])

    # one head at a time: a head's columns of (n, T, E) are a strided (n, T, d) view that bmm
    # reads in place (splitting heads into a (n, heads, T, d) batch would copy every operand)
    for h in range(heads):
        cols = slice(h * d, (h + 1) * d)
        qh, kh, vh = q[..., cols], k[..., cols], v[..., cols]
        P = torch.softmax(torch.bmm(qh, kh.transpose(1, 2)).mul_(scale), dim=-1)  # (n, L, S)
        z[..., cols] = torch.bmm(P, vh)
        PK = over_k(P)
        g = gz[..., cols].reshape(K * n, L, d)
        gv[..., cols] = torch.bmm(PK.transpose(1, 2), g).view(K, n, S, d)
        gs = torch.bmm(g, over_k(vh).transpose(1, 2))  # ∂P, (K n, L, S)
        gs.sub_((gs * PK).sum(dim=-1, keepdim=True)).mul_(PK).mul_(scale)
        gq[..., cols] = torch.bmm(gs, over_k(kh)).view(K, n, L, d)
        gk[..., cols] = torch.bmm(gs.transpose(1, 2), over_k(qh)).view(K, n, S, d)
    return z, [gq, gk, gv]


def _same_tensor(a, b):
    """Whether two recorded inputs are the same tensor (the generator's hooks record detached
    copies, so identity is lost; the memory they view is not)."""
    if a is b:
        return True
    return (a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.device == b.device and a.storage_offset() == b.storage_offset()
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


def _batched_vjp(out, leaves, cot):
    """``[∂<cot_k, out>/∂leaf]`` for every row ``k`` of ``cot`` ``(K, *out.shape)``: tensors of
    shape ``(K, *leaf.shape)``."""
    K = cot.shape[0]
    if K == 1:
        gs = torch.autograd.grad(out, leaves, cot[0], allow_unused=True)
        gs = [None if g is None else g.unsqueeze(0) for g in gs]
    else:
        try:
            gs = torch.autograd.grad(out, leaves, cot, retain_graph=True, allow_unused=True,
                                     is_grads_batched=True)
        except RuntimeError:
            # an op without a batching rule: one backward per output direction
            per_k = [torch.autograd.grad(out, leaves, cot[k], retain_graph=True,
                                         allow_unused=True) for k in range(K)]
            gs = [None if per_k[0][j] is None else torch.stack([p[j] for p in per_k])
                  for j in range(len(leaves))]
    return [torch.zeros((K,) + t.shape, dtype=t.dtype, device=t.device) if g is None else g
            for g, t in zip(gs, leaves)]
