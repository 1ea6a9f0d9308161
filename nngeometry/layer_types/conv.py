"""Convolutions and transposed convolutions in 1, 2 and 3 dimensions: spec and per-layer maths.

One core (`_ConvNdLayer`) serves all of them. A convolution is a Linear layer shared over
the output locations: with the input unfolded into patches ``U`` of shape
``(n, g, C_in/g * prod(k), L)`` (``g`` groups, ``L`` output locations) and the output gradient
``gy`` of shape ``(K, n, C_out, L)``, the per-example weight gradient is
``sum_l gy[..., l] U[..., l]ᵀ`` and the bias gradient ``sum_l gy[..., l]``.

A transposed convolution is the same thing once rewritten as the *equivalent direct
convolution*: the input with ``stride - 1`` zeros inserted between samples, padded by
``dilation * (k - 1) - padding`` on both sides (plus ``output_padding`` at the end), convolved
with stride 1 by the kernel flipped in space and with its in/out channel axes swapped. The maths
is done in that equivalent layout and re-indexed to the module's weight layout
``(C_in, C_out/g, *k)``.

Patch extraction is written once for any number of spatial dimensions (``Tensor.unfold`` per
dimension, dilation by slicing the windows), since torch only has ``F.unfold`` for 2-d.

KFAC (KFC, Grosse & Martens 2016; docs/layers.md, "KFAC on weight sharing"): ``'expand'`` (default) ``A = Σ_{i,l} u uᵀ``
over examples and locations, ``G = Σ_{k,i,l} g gᵀ / L``; for spatially constant inputs the exact
block is ``L ×`` KFAC. ``'reduce'`` (Eschenhagen et al. 2023): ``A = Σ_i ū ūᵀ`` with ``ū`` the
mean patch of example ``i``, ``G = Σ_{k,i} ĝ ĝᵀ`` with ``ĝ = Σ_l g``: exact when the patches do
not depend on the location. Grouped convolutions have no Kronecker structure over the whole
layer (block-diagonal over groups): KFAC refuses them.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..maths.gram_accumulator import GramRows
from .base import AbstractLayer, Parameter, register_layer_type

#: memory for the unfolded patches of one chunk of examples (see ``_example_chunks``)
PATCH_CHUNK_BYTES = 2 * 2 ** 20


#: ``_sum_of_grams`` on one thread: one batched product then a sum when each matrix's product
#: costs fewer than this many multiply-adds (``C² L``) ...
BMM_SUM_MAX_WORK = 2 ** 18
#: ... and, on any number of threads, when its ``(B, C, C)`` intermediate holds at most this
#: many numbers
BMM_SUM_MAX_NUMBERS = 2 ** 22


def _sum_of_grams(g):
    """``Σ_b g_b g_bᵀ`` for ``g`` of shape ``(B, C, L)``, by the faster kernel for the shape and
    the number of threads (measured on float32, CPU):

    * ``addbmm_`` accumulates the ``B`` products in place with no intermediate, but pays a fixed
      cost per product, and on several threads a synchronisation per product: on one thread it
      was 2-16× slower than ``bmm`` into a ``(B, C, C)`` intermediate summed over ``b`` when the
      products are small (``C² L < BMM_SUM_MAX_WORK``) and the fastest for larger ones; on two
      busy threads it was 2-40× slower than ``bmm`` and a sum at every shape;
    * ``bmm`` and a sum loses when the intermediate is large (``C = 512``, ``L = 49``: 1.8×
      slower than ``addbmm_`` on one thread, 2.3× slower than one GEMM on two); there, on
      several threads, one GEMM ``h hᵀ`` on a channels-first copy ``h`` (``(C, B L)``) is used.

    ``einsum`` was never the fastest by a clear margin."""
    B, C, L = g.shape
    fits = B * C * C <= BMM_SUM_MAX_NUMBERS
    if torch.get_num_threads() == 1:
        if fits and C * C * L < BMM_SUM_MAX_WORK:
            return torch.bmm(g, g.transpose(1, 2)).sum(dim=0)
        return g.new_zeros(C, C).addbmm_(g, g.transpose(1, 2))
    if fits:
        return torch.bmm(g, g.transpose(1, 2)).sum(dim=0)
    h = g.transpose(0, 1).reshape(C, B * L)
    return h @ h.t()


def _tuple(v, d):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


def extract_patches(x, kernel_size, dilation, stride, pads, examples_inner=False):
    """Patches of ``x`` (``(B, C, *spatial)``) for a convolution: ``(B, C * prod(k), L)``, or
    ``(C * prod(k), B * L)`` with ``examples_inner`` (one wide matrix whose Gram ``U Uᵀ`` is a
    single GEMM). Either way the one copy made is the result.

    ``pads``: ``((left, right), ...)`` per spatial dimension, zeros; negative values crop. The
    patch dimension is ordered like a conv weight ``(C, *k)`` row-major, locations row-major.
    """
    d = len(kernel_size)
    flat = []
    for lr in reversed(pads):  # F.pad wants the last dimension first
        flat.extend(lr)
    if any(flat):
        x = F.pad(x, flat)
    for i, (k, dil, s) in enumerate(zip(kernel_size, dilation, stride)):
        # windows of span dil*(k-1)+1 every s samples; appended as a trailing dimension
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
    # keep every dil-th element of each window (dilation)
    x = x[(Ellipsis,) + tuple(slice(None, None, dil) for dil in dilation)]
    B, C = x.shape[:2]
    locs = x.shape[2:2 + d]
    kdims, ldims = tuple(range(2 + d, 2 + 2 * d)), tuple(range(2, 2 + d))
    if examples_inner:
        # (B, C, L1..Ld, k1..kd) -> (C, k1..kd, B, L1..Ld)
        x = x.permute((1,) + kdims + (0,) + ldims)
        return x.reshape(C * math.prod(kernel_size), B * math.prod(locs))
    # (B, C, L1..Ld, k1..kd) -> (B, C, k1..kd, L1..Ld)
    x = x.permute((0, 1) + kdims + ldims)
    return x.reshape(B, C * math.prod(kernel_size), math.prod(locs))


class _ConvNdLayer(AbstractLayer):
    """Shared core of the (transposed) convolution layer types; see the module docstring."""

    n_dims = 2
    transposed = False
    supports_kfac = True

    def __init__(self, in_channels, out_channels, kernel_size, bias=True, groups=1):
        d = self.n_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _tuple(kernel_size, d)
        self.groups = groups
        # grouped convolutions have no single Kronecker structure (see kfac_factors)
        self.supports_kfac = type(self).supports_kfac and groups == 1
        if self.transposed:
            self.weight = Parameter(in_channels, out_channels // groups, *self.kernel_size)
        else:
            self.weight = Parameter(out_channels, in_channels // groups, *self.kernel_size)
        self.bias = Parameter(out_channels) if bias else None

    @classmethod
    def from_module(cls, module):
        return cls(module.in_channels, module.out_channels, module.kernel_size,
                   bias=module.bias is not None, groups=module.groups)

    def _key(self):
        return super()._key() + (self.groups,)

    # ------------------------------------------------------------------ patches
    def _direct_patches(self, module, x, examples_inner=False):
        """Patches of a direct convolution's input: ``(n, C_in * prod(k), L)`` (see
        `extract_patches` for ``examples_inner``)."""
        d = self.n_dims
        padding = module.padding
        if isinstance(padding, str):
            if padding == "valid":
                pads = [(0, 0)] * d
            else:  # 'same' (stride 1): total d*(k-1), the odd element goes to the end
                pads = []
                for k, dil in zip(module.kernel_size, module.dilation):
                    total = dil * (k - 1)
                    pads.append((total // 2, total - total // 2))
        else:
            pads = [(p, p) for p in _tuple(padding, d)]
        if module.padding_mode != "zeros":
            flat = []
            for lr in reversed(pads):
                flat.extend(lr)
            x = F.pad(x, flat, mode=module.padding_mode)
            pads = [(0, 0)] * d
        return extract_patches(x, module.kernel_size, _tuple(module.dilation, d),
                               _tuple(module.stride, d), pads, examples_inner)

    def _transposed_patches(self, module, x, out_spatial, examples_inner=False):
        """Patches of the equivalent direct convolution of a transposed one, computed for an
        output of spatial size ``out_spatial``; the kernel axis is in the flipped order."""
        d = self.n_dims
        stride, dil = _tuple(module.stride, d), _tuple(module.dilation, d)
        padding = _tuple(module.padding, d)
        n, C = x.shape[:2]
        in_sp = x.shape[2:]
        if any(s > 1 for s in stride):
            stuffed = x.new_zeros((n, C) + tuple((l - 1) * s + 1 for l, s in zip(in_sp, stride)))
            stuffed[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in stride)] = x
            x = stuffed
        pads = []
        for i in range(d):
            left = dil[i] * (self.kernel_size[i] - 1) - padding[i]
            # the right padding is whatever makes the output size come out (output_padding,
            # or an explicit output_size passed to forward)
            right = out_spatial[i] + dil[i] * (self.kernel_size[i] - 1) - x.shape[2 + i] - left
            pads.append((left, right))
        return extract_patches(x, self.kernel_size, dil, (1,) * d, pads, examples_inner)

    def _patches(self, module, x, gy, examples_inner=False):
        """Equivalent-direct-convolution patches grouped: ``(n, g, C_in/g * prod(k), L)``; with
        ``examples_inner``, ungrouped ``(C_in * prod(k), n L)`` (see `extract_patches`)."""
        if self.transposed:
            u = self._transposed_patches(module, x, gy.shape[3:], examples_inner)
        else:
            u = self._direct_patches(module, x, examples_inner)
        if examples_inner:
            return u
        n, D, L = u.shape
        return u.reshape(n, self.groups, D // self.groups, L)

    def _example_chunks(self, module, x, gy, examples_inner=False):
        """The batch by chunks of examples whose patches fit in `PATCH_CHUNK_BYTES`: yields
        ``(i0, i1, u)`` with ``u`` the patches of examples ``i0 .. i1 - 1`` (as
        `_patches`). The patches are ``prod(k)`` times the input (9.4 MiB for a batch of
        64 on a 16→32-channel 3×3 convolution, more than the per-example gradients of the whole model
        for one output direction): every statistic is a sum over examples, so it is
        accumulated chunk by chunk instead. The chunks are wide enough (there: 14-19 examples) that
        the per-chunk overhead does not show."""
        n = x.shape[0]
        per_example = (self.in_channels * math.prod(self.kernel_size)
                       * math.prod(gy.shape[3:]) * gy.element_size())
        nc = max(1, PATCH_CHUNK_BYTES // max(1, per_example))
        for i0 in range(0, n, nc):
            i1 = min(n, i0 + nc)
            yield i0, i1, self._patches(module, x[i0:i1], gy[:, i0:i1], examples_inner)

    # ------------------------------------------------------------------ layouts
    def _equiv_index(self):
        """``idx`` with ``idx[e]`` = the module's flat weight index at flat position ``e`` of
        the equivalent direct convolution's weight ``(C_out, C_in/g, *k)``."""
        numel = self.weight.numel()
        if not self.transposed:
            return torch.arange(numel)
        g, d = self.groups, self.n_dims
        cin_g, cout_g = self.in_channels // g, self.out_channels // g
        m = torch.arange(numel).reshape(g, cin_g, cout_g, *self.kernel_size)
        m = m.transpose(1, 2).flip(tuple(range(3, 3 + d)))
        return m.reshape(-1)

    def _to_module_order(self, gw):
        """Equivalent-layout flat weight gradients ``(..., numel_w)`` -> module layout."""
        if not self.transposed:
            return gw
        idx = self._equiv_index().to(gw.device)
        out = torch.empty_like(gw)
        out[..., idx] = gw
        return out

    def kfac_permutation(self):
        # Kronecker order: row-major [W_eq | b] of the equivalent direct convolution
        out, n_in = self._equivalent_out_in()
        rows = torch.arange(out).unsqueeze(1) * self._kronecker_width()
        perm_eq = (rows + torch.arange(n_in)).reshape(-1)
        if self.bias is not None:
            perm_eq = torch.cat([perm_eq, rows.reshape(-1) + n_in])
        if not self.transposed:
            return perm_eq
        nw = self.weight.numel()
        perm = perm_eq.clone()
        # module flat index idx[e] sits at equivalent position e
        perm[self._equiv_index()] = perm_eq[:nw]
        return perm

    def _equivalent_out_in(self):
        return self.out_channels, (self.in_channels // self.groups) * math.prod(self.kernel_size)

    def _kronecker_width(self):
        return self._equivalent_out_in()[1] + (1 if self.bias is not None else 0)

    # ------------------------------------------------------------------ maths
    def _grouped(self, gy):
        """Output gradients ``(K, n, C_out, *sp)`` -> ``(K, n, g, C_out/g, L)`` (a view)."""
        K, n, c_out = gy.shape[:3]
        return gy.reshape(K, n, self.groups, c_out // self.groups, -1)

    #: the output directions are folded into the rows of one product when the patches are at
    #: least this wide (see `_direction_grads`)
    FOLD_MIN_PATCH = 64
    #: memory for the permuted copy of a chunk of output gradients when folding
    FOLD_CHUNK_BYTES = 16 * 2 ** 20

    def _direction_grads(self, u, g):
        """Per-example weight gradients by chunks of output directions: yields ``(k0, k1, gw)``
        with ``gw`` of shape ``(k1 - k0, n, g, C_out/g, D/g)`` (equivalent layout), a view.

        Per example and group, the gradient of direction ``k`` is ``g[k] (C_out/g, L)`` times the
        patches' transpose ``(L, D/g)``: ``bmm`` over (example, group). Two ways to batch the
        directions, both exact:

        * narrow patches (``D/g < FOLD_MIN_PATCH``, e.g. a first layer on 3 channels): one
          direction at a time, as ``u (D/g, L) @ g[k]ᵀ (L, C_out/g)``, reading both in place
          (``D/g`` rows make the better product shape than ``C_out/g``);
        * wide patches: the directions of a chunk folded into the rows of one product
          ``(kc C_out/g, L) @ (L, D/g)``, which needs a permuted copy of the chunk's output
          gradients (``FOLD_CHUNK_BYTES`` at most); it pays off once ``D/g`` products are made
          per copied element.

        ``einsum`` folded all ``K`` directions with a copy of the whole ``(K, n, C_out, L)`` output
        gradient: 2.8x slower than the first way for a 3-channel 3×3 convolution (D = 27)."""
        n, ng, D, L = u.shape
        K = g.shape[0]
        cg = g.shape[3]
        ub = u.reshape(n * ng, D, L)
        if D < self.FOLD_MIN_PATCH:
            for k in range(K):
                gk = g[k].reshape(n * ng, cg, L)
                gw = torch.bmm(ub, gk.transpose(1, 2))  # (n g, D, cg)
                yield k, k + 1, gw.transpose(1, 2).reshape(1, n, ng, cg, D)
            return
        per_dir = n * ng * cg * L * g.element_size()
        n_chunks = max(1, -(-K * per_dir // self.FOLD_CHUNK_BYTES))
        kc = -(-K // n_chunks)
        uT = ub.transpose(1, 2)
        for k0 in range(0, K, kc):
            k1 = min(K, k0 + kc)
            gc = g[k0:k1].permute(1, 2, 0, 3, 4).reshape(n * ng, (k1 - k0) * cg, L)
            gw = torch.bmm(gc, uT)  # (n g, kc cg, D)
            yield k0, k1, gw.reshape(n, ng, k1 - k0, cg, D).permute(2, 0, 1, 3, 4)

    def grad_sum(self, module, x, gy):
        """``[∂W, ∂b]`` of ``Σ_i <gy_i, conv(x_i)>``: the convolution's own weight backward on
        the recorded input (no forward re-run). None where the recorded call cannot be read
        back unambiguously: transposed convolutions (their ``output_size`` argument is not
        recorded), string or non-zero-mode padding, unbatched inputs."""
        d = self.n_dims
        if self.transposed or module.padding_mode != "zeros" or \
                isinstance(module.padding, str) or x.dim() != d + 2 or gy.dim() != d + 2:
            return None
        bias = self.bias is not None
        _, gw, gb = torch.ops.aten.convolution_backward(
            gy, x, module.weight, [self.out_channels] if bias else None,
            _tuple(module.stride, d), _tuple(module.padding, d), _tuple(module.dilation, d),
            False, [0] * d, self.groups, [False, True, bias])
        return [gw, gb] if bias else [gw]

    def per_example_grad(self, module, x, gy):
        K, n = gy.shape[:2]
        nw = self.weight.numel()
        out = gy.new_empty(K, n, self.numel())
        for i0, i1, u in self._example_chunks(module, x, gy):
            for k0, k1, gw in self._direction_grads(u, self._grouped(gy[:, i0:i1])):
                out[k0:k1, i0:i1, :nw] = gw.reshape(k1 - k0, i1 - i0, nw)
        if self.transposed:
            out[:, :, :nw] = self._to_module_order(out[:, :, :nw])
        if self.bias is not None:
            out[:, :, nw:] = gy.reshape(K, n, self.out_channels, -1).sum(dim=3)
        return out

    def diag(self, module, x, gy):
        return self.diag_into(module, x, gy, gy.new_zeros(self.numel()))

    def diag_into(self, module, x, gy, out):
        """``out += Σ_{k,i} (per-example gradient)²`` without the ``(K, n, numel)`` per-example
        gradients: by chunks of examples (`_example_chunks`) and of directions (see
        `_direction_grads`), squared in place and summed over the chunk's directions and
        examples, so the transient is one chunk's patches and gradients."""
        K, n = gy.shape[:2]
        nw = self.weight.numel()
        # the equivalent layout's running sum: ``out`` itself for a direct convolution
        dw = out[:nw] if not self.transposed else out.new_zeros(nw)
        dw_e = dw.view(self.groups, self.out_channels // self.groups, -1)
        for i0, i1, u in self._example_chunks(module, x, gy):
            for _, _, gw in self._direction_grads(u, self._grouped(gy[:, i0:i1])):
                dw_e += gw.square_().sum(dim=(0, 1))
        if self.transposed:
            out[:nw] += self._to_module_order(dw)
        if self.bias is not None:
            gb = gy.reshape(K, n, self.out_channels, -1).sum(dim=3)
            out[nw:] += gb.square_().sum(dim=(0, 1))
        return out

    def kfe_diag(self, module, x, gy, UA, UG):
        """EKFAC's ``Σ_{k,i} (U_Gᵀ Ĝ_{k,i} U_A)²``, shape ``(C_out, D [+ 1])`` (Kronecker layout of
        the equivalent direct convolution), without the flat per-example gradients.

        ``Ĝ_{k,i} = Σ_l g_{k,i,l} ũ_{i,l}ᵀ`` with ``ũ`` the patch (and a trailing 1 for the
        bias), so ``Ĝ U_A = Σ_l g_l (U_Aᵀ ũ_l)ᵀ``: the patches are projected at every location
        once, then per direction the projected gradients of a chunk of examples
        (`_example_chunks`) are one ``bmm`` reading the output gradients in place, and
        ``U_Gᵀ`` is applied to that ``(C_out, D')`` result. Going through
        `per_example_grad` instead gathers ``(K, n, numel)`` into the Kronecker layout and
        projects it with transposed copies (1.3x slower on a 16→32-channel 3×3 convolution; folding
        the directions into the rows of one product needs a permuted copy of the output
        gradients, which costs as much as it saves)."""
        if self.groups != 1:
            return super().kfe_diag(module, x, gy, UA, UG)
        K, n, C = gy.shape[:3]
        D = self.in_channels * math.prod(self.kernel_size)
        total = None
        for i0, i1, u in self._example_chunks(module, x, gy):
            u = u[:, 0]  # (nc, D, L)
            nc, _, L = u.shape
            if isinstance(UA, int):
                up = u if self.bias is None else torch.cat([u, u.new_ones(nc, 1, L)], dim=1)
            else:
                up = torch.matmul(UA[:D].t(), u)  # U_Aᵀ ũ = U_A[:D]ᵀ u + U_A[D] (bias row)
                if self.bias is not None:
                    up += UA[D].unsqueeze(1)
            upT = up.transpose(1, 2)  # (nc, L, D')
            g = gy[:, i0:i1].reshape(K, nc, C, L)
            # U_Gᵀ (g ũᵀ U_A) = (U_Gᵀ g)(ũᵀ U_A): apply U_G on the side with fewer columns,
            # the L locations or the D' patch coordinates (C² L against C² D' per example: on
            # a ResNet's last 3×3 convolutions, L = 16 and D' = 4609)
            project_g_first = not isinstance(UG, int) and L < upT.shape[2]
            for k in range(K):
                gk = torch.matmul(UG.t(), g[k]) if project_g_first else g[k]
                gw = torch.bmm(gk, upT)  # (nc, C_out, D')
                if not isinstance(UG, int) and not project_g_first:
                    gw = torch.matmul(UG.t(), gw)
                s = gw.square_().sum(dim=0)
                total = s if total is None else total.add_(s)
        return total

    #: see ``kfac_factors``' ``input_factor`` (the generator skips ``A`` past the first chunk
    #: of output directions: for a convolution it is the costly factor)
    kfac_input_factor_optional = True
    #: ``kfac_factors(..., into=A)`` adds the batch's input factor into ``A`` in place
    kfac_input_factor_into = True

    def kfac_locations(self, module, x, gy, approx="expand"):
        return gy[0, 0, 0].numel() if approx == "expand" else 1

    def kfac_factors(self, module, x, gy, approx="expand", input_factor=True, into=None):
        """``(A, G)``, see the module docstring; with ``input_factor=False``, ``(None, G)``: ``A``
        depends on the inputs only, and the generator takes it once per batch. ``into``: with
        ``'expand'``, a ``(D', D')`` sum (``D' = C_in · prod(k)``, plus 1 with a bias) that the
        batch's ``A`` is added to in place and returned as ``A`` (a statistic's running sum: no
        factor-sized tensor per batch); otherwise ``A`` is a new tensor."""
        if self.groups != 1:
            raise NotImplementedError(
                f"KFAC for grouped convolutions (groups={self.groups}) is not implemented: the "
                "layer's block has no single Kronecker structure; use PMatBlockDiag, PMatDiag or "
                "PMatEKFACBlockDiag for this layer")
        if approx not in ("expand", "reduce"):
            raise ValueError(f"unknown KFAC approximation '{approx}': use 'expand' or 'reduce'")
        K, n, C = gy.shape[:3]
        g = gy.reshape(K, n, C, -1)  # (K, n, C_out, L)
        L = g.shape[3]
        D = self.in_channels * math.prod(self.kernel_size)
        if approx == "expand":
            # G: Σ over directions, examples and locations of g gᵀ
            G = _sum_of_grams(g.reshape(K * n, C, L)).div_(L)
            if not input_factor:
                return None, G
            # A: Σ over examples and locations of u uᵀ (trailing 1 for the bias), by chunks
            # of examples with the patches unfolded as one wide (D, n_c L) matrix: one GEMM a
            # chunk, accumulated in place
            side = D + (1 if self.bias is not None else 0)
            if into is None:
                A = gy.new_zeros(side, side)
            elif tuple(into.shape) != (side, side):
                raise ValueError(f"the input factor's sum has shape {tuple(into.shape)}, this "
                                 f"layer's is ({side}, {side})")
            else:
                A = into
            Aw = A[:D, :D]
            for _, _, v in self._example_chunks(module, x, gy, examples_inner=True):
                Aw.addmm_(v, v.t())
                if self.bias is not None:
                    A[:D, D] += v.sum(dim=1)
            if self.bias is not None:
                # border Σ u (mirrored), corner the number of rows n L
                A[D, :D] = A[:D, D]
                A[D, D] += float(n * L)
            return A, G
        Gr = GramRows(g.sum(dim=3).reshape(-1, C))  # summed gradient per example
        if not input_factor:
            return None, Gr
        # 'reduce': mean patch per example, by chunks of examples
        u = gy.new_empty(n, D + (1 if self.bias is not None else 0))
        for i0, i1, uc in self._example_chunks(module, x, gy):
            u[i0:i1, :D] = uc[:, 0].mean(dim=2)
        if self.bias is not None:
            u[:, D] = 1
        return GramRows(u), Gr


@register_layer_type
class Conv1dLayer(_ConvNdLayer):
    module_types = (nn.Conv1d,)
    n_dims = 1


@register_layer_type
class Conv2dLayer(_ConvNdLayer):
    module_types = (nn.Conv2d,)
    n_dims = 2


@register_layer_type
class Conv3dLayer(_ConvNdLayer):
    module_types = (nn.Conv3d,)
    n_dims = 3


@register_layer_type
class ConvTranspose1dLayer(_ConvNdLayer):
    module_types = (nn.ConvTranspose1d,)
    n_dims = 1
    transposed = True


@register_layer_type
class ConvTranspose2dLayer(_ConvNdLayer):
    module_types = (nn.ConvTranspose2d,)
    n_dims = 2
    transposed = True


@register_layer_type
class ConvTranspose3dLayer(_ConvNdLayer):
    module_types = (nn.ConvTranspose3d,)
    n_dims = 3
    transposed = True
