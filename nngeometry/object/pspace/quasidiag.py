"""``PMatQuasiDiag``: the quasi-diagonal metric of Ollivier (2015).

For a layer whose weight has shape ``(out, ...)`` and whose bias has shape ``(out,)``, output
unit ``o`` owns the weights ``w_o = W[o].flatten()`` (``n_in`` of them) and the bias ``b_o``. The
quasi-diagonal keeps, for every unit, the diagonal entries ``M[w_oi, w_oi]``, ``M[b_o, b_o]`` and
the couplings ``c_oi = M[w_oi, b_o]`` (the bias's row and column restricted to its unit), and
drops everything else. Per unit the kept block is an *arrowhead* matrix

    B_o = [[diag(a_o), c_o],
           [c_oᵀ,      s_o]]

so ``(M + λI)⁻¹`` is exact through the Schur complement of the diagonal part:
``σ_o = s_o + λ - Σ_i c_oi² / (a_oi + λ)``. Layers without a bias (or whose bias is not one
per row of the weight) keep their diagonal only.

Both representations here are containers of blocks (see ``abstract``): one
`QuasiDiagBlock` per coupled layer (its arrowheads, in the layout
``(out, n_in + 1)``: each unit's weights then its bias), a `DiagBlock` per layer
kept diagonal; the inverse holds `ArrowInverseBlock`.

Ollivier, *Riemannian metrics for neural networks I: feedforward networks*, Information and
Inference 4(2), 2015.
"""
import torch

from . import _checks, _spectral
from ._statistics import check_layers, check_tensor
from .abstract import PMatAbstract
from .blockdiag import PMatBlockDiag, check_blocks_fit
from .blocks import ArrowInverseBlock, DiagBlock, DiagPlusRankOneBlock, QuasiDiagBlock


class _PerLayer(PMatAbstract):
    """Shared plumbing: one block per layer; a coupled layer's slice ``(..., p_l)`` (weights
    ``(out, n_in)`` flattened, then biases ``(out,)``) is seen by its block in the unit layout
    ``(..., out, n_in + 1)``."""

    _flat_layouts = False

    def _block_keys(self):
        return self.layer_collection.layer_ids()

    def _unit_shapes(self):
        """``{layer_id: (out, n_in) or None}`` (None: a diagonal layer)."""
        shapes = self.__dict__.get("_unit_shapes_cache")
        if shapes is None:
            shapes = self._unit_shapes_cache = {
                lid: self._coupling_shape(lid) for lid in self.layer_collection.layer_ids()}
        return shapes

    def _coupling_shape(self, lid):
        raise NotImplementedError

    def _split(self, X):
        lc = self.layer_collection
        out = []
        for lid, shape in self._unit_shapes().items():
            R = X[..., lc.slice(lid)]
            if shape is not None:
                nw = shape[0] * shape[1]
                R = torch.cat([R[..., :nw].reshape(*R.shape[:-1], *shape),
                               R[..., nw:].unsqueeze(-1)], dim=-1)
            out.append(R)
        return out

    def _join(self, parts):
        flat = []
        for (lid, shape), Y in zip(self._unit_shapes().items(), parts):
            if shape is not None:
                Y = torch.cat([Y[..., :-1].reshape(*Y.shape[:-2], -1), Y[..., -1]], dim=-1)
            flat.append(Y)
        return torch.cat(flat, dim=-1)

    def _like(self):
        return next(iter(self.data.values()))[0]

    def logdet(self, regul=0.0, damping="exact"):
        """``log det(M + Λ)``, from each block's pivots: for PMatQuasiDiag
        ``Σ_units (Σ_i log(a_oi + λ) + log σ_o)``; for its inverse, undamped, minus that, and
        damped ``Σ log(d + Λ) + Σ_units log(1 + β uᵀ(d+Λ)⁻¹u)`` (the matrix determinant lemma
        on each unit's diagonal plus rank-one form).

        The quasi-diagonal of a PSD matrix is not PSD in general (``σ_o`` can be negative):
        ``log |det|`` is returned when the whole matrix has ``det > 0`` (an even number of
        negative pivots ``a + λ``, ``σ`` over all the layers: the pivots of the unit blocks'
        LDLᵀ factorization, whose signs are those of the eigenvalues; a layer alone may have
        ``det < 0``), refused when ``det < 0`` with the layers whose blocks have ``det < 0``
        named, and refused when singular (the shared error)."""
        regul, blocks, dampings = self._dampings(regul, "logdet", damping)
        rep = type(self).__name__
        caller = (rep, regul)
        total, negative = None, {}
        for lid, b, d in zip(self._block_keys(), blocks, dampings):
            pivots = b.eigenvalues(d) if isinstance(b, DiagBlock) else b.pivots(d, caller)
            part = _checks.logdet_of(pivots, rep, regul, exact=True,
                                     require_pd=False, allow_negative_det=True)
            neg = int((pivots.detach() < 0).sum())
            if neg:
                negative[lid] = (neg, float(pivots.detach().min()))
            total = part if total is None else total + part
        if sum(n for n, _ in negative.values()) % 2:
            odd = [f"'{lid}' ({n} negative pivot{'s' * (n > 1)})"
                   for lid, (n, _) in negative.items() if n % 2]
            low = min(v for _, v in negative.values())
            raise ValueError(
                f"{rep}.logdet: det(M + regul·I) < 0 at {_checks.describe_regul(regul)}, "
                f"its log-determinant is undefined: the blocks of layer(s) {', '.join(odd)} have "
                "det < 0 (each layer's pivots are the signs of its eigenvalues; blocks with det "
                "< 0 in an even number of layers would still give the whole matrix det > 0). "
                "The quasi-diagonal of a PSD matrix need not be PSD: use a regul above "
                f"{-low:.3g}, or PMatDiag / PMatBlockDiag, which stay PSD")
        return total

    # upstream's parameter names (the operations are the base class's)
    def mv(self, vs):
        return super().mv(vs)

    def vTMv(self, vs):
        return super().vTMv(vs)

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_unit_shapes_cache", None)
        return state


class PMatQuasiDiag(_PerLayer):
    """Quasi-diagonal approximation of ``M = (1/n) Σ_x J(x)ᵀ J(x)`` (see the module docstring).

    ``data`` is ``{layer_id: (diag, cross)}`` with ``diag`` the ``(p_l,)`` diagonal of the
    layer's block (weight then bias) and ``cross`` the ``(out, n_in)`` couplings
    ``M[w_oi, b_o]``, or None for layers kept diagonal. Memory ``O(P)``; every operation is
    ``O(P)`` per vector. Every kind of ``regul`` is exact (a diagonal ``Λ`` keeps the
    arrowheads): solves and log-determinants through each unit's Schur complement
    ``σ_o = s_o + λ - Σ_i c_oi² / (a_oi + λ)``.
    """

    statistic = "get_covariance_quasidiag"

    def _build(self, examples, **kwargs):
        return self._data_from_statistics(
            self.layer_collection,
            self.generator.get_covariance_quasidiag(examples, self.layer_collection))

    @classmethod
    def _data_from_statistics(cls, layer_collection, statistics):
        """``statistics``: ``{layer_id: (diag (p_l,), cross (out, n_in) or None)}`` (see the
        class docstring), stored as it is."""
        return statistics

    @classmethod
    def _check_statistics(cls, layer_collection, statistics):
        check_layers(cls.__name__, layer_collection, statistics, "the quasi-diagonal")
        for lid in layer_collection.layer_ids():
            entry = statistics[lid]
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise ValueError(f"{cls.__name__}.from_statistics: layer '{lid}' must be the "
                                 f"pair (diag, cross), got {type(entry).__name__}")
            p = layer_collection[lid].numel()
            check_tensor(cls.__name__, entry[0], (p,), f"the diagonal of layer '{lid}'")
            if entry[1] is not None:
                out = entry[1].shape[0] if entry[1].dim() == 2 else -1
                check_tensor(cls.__name__, entry[1], (out, (p - out) // max(out, 1)),
                             f"the couplings of layer '{lid}' (out, n_in)")

    def _new(self, data):
        return PMatQuasiDiag(self.layer_collection, None, data=data)

    def _coupling_shape(self, lid):
        return None if self.data[lid][1] is None else tuple(self.data[lid][1].shape)

    def _blocks(self):
        out = []
        for lid, shape in self._unit_shapes().items():
            d, c = self.data[lid]
            if shape is None:
                out.append(DiagBlock(d))
            else:
                nw = shape[0] * shape[1]
                out.append(QuasiDiagBlock(d[:nw].reshape(shape), c, d[nw:]))
        return out

    def _from_blocks(self, blocks):
        return _quasidiag_from_blocks(self.layer_collection, self._block_keys(), blocks)

    # solves block by block (the base class's), through the per-unit Schur complement;
    # 'schur' names that method
    _SOLVE_METHODS = {"default": (None, None), "solve": (None, None), "schur": (None, None)}

    def inverse(self, regul=1e-8, damping="exact"):
        """``(M + Λ)⁻¹``, exact. It is not quasi-diagonal (each unit's block of the inverse is
        dense), but it is *diagonal plus one rank-one term per unit*: a
        [`PMatQuasiDiagInverse`][nngeometry.object.PMatQuasiDiagInverse], in ``O(P)`` memory. ``regul``: see [`solvePVec`][nngeometry.object.pspace.abstract.PMatAbstract.solvePVec]."""
        blocks = self._power_blocks(-1.0, regul, damping, "inverse")
        data = {}
        for lid, b in zip(self._block_keys(), blocks):
            data[lid] = (b.inv_a, b.a_inv_c, b.inv_sigma) if isinstance(b, ArrowInverseBlock) \
                else (b.d, None, None)
        return PMatQuasiDiagInverse(self.layer_collection, None, data=data)

    def pow(self, x, regul=0.0, damping="exact"):
        """``(M + Λ)^x``, exact. ``x = 1``: ``M + Λ`` (a ``PMatQuasiDiag``); ``x = -1``:
        [`inverse`][nngeometry.object.pspace.abstract.PMatAbstract.inverse] (a [`PMatQuasiDiagInverse`][nngeometry.object.PMatQuasiDiagInverse], ``O(P)``). Other powers (``x = ±1/2``,
        integers) of an arrowhead are dense per unit: each unit's ``(n_in + 1) × (n_in + 1)``
        block ``(B_o + Λ_o)^x`` from its eigendecomposition (batched over the units), returned
        as a [`PMatBlockDiag`][nngeometry.object.PMatBlockDiag] (zero between units; memory ``Σ_l p_l²``, refused with a
        ``MemoryError`` when it can't fit). Negative powers need ``M + Λ`` invertible,
        fractional ones positive semi-definite (the shared errors: the quasi-diagonal of a PSD
        matrix can be indefinite)."""
        if x == 1:
            return self._matpower(1.0, regul, damping, "pow(1)")
        if x == -1:
            return self._inverse_impl(regul=regul, damping=damping)
        what = f"pow({x})"
        regul, blocks, dampings = self._dampings(regul, what, damping)
        like = self._like()
        check_blocks_fit(self.layer_collection, like.element_size(), f"PMatQuasiDiag.{what}")
        lc = self.layer_collection
        data = {}
        for (lid, shape), b, d in zip(self._unit_shapes().items(), blocks, dampings):
            if shape is None:
                data[lid] = torch.diag(b.matpower(x, d, ("PMatQuasiDiag", regul)).d)
                continue
            out, n = shape
            evals, evecs = _spectral.eigh(b.arrowheads(d))  # (out, n+1), per unit
            ev = _spectral.eigvals_for_power(evals.reshape(-1), x, "PMatQuasiDiag",
                                             regul).reshape(evals.shape)
            units = (evecs * ev.unsqueeze(-2) ** x) @ evecs.transpose(-1, -2)
            # flat index of unit o's entries: its weights o·n + i, then its bias out·n + o
            o = torch.arange(out, device=like.device)
            idx = torch.cat([(o * n).unsqueeze(1) + torch.arange(n, device=like.device),
                             (out * n + o).unsqueeze(1)], dim=1)
            p = lc[lid].numel()
            block = torch.zeros(p, p, dtype=units.dtype, device=units.device)
            block[idx.unsqueeze(-1), idx.unsqueeze(-2)] = units
            data[lid] = block
        return PMatBlockDiag(lc, None, data=data)

    def mm(self, other):
        raise NotImplementedError(
            "the product of two quasi-diagonal matrices is not quasi-diagonal (the couplings "
            "create weight-weight terms); use mv/mmap, or PMatBlockDiag.mm")


class PMatQuasiDiagInverse(_PerLayer):
    """``(Q + λI)⁻¹`` for a quasi-diagonal ``Q`` (what [`PMatQuasiDiag.inverse`][nngeometry.object.pspace.PMatQuasiDiag.inverse] returns).

    Per coupled unit the block is ``diag(1/(a+λ), 0) + z zᵀ / σ`` with ``z = [c/(a+λ); -1]`` and
    ``σ`` the Schur complement; diagonal layers store ``1/(d+λ)``. ``data`` is
    ``{layer_id: (inv_a, a_inv_c, inv_sigma)}`` (the last two None for diagonal layers).

    A container of `ArrowInverseBlock` (and `DiagBlock` for the diagonal layers): every
    operation is the base class's, exact. Undamped, its inverse is the quasi-diagonal it came
    from (``inverse()`` and ``pow(-1)`` return a [`PMatQuasiDiag`][nngeometry.object.PMatQuasiDiag]); damped by ``Λ``, each unit
    is a diagonal plus one rank-one term, so ``solve``, ``logdet``, ``diag_of_inverse`` and
    ``eigenvalues`` are exact in ``O(P)`` (Sherman-Morrison, the matrix determinant lemma),
    while the damped inverse, other powers and ``+ PMatEye`` (no representation stores that
    form) are refused, naming what to use.
    """

    def _coupling_shape(self, lid):
        z = self.data[lid][1]
        return None if z is None else tuple(z.shape)

    def _blocks(self):
        out = []
        for lid, shape in self._unit_shapes().items():
            inv_a, z, inv_sigma = self.data[lid]
            out.append(DiagBlock(inv_a) if z is None else ArrowInverseBlock(inv_a, z, inv_sigma))
        return out

    def _from_blocks(self, blocks):
        if any(isinstance(b, DiagPlusRankOneBlock) for b in blocks):
            raise NotImplementedError(
                "PMatQuasiDiagInverse: with a damping (regul > 0, or + PMatEye) each unit of "
                "the inverse of a quasi-diagonal matrix is a diagonal plus a rank-one term, "
                "which no representation stores; use solve(), logdet(), diag_of_inverse() or "
                "eigenvalues() with that regul, or go back to the PMatQuasiDiag it came from")
        if any(isinstance(b, QuasiDiagBlock) for b in blocks):  # the undamped inverse
            return _quasidiag_from_blocks(self.layer_collection, self._block_keys(), blocks)
        data = {}
        for lid, b in zip(self._block_keys(), blocks):
            data[lid] = (b.inv_a, b.a_inv_c, b.inv_sigma) if isinstance(b, ArrowInverseBlock) \
                else (b.diag(), None, None)
        return PMatQuasiDiagInverse(self.layer_collection, None, data=data)

    def _build(self, examples, **kwargs):
        raise NotImplementedError(
            "PMatQuasiDiagInverse is what PMatQuasiDiag.inverse(regul) returns and cannot be "
            "built from examples: build F = FIM(..., PMatQuasiDiag) (or "
            "PMatQuasiDiag(generator=..., examples=...)), then F.inverse(regul=...)")

    def mm(self, other):
        raise NotImplementedError(
            "PMatQuasiDiagInverse.mm is not implemented (the product is not quasi-diagonal); "
            "use mv/mmap, or to_torch() on small models")


def _quasidiag_from_blocks(layer_collection, keys, blocks):
    """The `PMatQuasiDiag` of arrowhead and diagonal blocks (one per layer of ``keys``)."""
    data = {}
    for lid, b in zip(keys, blocks):
        if isinstance(b, QuasiDiagBlock):
            data[lid] = (torch.cat([b.a.reshape(-1), b.s]), b.c)
        elif isinstance(b, DiagBlock):
            data[lid] = (b.d, None)
        else:  # a scaled identity added to a diagonal layer
            data[lid] = (b.diag(), None)
    return PMatQuasiDiag(layer_collection, None, data=data)
