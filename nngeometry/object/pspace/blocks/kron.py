"""The Kronecker block ``A ⊗ G`` (KFAC's per-layer block) and the Kronecker algebra that it
and the KFAC / EKFAC representations share.

Conventions (docs/index.md, "Parameter layout"): a layer's block is ``kron(G, A)`` in the
*Kronecker layout*, where a flat vector of the layer reshaped row-major to ``(dG, dA)`` is the
matrix ``V`` (e.g. ``[W | b]`` for a Linear layer), so that ``kron(G, A) vec(V) = vec(G V Aᵀ)``.
The layer type's ``kfac_permutation()`` maps the flat layout to that layout: flat coordinate
``i`` is Kronecker coordinate ``perm[i]``. A factor is a 2-D tensor, or a 1-D tensor standing
for a diagonal matrix (an embedding's input factor, the counts of each index: never densified
here); an eigenbasis is a 2-D orthogonal tensor or an ``int`` (see `eigen_kron`).

Sections, in order:

* factors: products with a factor, traces, eigendecompositions, damped Cholesky factors, π;
* a layer's terms: a layer stores one Kronecker term or several (`KronLayer`), each a *unit*
  keyed by a `Unit`;
* layouts: where each unit sits in the flat vector (`Layout`), and the containers' plumbing
  (`KronBlocksInLayout`);
* the weight / bias split of KFAC's data (`separate_weight_and_bias`);
* the block: `KronBlock` maps ``V`` to ``G V Aᵀ``; products and reductions use the factors. The
  block owns the caches of its factorizations, so that a container which keeps its blocks
  (PMatKFAC) pays each one once:

  * damping ``λ`` (a scalar, exact): functions of ``A ⊗ G + λI`` go through the factors'
    eigendecompositions, computed once: ``A ⊗ G + λI = (U_G ⊗ U_A)(λ_G ⊗ λ_A + λ)(U_G ⊗ U_A)ᵀ``
    exactly, an `EigenKronBlock`. A per-entry damping has no such form and is refused.
  * damping `PiDamping` ``(λ, use_pi)``: Tikhonov damping split over the factors,
    ``(A + π√λ I) ⊗ (G + (√λ/π) I)`` (Martens & Grosse 2015), which stays Kronecker. Its
    inverse factors are cached for the last damping (see `KronBlock.solve`).
"""
from typing import Hashable, NamedTuple

import torch

from ....layer_types.base import is_multiblock
from .. import _checks, _spectral
from .base import Block, is_entries, per_entry_refused
from .eigen_kron import EigenKronBlock


# ---------------------------------------------------------------------- factors
def factor_size(F):
    """Size of a factor or eigenbasis (tensor 1-D / 2-D, or int for an identity basis)."""
    return int(F) if isinstance(F, int) else F.shape[0]


def left(G, V):
    """``G V`` for ``V`` of shape ``(..., dG, dA)``."""
    if G.dim() == 1:
        return G.unsqueeze(-1) * V
    return G @ V


def right(V, A):
    """``V Aᵀ`` for ``V`` of shape ``(..., dG, dA)`` (``Aᵀ = A`` for symmetric factors)."""
    if A.dim() == 1:
        return V * A
    return V @ A.mT


def kron_apply(A, G, V):
    """``kron(G, A)`` applied to ``V`` in the Kronecker layout: ``G V Aᵀ``."""
    return right(left(G, V), A)


def _apply_t(At, G, V):
    """``G V At`` (``At`` the transposed input factor, or a 1-D diagonal one)."""
    W = left(G, V)
    return W * At if At.dim() == 1 else W @ At


def dense(F):
    return torch.diag(F) if F.dim() == 1 else F


def factor_diag(F):
    return F if F.dim() == 1 else torch.diagonal(F)


def factor_trace(F):
    return F.sum() if F.dim() == 1 else torch.trace(F)


def factor_norm(F):
    return torch.linalg.vector_norm(F) if F.dim() == 1 else torch.linalg.matrix_norm(F)


def fmatmul(F1, F2):
    """``F1 F2`` keeping diagonal factors diagonal where both are."""
    if F1.dim() == 1 and F2.dim() == 1:
        return F1 * F2
    if F1.dim() == 1:
        return F1.unsqueeze(1) * F2
    if F2.dim() == 1:
        return F1 * F2
    return F1 @ F2


def eig(F):
    """``(evals, basis)`` of a symmetric factor; a diagonal factor's basis is the int identity."""
    if F.dim() == 1:
        return F, F.shape[0]
    return _spectral.eigh(F)


def damped_inverse(F, shift):
    """``(F + shift·I)⁻¹`` through a Cholesky factorization (`damped_cholesky`, in
    float32 for half precision), or None when ``F + shift·I`` is not positive definite (the
    caller then uses the eigendecomposition). A diagonal factor stays diagonal."""
    L = damped_cholesky(F, shift)
    return None if L is None else cholesky_inverse_of(L, F.dtype)


def damped_cholesky(F, shift):
    """The Cholesky factor ``L`` of ``F + shift·I`` (in float32 for half precision), the
    reciprocal ``1/(F + shift)`` of a diagonal factor, or None when not positive definite."""
    if F.dim() == 1:
        d = F + shift
        return 1.0 / d if bool((d.detach() > 0).all()) else None
    # one copy with the shift on its diagonal; Cholesky reads the lower triangle only, so an
    # accumulated factor that is symmetric up to round-off needs no symmetrization
    A = _checks.upcast(F).clone() if F.dtype == _checks.factor_dtype(F.dtype) else \
        _checks.upcast(F)
    A.diagonal().add_(shift)
    L, info = torch.linalg.cholesky_ex(A)
    return None if int(info) != 0 else L


def cholesky_inverse_of(L, dtype):
    """``(L Lᵀ)⁻¹`` from `damped_cholesky`'s factor (a diagonal factor's reciprocal as
    is)."""
    return L if L.dim() == 1 else torch.cholesky_inverse(L).to(dtype)


def cholesky_kron_solve(LA, LG, V):
    """``(G̃⁻¹ ⊗ Ã⁻¹)`` applied to ``V`` (Kronecker layout ``(..., dG, dA)``): ``G̃⁻¹ V Ã⁻¹``
    from the Cholesky factors (reciprocals for diagonal factors), by triangular solves."""
    dtype = V.dtype
    if LG.dim() == 1:
        W = LG.unsqueeze(-1) * V
    else:
        W = torch.cholesky_solve(_checks.upcast(V), LG)
    if LA.dim() == 1:
        W = W * LA
    else:
        W = torch.cholesky_solve(W.mT, LA).mT
    return W.to(dtype)


def eig_svd(F):
    """`eig` through the SVD ``F = U diag(s) Vᵀ``: ``(s, U)``, the eigendecomposition of
    a symmetric positive semi-definite factor (values descending)."""
    if F.dim() == 1:
        return F, F.shape[0]
    U, s, _ = torch.linalg.svd(_checks.upcast(F))
    return s.to(F.dtype), U.to(F.dtype)


def from_eig(evals, U):
    """The factor ``U diag(evals) Uᵀ`` (1-D when ``U`` is the int identity)."""
    if isinstance(U, int):
        return evals
    return (U * evals) @ U.t()


def pi_damping(A, G, use_pi=True):
    """π of Martens & Grosse (2015): ``sqrt((tr A / dim A) / (tr G / dim G))``, 1 when
    ``use_pi`` is False or the ratio is not a positive finite number."""
    if not use_pi:
        return 1.0
    tA = float(factor_trace(A)) / factor_size(A)
    tG = float(factor_trace(G)) / factor_size(G)
    if tA > 0 and tG > 0 and tA < float("inf") and tG < float("inf"):
        return (tA / tG) ** 0.5
    return 1.0


def proportional(X, Y, tol):
    """``c`` with ``Y = c X`` (within ``tol`` relative), or None."""
    if X.dim() != Y.dim() or X.shape != Y.shape:
        return None
    xx = (X * X).sum()
    if xx == 0:
        return 0.0 if (Y * Y).sum() == 0 else None
    c = (X * Y).sum() / xx
    if torch.linalg.vector_norm(Y - c * X) <= tol * max(float(torch.linalg.vector_norm(Y)), 1e-300):
        return c
    return None


# ---------------------------------------------------------------------- a layer's terms
# A layer whose type returns several Kronecker terms (see AbstractLayer.kfac_factors) stores a
# tuple of per-term entries instead of one entry (upstream's ``.data`` layout):
# ((A_0, G_0), (A_1, G_1), ...) in PMatKFAC, ((U_A_0, U_G_0, D_0), ...) in PMatEKFAC.
# `KronLayer` reads either form; inside the representations each term is a *unit* keyed by a
# `Unit` (its layer and its index among the layer's terms).
class Unit(NamedTuple):
    """The key of one Kronecker term: its layer id and its index among the layer's terms (0
    for a layer with one)."""
    layer: Hashable
    index: int = 0

    def describe(self, terms=1):
        """``layer 'fc1'``, with ``(block i)`` for a layer with several terms."""
        return f"layer '{self.layer}'" + (f" (block {self.index})" if terms > 1 else "")


class KronLayer(NamedTuple):
    """A layer's Kronecker terms: ``terms`` the per-term entries, ``multi`` whether the stored
    entry is a tuple of them (a layer with one term stores it bare)."""
    terms: tuple
    multi: bool

    @classmethod
    def of(cls, entry):
        """The terms of a stored entry (``.data[layer_id]``)."""
        if is_multi(entry):
            return cls(tuple(entry), True)
        return cls((entry,), False)

    def entry(self, terms=None):
        """The stored form of ``terms`` (default: this layer's), in this layer's shape."""
        terms = self.terms if terms is None else tuple(terms)
        return terms if self.multi else terms[0]

    def units(self, lid):
        """The `Unit` keys of the layer's terms, in its Kronecker layout order."""
        return [Unit(lid, b) for b in range(len(self.terms))]


# whether a stored entry holds several Kronecker terms: one test, the layer types'
is_multi = is_multiblock


def blocks_of(entry):
    return list(KronLayer.of(entry).terms)


def unit_keys(lid, entry):
    """The unit keys of a layer, in its Kronecker layout order."""
    return KronLayer.of(entry).units(lid)


def iter_units(data):
    """``(Unit, term)`` for every unit of ``data`` (layers in order, terms in order)."""
    for lid, e in data.items():
        layer = KronLayer.of(e)
        yield from zip(layer.units(lid), layer.terms)


def get_unit(data, key):
    """The term of ``data`` at ``key`` (a `Unit`, or a layer id for its only term)."""
    if isinstance(key, Unit):
        return KronLayer.of(data[key.layer]).terms[key.index]
    return KronLayer.of(data[key]).terms[0]


def repack(template, values):
    """A data dict shaped like ``template`` (same layers, same terms) from ``values`` keyed by
    `Unit`."""
    out = {}
    for lid, e in template.items():
        layer = KronLayer.of(e)
        out[lid] = layer.entry(values[k] for k in layer.units(lid))
    return out


# ---------------------------------------------------------------------- layouts
#: `Layout.kron_mv` keeps a ``[W | b]`` layer's weight and bias apart from this many entries
#: on (below, the per-operation overhead of the four extra small products outweighs the copy
#: of ``[W | b]`` that assembling it costs)
SPLIT_BIAS_MIN_ENTRIES = 2 ** 16


class Layout:
    """Where each layer sits in the flat vector and how to reach its Kronecker layout.

    ``dims[lid]`` is ``(dG, dA)``, or a list of ``(dG_b, dA_b)`` for a layer with several
    Kronecker blocks, whose Kronecker layout is the concatenation of its blocks'.
    ``entries[lid] = (start, end, perm, inv, units)`` with ``perm`` flat -> Kronecker and ``inv``
    its inverse (Kronecker -> flat), so ``kron_vec = flat[inv]`` and ``flat = kron_vec[perm]``;
    ``units`` lists ``(key, offset, dG, dA)``: the unit's slice of the layer's Kronecker vector.
    """

    def __init__(self, layer_collection, dims, perms):
        self.entries = {}
        # per layer: 'same' (the flat slice is the Kronecker matrix, row-major), 'bias_last'
        # (the flat slice is the weight (dG, dA - 1), row-major, then the bias (dG,): the
        # Kronecker matrix is [W | b], Linear and convolutions with a bias), or None (a general
        # permutation: gathered). The two common cases are moved by slices (one contiguous
        # copy, or none) instead of an index gather (6x slower on a 200k-entry layer).
        self.fast = {}
        for lid, layer in layer_collection.layers.items():
            d = dims[lid]
            multi = isinstance(d, list)
            sizes = d if multi else [d]
            units, off = [], 0
            for b, (dG, dA) in enumerate(sizes):
                units.append((Unit(lid, b), off, dG, dA))
                off += dG * dA
            start = layer_collection.p_pos[lid]
            numel = layer.numel()
            if off != numel:
                shown = ", ".join(f"G: {dG}, A: {dA}" for dG, dA in sizes)
                raise ValueError(
                    f"layer '{lid}' has {numel} parameters but its Kronecker factors have sizes "
                    f"{shown} (total {off}); the factors do not match the layer")
            perm = perms[lid]
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel())
            self.entries[lid] = (start, start + numel, perm, inv, units)
            self.fast[lid] = _contiguous_kind(perm, sizes) if not multi else None

    def _on(self, lid, which, device):
        """``perm`` (which=2) or ``inv`` (which=3) of a layer on ``device``, copied once."""
        key = (lid, which, str(device))
        t = self._moved.get(key)
        if t is None:
            t = self._moved[key] = self.entries[lid][which].to(device)
        return t

    @property
    def _moved(self):
        if "_moved_cache" not in self.__dict__:
            self._moved_cache = {}
        return self._moved_cache

    def split(self, flat):
        """``{unit key: (..., dG, dA)}`` from a flat ``(..., P)`` tensor."""
        out = {}
        lead = flat.shape[:-1]
        for lid, (s, e, perm, inv, units) in self.entries.items():
            kind = self.__dict__.get("fast", {}).get(lid)  # (layouts pickled before: none)
            if kind is not None:
                (key, _, dG, dA), = units
                out[key] = _to_kron(flat[..., s:e], kind, dG, dA)
                continue
            kv = flat[..., s:e][..., self._on(lid, 3, flat.device)]
            for key, off, dG, dA in units:
                out[key] = kv[..., off:off + dG * dA].reshape(*lead, dG, dA)
        return out

    def join(self, parts):
        """Flat ``(..., P)`` from ``{unit key: (..., dG, dA)}`` (layers in layout order)."""
        first = next(iter(parts.values()))
        lead = first.shape[:-2]
        end = max(e for s, e, *_ in self.entries.values())
        out = first.new_empty(*lead, end) if len(self.entries) > 1 else None
        flats = []
        for lid, (s, e, perm, inv, units) in self.entries.items():
            kind = self.__dict__.get("fast", {}).get(lid)  # (layouts pickled before: none)
            if kind is not None:
                (key, _, dG, dA), = units
                if out is not None:
                    _from_kron_into(out[..., s:e], parts[key], kind, dG, dA)
                else:
                    flats.append(_from_kron(parts[key], kind, dG, dA))
                continue
            pieces = [parts[key].reshape(*parts[key].shape[:-2], dG * dA)
                      for key, off, dG, dA in units]
            kv = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)
            flat = kv[..., self._on(lid, 2, kv.device)]
            if out is not None:
                out[..., s:e] = flat
            else:
                flats.append(flat)
        if out is not None:
            return out
        return flats[0]

    def kron_mv(self, factors, v):
        """``M v`` for ``M = blockdiag_l kron(G_l, A_l)`` (``factors``: ``(A_lᵀ, G_l)`` per layer,
        in layout order; a layer with several Kronecker blocks has one pair per block) and a PVector
        ``v``, as a new flat ``(P,)`` tensor; None where this path does not apply (``v`` or the
        factors of another dtype or device, or an autograd graph to record: the caller then
        splits and joins).

        Each layer's ``G V Aᵀ`` reads ``v``'s own tensors (dict or flat: no flattened or
        re-laid-out copy of ``v``) and is written into its slice of the result by the products
        themselves. A ``[W | b]`` layer (``'bias_last'``) is never assembled: with ``U = G W``,
        ``u = G b`` and ``Aᵀ`` split as ``[[Aᵀ_ww, Aᵀ_wb], [Aᵀ_bw, Aᵀ_bb]]``, the weight part
        is ``U Aᵀ_ww + u Aᵀ_bw`` and the bias part ``U Aᵀ_wb + u Aᵀ_bb`` (the same products,
        the bias column summed last); a small layer (under `SPLIT_BIAS_MIN_ENTRIES` entries) is
        assembled instead, fewer operations. A layer with a general permutation is gathered into its
        Kronecker layout and scattered back, as `split` and `join` do."""
        fast = self.__dict__.get("fast")
        if fast is None:  # (layouts pickled before)
            return None
        like = factors[0][1]
        parts = v.dict_repr
        tensors = [t for ts in parts.values() for t in ts] if parts is not None \
            else [v.vector_repr]
        if any(t.dtype != like.dtype or t.device != like.device for t in tensors) or \
                any(F.dtype != like.dtype or F.device != like.device
                    for AG in factors for F in AG):
            return None
        if torch.is_grad_enabled() and (any(t.requires_grad for t in tensors) or
                                        any(F.requires_grad for AG in factors for F in AG)):
            return None  # (out= products record no graph)
        flat = v.vector_repr
        end = max(e for s, e, *_ in self.entries.values())
        out = like.new_empty(end)
        it = iter(factors)
        for lid, (s, e, perm, inv, units) in self.entries.items():
            kind = fast.get(lid)
            if kind is None:  # a general permutation, or several units: gathered
                layer = flat[s:e] if flat is not None else \
                    torch.cat([t.reshape(-1) for t in parts[lid]])
                kv = layer[self._on(lid, 3, layer.device)]
                res = torch.cat([_apply_t(*next(it), kv[off:off + dG * dA].view(dG, dA))
                                 .reshape(-1) for _, off, dG, dA in units])
                torch.index_select(res, 0, self._on(lid, 2, res.device), out=out[s:e])
                continue
            At, G = next(it)
            (_, _, dG, dA), = units
            nw = dG * dA if kind == "same" else dG * (dA - 1)
            if flat is not None:
                W, b = flat[s:s + nw].view(dG, nw // dG), flat[s + nw:e]
            else:
                ts = parts[lid]
                if ts[0].numel() == nw and len(ts) == (1 if kind == "same" else 2):
                    W, b = ts[0].reshape(dG, nw // dG), (ts[1].reshape(-1) if len(ts) > 1 else None)
                else:
                    layer = torch.cat([t.reshape(-1) for t in ts])
                    W, b = layer[:nw].view(dG, nw // dG), layer[nw:]
            if kind == "bias_last" and dG * dA < SPLIT_BIAS_MIN_ENTRIES:
                # a small layer: fewer operations assembling [W | b] (a copy of little)
                O = _apply_t(At, G, torch.cat([W, b.unsqueeze(1)], dim=1))
                _from_kron_into(out[s:e], O, kind, dG, dA)
                continue
            U = left(G, W)
            ow = out[s:s + nw].view(dG, nw // dG)
            if kind == "same":
                if At.dim() == 1:
                    torch.mul(U, At, out=ow)
                else:
                    torch.mm(U, At, out=ow)
                continue
            u = G * b if G.dim() == 1 else torch.mv(G, b)
            ob = out[s + nw:e]
            if At.dim() == 1:
                torch.mul(U, At[:-1], out=ow)
                torch.mul(u, At[-1], out=ob)
                continue
            AT = At
            torch.mm(U, AT[:-1, :-1], out=ow)
            # the rank-one term as a product with an inner dimension of 1 (addr_ is an
            # elementwise loop, 5x slower on a 256 x 784 weight)
            ow.addmm_(u.unsqueeze(1), AT[-1:, :-1])
            torch.mv(U, AT[:-1, -1], out=ob)
            ob.add_(u * AT[-1, -1])
        return out

    def outer_diag_flat(self, diags):
        """The flat ``(P,)`` diagonal of a Kronecker-factored matrix from the factors'
        diagonals ``{lid: [(diag A_b, diag G_b), ...]}`` (entry ``[p, q]`` of unit ``b`` is
        ``diag G[p] · diag A[q]``), each layer written in place where its layout is contiguous."""
        first = next(iter(diags.values()))[0][0]
        end = max(e for s, e, *_ in self.entries.values())
        out = first.new_empty(end)
        fast = self.__dict__.get("fast", {})
        parts = []
        # (out= writes are not differentiable: factors that record a graph take the general path)
        graph = torch.is_grad_enabled() and any(
            t.requires_grad for pairs in diags.values() for pair in pairs for t in pair)
        for lid, (s, e, perm, inv, units) in self.entries.items():
            kind = None if graph else fast.get(lid)
            if kind is not None:
                (a, g), = diags[lid]
                (_, _, dG, dA), = units
                if kind == "same":
                    torch.outer(g, a, out=out[s:e].view(dG, dA))
                else:
                    nw = dG * (dA - 1)
                    torch.outer(g, a[:-1], out=out[s:s + nw].view(dG, dA - 1))
                    torch.mul(g, a[-1], out=out[s + nw:e])
                continue
            d = torch.cat([torch.outer(g, a).reshape(-1) for a, g in diags[lid]])
            if graph:
                parts.append(d[self._on(lid, 2, d.device)])
            else:
                out[s:e] = d[self._on(lid, 2, d.device)]
        return torch.cat(parts) if graph else out

    def to_flat_order(self, lid, vec_or_mat, both=False):
        """Re-index a Kronecker-ordered vector (or the rows, and with ``both`` the columns, of a
        matrix) of layer ``lid`` to the flat order."""
        kind = self.__dict__.get("fast", {}).get(lid)
        if kind is not None and not both and vec_or_mat.dim() == 1:
            (_, _, dG, dA), = self.entries[lid][4]
            return _from_kron(vec_or_mat.reshape(dG, dA), kind, dG, dA)
        perm = self._on(lid, 2, vec_or_mat.device)
        out = vec_or_mat[perm]
        return out[:, perm] if both else out


class KronBlocksInLayout:
    """The container plumbing of the representations stored in a `Layout` (PMatKFAC,
    PMatEKFAC): one block per Kronecker unit, in the layout's unit order; needs
    ``self._layout``."""

    def _block_keys(self):
        """The unit keys in layout order (the layout's, computed once with it)."""
        lay = self._layout
        keys = getattr(lay, "unit_keys", None)
        if keys is None:
            keys = lay.unit_keys = [key for _, (*_, units) in lay.entries.items()
                                    for key, *_ in units]
        return keys

    def _block_layers(self):
        return [key.layer for key in self._block_keys()]

    def _split(self, X):
        return list(self._layout.split(X).values())

    def _join(self, parts):
        return self._layout.join(dict(zip(self._block_keys(), parts)))


def _contiguous_kind(perm, sizes):
    """``'same'``, ``'bias_last'`` or None for a single-unit layer's permutation (see
    ``Layout.fast``)."""
    (dG, dA), = sizes
    n = perm.numel()
    ar = torch.arange(n)
    if torch.equal(perm, ar):
        return "same"
    if dA > 1:
        nw = dG * (dA - 1)
        w = ar[:nw]
        expect = torch.cat([(w // (dA - 1)) * dA + w % (dA - 1), torch.arange(dG) * dA + dA - 1])
        if torch.equal(perm, expect):
            return "bias_last"
    return None


def _to_kron(flat, kind, dG, dA):
    """``(..., dG, dA)`` from a layer's flat ``(..., dG·dA)`` slice."""
    lead = flat.shape[:-1]
    if kind == "same":
        return flat.reshape(*lead, dG, dA)
    nw = dG * (dA - 1)
    return torch.cat([flat[..., :nw].reshape(*lead, dG, dA - 1),
                      flat[..., nw:].unsqueeze(-1)], dim=-1)


def _from_kron(V, kind, dG, dA):
    """A layer's flat ``(..., dG·dA)`` slice from its Kronecker ``(..., dG, dA)``."""
    lead = V.shape[:-2]
    if kind == "same":
        return V.reshape(*lead, dG * dA)
    out = V.new_empty(*lead, dG * dA)
    _from_kron_into(out, V, kind, dG, dA)
    return out


def _from_kron_into(out, V, kind, dG, dA):
    lead = V.shape[:-2]
    if kind == "same":
        out.copy_(V.reshape(*lead, dG * dA))
        return
    nw = dG * (dA - 1)
    out[..., :nw].view(*lead, dG, dA - 1).copy_(V[..., :-1])
    out[..., nw:].copy_(V[..., -1])


# ---------------------------------------------------------------------- weight / bias split
def bias_is_last_input(layer, dA):
    """Whether the layer's bias sits in the last column of its Kronecker layout (the trailing 1
    of the input factor ``A`` of size ``dA``), and its weight never does: then the weight and
    bias blocks of ``kron(G, A)`` are separated by dropping ``A``'s last row and column off the
    diagonal. True for Linear and convolution layers with a bias."""
    if getattr(layer, "bias", None) is None or getattr(layer, "weight", None) is None:
        return False
    perm = layer.kfac_permutation()
    nw = layer.weight.numel()
    col = perm % dA
    return bool((col[nw:] == dA - 1).all()) and not bool((col[:nw] == dA - 1).any())


def separate_weight_and_bias(layer_collection, data):
    """The KFAC data with the weight and the bias of every eligible layer (see
    `bias_is_last_input`) factored separately: the weight block ``G ⊗ A_ww`` (``A``
    without its last row and column) and the bias block ``G · A_bb`` (the bias entry of
    ``A``), no weight-bias cross terms. Stored, in the same joint Kronecker layout, as the
    factor ``A`` with its last row and column zeroed off the diagonal: ``kron(G, A')`` is then
    exactly ``blockdiag(kron(G, A_ww), G · A_bb)`` re-indexed, so every operation (eigenbases,
    damping, EKFAC's diagonal) keeps working unchanged. Layers with several Kronecker blocks, a
    diagonal ``A`` or no bias are left as they are."""
    out = {}
    for lid, entry in data.items():
        if is_multi(entry) or entry[0].dim() != 2 or \
                not bias_is_last_input(layer_collection[lid], entry[0].shape[0]):
            out[lid] = entry
            continue
        A, G = entry
        A = A.clone()
        A[:-1, -1] = 0
        A[-1, :-1] = 0
        out[lid] = (A, G)
    return out


# ---------------------------------------------------------------------- the block
#: π-damped solves factorize a factor wider than this lazily (see `KronBlock.solve`)
LAZY_INVERSE_WIDTH = 1024


class PiDamping:
    """A damping ``λ ≥ 0`` split over the two factors of a Kronecker block with π:
    ``(A + π√λ I) ⊗ (G + (√λ/π) I)``, ``π = sqrt((tr A/dA)/(tr G/dG))`` (``use_pi=False``:
    ``π = 1``). This is ``A ⊗ G + λI + √λ (π I ⊗ G + A ⊗ I / π)``, not ``A ⊗ G + λI``.

    ``value`` is a number or a 0-d tensor, kept with its autograd graph (``sqrt``); ``key`` is
    what caches are keyed on (None: not cached, for a value that records a graph)."""

    __slots__ = ("value", "use_pi", "float", "sqrt", "key")

    def __init__(self, value, use_pi=True):
        self.value = value
        self.use_pi = bool(use_pi)
        self.float = _checks._float(value)
        graph = _checks.needs_graph(value)
        self.sqrt = value ** 0.5 if graph else max(self.float, 0.0) ** 0.5
        self.key = None if graph else (self.float, self.use_pi)

    def describe(self):
        return f"regul={self.float:.3g} (π-damped)"


class KronBlock(Block):
    """``A ⊗ G`` in the Kronecker layout; ``A``, ``G`` 2-D symmetric or 1-D (diagonal).

    ``eig``, if given, is the factors' eigendecompositions ``((λ_A, U_A), (λ_G, U_G))``
    (see `factor_eig`); ``name`` says which block it is in the messages."""

    __slots__ = ("A", "G", "name", "_eig", "_eigen", "_pi", "_At")

    def __init__(self, A, G, eig=None, name=None):
        self.A, self.G = A, G
        self.name = name  # for the messages: "layer 'fc1'" (a container sets it)
        self._eig = eig
        self._eigen = None
        # π-damped cache: (damping key, 'chol' | 'inv', (factor_A, factor_G)) for the last key
        self._pi = None
        self._At = None

    @property
    def shape(self):
        return (factor_size(self.G), factor_size(self.A))

    # ------------------------------------------------------------------ caches
    def factor_eig(self):
        """``((λ_A, U_A), (λ_G, U_G))``: the factors' eigendecompositions, computed once
        (not kept when the factors record an autograd graph)."""
        if self._eig is not None:
            return self._eig
        pair = (eig(self.A), eig(self.G))
        if not _checks.needs_graph(self.A, self.G):
            self._eig = pair
        return pair

    def set_factor_eig(self, eig):
        """Replace the factors' eigendecompositions (e.g. computed through an SVD)."""
        self._eig, self._eigen, self._pi = eig, None, None

    def eigen(self):
        """The same block as an `EigenKronBlock` on the factors' eigenbases (computed once)."""
        if self._eigen is not None:
            return self._eigen
        eig = self.factor_eig()
        out = EigenKronBlock.from_factors_eig(*eig)
        if eig is self._eig:
            self._eigen = out
        return out

    def _eigen_for(self, damping):
        if is_entries(damping):
            raise per_entry_refused(self)
        return self.eigen()

    # ------------------------------------------------------------------ products
    def apply(self, V):
        return kron_apply(self.A, self.G, V)

    def right_factor(self):
        """``Aᵀ`` for the products ``G V Aᵀ``: ``A`` itself when it is exactly symmetric (the
        factors KFAC builds are: their sums are mirrored), else its transposed view. A product
        with a row-major operand reads it faster than through a transposed view when the other
        side has few rows (7% on a 10 × 2049 by 2049 × 2049 product); the values are the same.
        Checked once (one comparison pass over ``A``) and kept with the block."""
        A = self.A
        if A.dim() == 1:
            return A
        At = getattr(self, "_At", None)  # (a block unpickled from before has none)
        if At is None or At[0] is not A or At[1] != A._version:
            sym = bool(torch.equal(A, A.mT))
            At = self._At = (A, A._version, A if sym else A.mT)
        return At[2]

    def solve(self, V, damping=0.0, caller=None):
        """``(B + λI)⁻¹ v`` (scalar ``λ``, exact, in the eigenbasis), or with a `PiDamping`
        ``G̃⁻¹ V Ã⁻¹`` for the π-damped factors ``Ã``, ``G̃``.

        π-damped, wide factors (wider than `LAZY_INVERSE_WIDTH`): the first solve with a given
        damping factorizes each damped factor (Cholesky, ``d³/3``) and solves by triangular
        solves; the second turns the same factors into explicit inverses (``2d³/3`` more),
        which later solves apply by matrix products (faster than triangular solves: 2.2x on a
        785-wide factor). One solve thus costs a third of what inverting up front costs, and a
        loop of solves the same. Narrower factors are inverted on the first solve (they cost
        little, and every solve takes the same path, bit for bit)."""
        if not isinstance(damping, PiDamping):
            return self._eigen_for(damping).solve(V, damping, caller)
        caller = caller or (type(self).__name__, damping)
        if damping.float < 0:
            raise _negative(caller, "solve")
        key = damping.key
        wide = any(F.dim() == 2 and F.shape[0] > LAZY_INVERSE_WIDTH for F in (self.A, self.G))
        state = self._pi if self._pi is not None and key is not None and \
            self._pi[0] == key else None
        if key is None or not wide or (state is not None and state[1] == "inv"):
            return kron_apply(*self._pi_power(-1.0, damping, caller, "solve"), V)
        if state is not None:  # the second solve: the inverses from the factors computed
            LA, LG = state[2]
            inv = (cholesky_inverse_of(LA, self.A.dtype), cholesky_inverse_of(LG, self.A.dtype))
            self._pi = (key, "inv", inv)
            return kron_apply(*inv, V)
        chol = self._pi_cholesky(damping)
        if chol is None:  # undamped, or not positive definite once damped: the general path
            return kron_apply(*self._pi_power(-1.0, damping, caller, "solve"), V)
        self._pi = None if _checks.needs_graph(self.A, self.G) else (key, "chol", chol)
        return cholesky_kron_solve(*chol, V)

    # ------------------------------------------------------------------ π-damping
    def _pi_shifts(self, damping):
        """The shifts ``(π√λ, √λ/π)`` of the factors ``A`` and ``G``."""
        s = damping.sqrt
        pi = pi_damping(self.A, self.G, damping.use_pi)
        return pi * s, s / pi

    def _pi_cholesky(self, damping):
        """The Cholesky factors of both damped factors, or None (``λ = 0``, or one is not
        positive definite once damped)."""
        if not damping.float > 0:
            return None
        sA, sG = self._pi_shifts(damping)
        LA, LG = damped_cholesky(self.A, sA), damped_cholesky(self.G, sG)
        return None if LA is None or LG is None else (LA, LG)

    def _pi_power(self, p, damping, caller, what):
        """``(Ã^p, G̃^p)`` for the π-damped factors; ``p = -1`` cached for the last damping.

        ``p = -1`` with ``λ > 0``: through the Cholesky factorization of each damped factor (PD
        when the factor is PSD), cheaper than an eigendecomposition of the wide input factors of
        convolutions; a factor that is not PD once damped (e.g. a product from ``mm``) falls back
        to the eigendecomposition. Other powers and ``λ = 0`` go through the factors'
        eigendecompositions; a singular damped factor is refused for negative powers (shared
        singular-matrix error), a negative one for fractional powers."""
        key = damping.key if float(p) == -1.0 else None
        if key is not None and self._pi is not None and self._pi[0] == key \
                and self._pi[1] == "inv":
            return self._pi[2]
        out = None
        if float(p) == -1.0:
            chol = self._pi_cholesky(damping)
            if chol is not None:
                out = tuple(cholesky_inverse_of(L, self.A.dtype) for L in chol)
        if out is None:
            rep, regul = caller
            sA, sG = self._pi_shifts(damping)
            (lA, UA), (lG, UG) = self.factor_eig()
            dA, dG = lA + sA, lG + sG
            if float(p) < 0:
                for name, d in (("input factor A", dA), ("output-gradient factor G", dG)):
                    _checks.check_invertible(d, rep, what, regul,
                                             detail=f"the {name} of {self.name or 'the block'} is singular")
            if not float(p).is_integer():
                dA = _checks.psd_values(dA, rep, what, regul)
                dG = _checks.psd_values(dG, rep, what, regul)
            out = (from_eig(dA ** p, UA), from_eig(dG ** p, UG))
        if key is not None and not _checks.needs_graph(self.A, self.G, *out):
            self._pi = (key, "inv", out)
        return out

    # ------------------------------------------------------------------ functions
    def eigenvalues(self, damping=0.0):
        if isinstance(damping, PiDamping):
            sA, sG = self._pi_shifts(damping)
            (lA, _), (lG, _) = self.factor_eig()
            return torch.outer(lG + sG, lA + sA)
        return self._eigen_for(damping).eigenvalues(damping)

    def matpower(self, p, damping=0.0, caller=None):
        """``(A ⊗ G + λI)^p`` exactly, as an `EigenKronBlock`; with a `PiDamping`, the
        Kronecker block ``Ã^p ⊗ G̃^p`` of the π-damped factors."""
        if isinstance(damping, PiDamping):
            caller = caller or (type(self).__name__, damping)
            what = "inverse" if float(p) == -1.0 else f"pow({p})"
            if damping.float < 0:
                raise _negative(caller, what)
            return KronBlock(*self._pi_power(float(p), damping, caller, what))
        return self._eigen_for(damping).matpower(p, damping, caller)

    def logdet_is_spectral(self, damping=0.0):
        return not isinstance(damping, PiDamping) and not is_entries(damping)

    def logdet(self, damping=0.0, caller=None):
        """``log det`` of the damped block: exact, or of the π-damped factors
        (``dG log det Ã + dA log det G̃``)."""
        if isinstance(damping, PiDamping):
            rep, regul = caller or (type(self).__name__, damping)
            if damping.float < 0:
                raise _negative((rep, regul), "logdet")
            sA, sG = self._pi_shifts(damping)
            (lA, _), (lG, _) = self.factor_eig()
            return _checks.logdet_of(lA + sA, rep, regul, multiplicity=lG.numel()) \
                + _checks.logdet_of(lG + sG, rep, regul, multiplicity=lA.numel())
        return self._eigen_for(damping).logdet(damping, caller)

    # ------------------------------------------------------------------ reductions
    def diag(self):
        return torch.outer(factor_diag(self.G), factor_diag(self.A))

    def dense(self):
        # torch.kron views its operands: a transposed factor (an inverse from a Cholesky
        # factor) must be made contiguous first
        return torch.kron(dense(self.G).contiguous(), dense(self.A).contiguous())

    def trace(self):
        return factor_trace(self.A) * factor_trace(self.G)

    def frobenius_sq(self):
        return (factor_norm(self.A) * factor_norm(self.G)) ** 2

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        """``x·(A ⊗ G) = A ⊗ (x·G)`` (the eigenbasis is kept)."""
        eig = None
        if self._eig is not None:
            eig_A, (lG, UG) = self._eig
            eig = (eig_A, (lG * x, UG))
        return KronBlock(self.A, self.G * x, eig, self.name)

    def add(self, other):
        """``A ⊗ G + s·I`` is exact in the factors' eigenbasis (an EigenKronBlock); the sum of
        two Kronecker products is a Kronecker product when a factor of one is proportional to
        the same factor of the other; otherwise refused."""
        from .identity import ScaledIdentityBlock
        if isinstance(other, ScaledIdentityBlock):
            return self.eigen().add(other)
        if isinstance(other, KronBlock):
            tol = 1e3 * torch.finfo(self.G.dtype).eps
            c = proportional(self.A, other.A, tol)
            if c is not None:
                return KronBlock(self.A, self.G + c * other.G, name=self.name)
            c = proportional(self.G, other.G, tol)
            if c is not None:
                return KronBlock(self.A + c * other.A, self.G, name=self.name)
            raise NotImplementedError(
                f"KronBlock + KronBlock has no structured form for {self.name or 'this block'}: "
                "the sum of two Kronecker products is not one (neither factor of one is "
                "proportional to the other's). For an online / running estimate (e.g. online EWC, F ← γF + F_new) "
                "average the factors instead, F.factor_average(F_new, γ, 1) (an approximation "
                "of the sum, the usual KFAC one); or use PMatEKFAC on one shared eigenbasis "
                "(build the second with eigendecomposition= the first), where sums are exact; "
                "or to_torch() / PMatDense on small models")
        return super().add(other)


def _negative(caller, what):
    """The error for a negative π-damping (the shared message)."""
    try:
        _checks.check_regul_nonnegative(
            caller[0], what, caller[1], "π-damping adds π√regul·I and √regul/π·I to the factors "
            "(use damping='exact' for M + regul·I with any regul)")
    except ValueError as e:
        return e
    return ValueError(f"{caller[0]}.{what}: negative π-damping")
