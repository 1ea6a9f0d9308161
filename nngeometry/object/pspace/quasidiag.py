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

Ollivier, *Riemannian metrics for neural networks I: feedforward networks*, Information and
Inference 4(2), 2015.
"""
import torch

from ...backend.consumers import QuasiDiagCovariance
from ..map import PFMapDense
from ..vector import PVector
from . import _checks
from ._prior import scalar_or_prior
from .abstract import PMatAbstract
from .eye import PMatEye


class _PerLayer(PMatAbstract):
    """Shared plumbing: representations stored as ``{layer_id: tuple}`` that act on each layer's
    slice independently through ``_apply_layer(lid, X)`` with ``X`` of shape ``(..., p_l)``."""

    def _apply_layer(self, lid, X):
        raise NotImplementedError

    def _apply(self, X):
        """``M`` applied to the rows of ``X`` (shape ``(..., P)``): ``X @ M`` (``M`` symmetric)."""
        lc = self.layer_collection
        return torch.cat([self._apply_layer(lid, X[..., lc.slice(lid)]) for lid in lc.layer_ids()],
                         dim=-1)

    def mv(self, vs):
        self._check_pvector(vs)
        return PVector(self.layer_collection, vector_repr=self._apply(vs.get_flat_representation()))

    def vTMv(self, vs):
        self._check_pvector(vs)
        f = vs.get_flat_representation()
        return torch.dot(f, self._apply(f))

    def mmap(self, pfmap):
        self._check_pfmap(pfmap)
        return PFMapDense(self.layer_collection, data=self._apply(pfmap.to_torch()))

    def to_torch(self):
        """The dense ``(P, P)`` matrix (allocates ``2 P²``: the identity and the result;
        refused with a MemoryError naming the size when it can't fit)."""
        p = self.layer_collection.numel()
        d = self.get_diag()
        _checks.check_dense_fits(p, d.element_size(), count=2,
                                 what=f"{type(self).__name__}.to_torch(): a dense")
        return self._apply(torch.eye(p, dtype=d.dtype, device=d.device))

    def trace(self):
        return self.get_diag().sum()

    def _split(self, lid, X, shape):
        """``X (..., p_l)`` -> weights ``(..., out, n_in)`` and biases ``(..., out)``."""
        nw = shape[0] * shape[1]
        return X[..., :nw].reshape(*X.shape[:-1], *shape), X[..., nw:]

    @staticmethod
    def _join(w, b):
        return torch.cat([w.reshape(*w.shape[:-2], -1), b], dim=-1)


class PMatQuasiDiag(_PerLayer):
    """Quasi-diagonal approximation of ``M = (1/n) Σ_x J(x)ᵀ J(x)`` (see the module docstring).

    ``data`` is ``{layer_id: (diag, cross)}`` with ``diag`` the ``(p_l,)`` diagonal of the
    layer's block (weight then bias) and ``cross`` the ``(out, n_in)`` couplings
    ``M[w_oi, b_o]``, or None for layers kept diagonal. Memory ``O(P)``; every operation is
    ``O(P)`` per vector.
    """

    def _build(self, examples, **kwargs):
        return self.generator.get_covariance_quasidiag(examples, self.layer_collection)

    def _new(self, data):
        return PMatQuasiDiag(self.layer_collection, None, data=data)

    def _items(self):
        for lid in self.layer_collection.layer_ids():
            d, c = self.data[lid]
            yield lid, d, c, (None if c is None else QuasiDiagCovariance.unit_shape(self.layer_collection[lid]))

    def _apply_layer(self, lid, X):
        d, c = self.data[lid]
        if c is None:
            return X * d
        shape = c.shape
        w, b = self._split(lid, X, shape)
        dw, db = self._split(lid, d, shape)
        yw = dw * w + c * b.unsqueeze(-1)
        yb = db * b + (c * w).sum(-1)
        return self._join(yw, yb)

    # ------------------------------------------------------------------ solves and functions
    def _regul(self, regul, what):
        """``regul`` as given for a scalar ``λ``, else the normalised per-layer /
        per-parameter prior: adding a diagonal ``Λ`` keeps the arrowhead structure, so every
        kind is exact here."""
        scalar, prior = scalar_or_prior(regul, self.layer_collection, "PMatQuasiDiag", what)
        return scalar if prior is None else prior

    @staticmethod
    def _layer_lam(regul, lid, like):
        """``Λ`` on layer ``lid``: the scalar, or the layer's ``(p_l,)`` diagonal."""
        return regul.layer_slice(lid, like) if hasattr(regul, "layer_slice") else regul

    def _schur(self, lid, regul, what="solve"):
        """``(1/(a+λ), c/(a+λ), 1/σ)`` of every unit of a coupled layer, after refusing a
        singular unit (shared singular-matrix error): an ``a + λ`` that is 0, or a Schur
        complement ``σ`` at round-off level (its cancellation error is ``n_in · eps`` times
        ``|s + λ| + Σ c²/|a + λ|``; exactly 0 when a regul > 0 was given)."""
        d, c = self.data[lid]
        dw, db = self._split(lid, d, c.shape)
        lam = self._layer_lam(regul, lid, d)
        lw, lb = self._split(lid, lam, c.shape) if torch.is_tensor(lam) and lam.dim() == 1 \
            else (lam, lam)
        aw = dw + lw
        _checks.check_invertible(aw, "PMatQuasiDiag", what, regul, exact=True,
                                 detail=f"layer '{lid}' has a weight whose diagonal entry plus "
                                        "regul is 0")
        inv_a = 1.0 / aw
        a_inv_c = c * inv_a
        sb = db + lb
        sigma = sb - (c * a_inv_c).sum(-1)
        sig = sigma.detach()
        if _checks._is_damped(regul):
            tol = torch.zeros_like(sig)
        else:
            size = sb.detach().abs() + (c * a_inv_c).detach().abs().sum(-1)
            tol = (c.shape[-1] + 1) * torch.finfo(sig.dtype).eps * size
        if bool((sig.abs() <= tol).any()):
            raise _checks.singular_error(
                "PMatQuasiDiag", what, regul,
                f"the Schur complement of {int((sig.abs() <= tol).sum())} output unit(s) of layer "
                f"'{lid}' is 0 (smallest |σ| {float(sig.abs().min()):.3g})")
        return inv_a, a_inv_c, 1.0 / sigma

    def _diag_invertible(self, lid, d, regul, what):
        dd = d + self._layer_lam(regul, lid, d)
        _checks.check_invertible(dd, "PMatQuasiDiag", what, regul, exact=True,
                                 detail=f"layer '{lid}' has a diagonal entry plus regul equal to 0")
        return dd

    def _solve_rows(self, X, regul):
        lc = self.layer_collection
        out = []
        for lid, d, c, shape in self._items():
            R = X[..., lc.slice(lid)]
            if c is None:
                out.append(R / self._diag_invertible(lid, d, regul, "solve"))
                continue
            inv_a, a_inv_c, inv_sigma = self._schur(lid, regul)
            u, beta = self._split(lid, R, c.shape)
            # eliminate the weights (diagonal part), solve the bias on the Schur complement,
            # then back-substitute
            y = (beta - (a_inv_c * u).sum(-1)) * inv_sigma
            x = (u - c * y.unsqueeze(-1)) * inv_a
            out.append(self._join(x, y))
        return torch.cat(out, dim=-1)

    def solvePVec(self, x, regul=1e-8, solve="default"):
        """``(M + Λ)⁻¹ x``, exact, through the per-unit Schur complement; ``regul`` gives ``Λ``:
        a scalar ``λ`` (``λI``), a dict ``{layer_id: λ_l}``, a PVector (one value per
        parameter), a PMatEye or a PMatDiag."""
        self._check_pvector(x)
        _check_solve(solve)
        regul = self._regul(regul, "solve")
        return PVector(self.layer_collection,
                       vector_repr=self._solve_rows(x.get_flat_representation(), regul))

    def solvePFMap(self, x, regul=1e-8, solve="default"):
        """``(M + Λ)⁻¹`` applied to every row of the PFMap (exact)."""
        self._check_pfmap(x)
        _check_solve(solve)
        regul = self._regul(regul, "solve")
        return PFMapDense(self.layer_collection, data=self._solve_rows(x.to_torch(), regul))

    def inverse(self, regul=1e-8):
        """``(M + regul·I)⁻¹``, exact. It is not quasi-diagonal (each unit's block of the
        inverse is dense), but it is *diagonal plus one rank-one term per unit*: a
        :class:`PMatQuasiDiagInverse`, in ``O(P)`` memory. ``regul``: see :meth:`solvePVec`."""
        regul = self._regul(regul, "inverse")
        data = {}
        for lid, d, c, shape in self._items():
            if c is None:
                data[lid] = (1.0 / self._diag_invertible(lid, d, regul, "inverse"), None, None)
            else:
                data[lid] = self._schur(lid, regul, "inverse")
        return PMatQuasiDiagInverse(self.layer_collection, None, data=data)

    def pow(self, x, regul=0.0):
        """Only ``x = 1`` (``M + regul·I``) and ``x = -1`` (:meth:`inverse`): other powers of an
        arrowhead matrix are dense per unit."""
        regul = self._regul(regul, f"pow({x})")
        if x == 1:
            if hasattr(regul, "layer_slice"):
                return self._new({lid: (d + regul.layer_slice(lid, d), c)
                                  for lid, d, c, _ in self._items()})
            return self + PMatEye(self.layer_collection, scaling=torch.as_tensor(
                regul, dtype=next(iter(self.data.values()))[0].dtype))
        if x == -1:
            return self.inverse(regul=regul)
        raise NotImplementedError(
            f"PMatQuasiDiag.pow({x}) is not implemented: powers other than 1 and -1 of a "
            "quasi-diagonal matrix are not quasi-diagonal; use solve()/inverse(), or PMatDiag / "
            "PMatBlockDiag, whose powers are computed exactly")

    def logdet(self, regul=0.0):
        """``log det(M + regul·I) = Σ_units (Σ_i log(a_oi + λ) + log σ_o)``.

        The quasi-diagonal of a PSD matrix is not PSD in general (``σ_o`` can be negative):
        ``log |det|`` is returned when ``det > 0`` (an even number of negative pivots ``a + λ``,
        ``σ``: the pivots of the unit blocks' LDLᵀ factorization, whose signs are those of the
        eigenvalues), and refused with the fix when ``det <= 0``. ``regul``: ``Λ`` as in
        :meth:`solvePVec`."""
        regul = self._regul(regul, "logdet")
        pivots = []
        for lid, d, c, shape in self._items():
            if c is None:
                pivots.append(self._diag_invertible(lid, d, regul, "logdet"))
            else:
                inv_a, _, inv_sigma = self._schur(lid, regul, "logdet")
                pivots += [(1.0 / inv_a).reshape(-1), 1.0 / inv_sigma]
        return _checks.logdet_of(torch.cat(pivots), "PMatQuasiDiag", regul, exact=True,
                                 require_pd=False)

    def mm(self, other):
        raise NotImplementedError(
            "the product of two quasi-diagonal matrices is not quasi-diagonal (the couplings "
            "create weight-weight terms); use mv/mmap, or PMatBlockDiag.mm")

    # ------------------------------------------------------------------ reductions
    def get_diag(self):
        return torch.cat([d for _, d, _, _ in self._items()])

    def frobenius_norm(self):
        # every coupling appears twice (row and column)
        sq = sum((d * d).sum() + (0.0 if c is None else 2 * (c * c).sum())
                 for _, d, c, _ in self._items())
        return torch.sqrt(sq)

    # ------------------------------------------------------------------ arithmetic
    def _map(self, fd, fc):
        return self._new({lid: (fd(d), None if c is None else fc(c)) for lid, d, c, _ in self._items()})

    def _scaled(self, x):
        return self._map(lambda d: d * x, lambda c: c * x)

    def __add__(self, other):
        if isinstance(other, PMatEye):
            if other.layer_collection != self.layer_collection:
                raise ValueError("the two matrices are built on different LayerCollections")
            return self._map(lambda d: d + other.scaling, lambda c: c)
        self._check_same_kind(other)
        return self._binary(other, torch.add)

    __radd__ = __add__

    def __sub__(self, other):
        if isinstance(other, PMatEye):
            return self + (-other)
        self._check_same_kind(other)
        return self._binary(other, torch.sub)

    def _binary(self, other, op):
        data = {}
        for lid, d, c, _ in self._items():
            d2, c2 = other.data[lid]
            data[lid] = (op(d, d2), None if c is None else op(c, c2))
        return self._new(data)


class PMatQuasiDiagInverse(_PerLayer):
    """``(Q + λI)⁻¹`` for a quasi-diagonal ``Q`` (what :meth:`PMatQuasiDiag.inverse` returns).

    Per coupled unit the block is ``diag(1/(a+λ), 0) + z zᵀ / σ`` with ``z = [c/(a+λ); -1]`` and
    ``σ`` the Schur complement; diagonal layers store ``1/(d+λ)``. ``data`` is
    ``{layer_id: (inv_a, a_inv_c, inv_sigma)}`` (the last two None for diagonal layers).
    """

    def _apply_layer(self, lid, X):
        inv_a, z, inv_sigma = self.data[lid]
        if z is None:
            return X * inv_a
        w, b = self._split(lid, X, z.shape)
        t = ((z * w).sum(-1) - b) * inv_sigma  # zᵀx / σ
        return self._join(inv_a * w + z * t.unsqueeze(-1), -t)

    def get_diag(self):
        out = []
        for lid in self.layer_collection.layer_ids():
            inv_a, z, inv_sigma = self.data[lid]
            if z is None:
                out.append(inv_a)
            else:
                out.append(torch.cat([(inv_a + z * z * inv_sigma.unsqueeze(-1)).reshape(-1),
                                      inv_sigma]))
        return torch.cat(out)

    def frobenius_norm(self):
        sq = 0.0
        for lid in self.layer_collection.layer_ids():
            inv_a, z, inv_sigma = self.data[lid]
            if z is None:
                sq = sq + (inv_a * inv_a).sum()
                continue
            # ||Λ + z zᵀ/σ||² = ||Λ||² + 2 zᵀΛz/σ + (||z||²/σ)²
            zz = (z * z).sum(-1) + 1.0
            sq = sq + (inv_a * inv_a).sum() + (2 * (inv_a * z * z).sum(-1) * inv_sigma).sum() \
                + ((zz * inv_sigma) ** 2).sum()
        return torch.sqrt(sq)

    def _scaled(self, x):
        return PMatQuasiDiagInverse(self.layer_collection, None, data={
            lid: (a * x, z, None if s is None else s * x) for lid, (a, z, s) in self.data.items()})

    def _build(self, examples, **kwargs):
        raise NotImplementedError(
            "PMatQuasiDiagInverse is what PMatQuasiDiag.inverse(regul) returns and cannot be "
            "built from examples: build F = FIM(..., PMatQuasiDiag) (or "
            "PMatQuasiDiag(generator=..., examples=...)), then F.inverse(regul=...)")

    def solvePVec(self, x, regul=1e-8, solve="default"):
        raise NotImplementedError(
            "solving with the inverse of a quasi-diagonal matrix: multiply by the original "
            "PMatQuasiDiag (+ PMatEye for the damping) with mv instead")

    solvePFMap = solvePVec

    def _back_to_quasidiag(self, what):
        raise NotImplementedError(
            f"PMatQuasiDiagInverse.{what} is not implemented (it only supports products and "
            "reductions); use the PMatQuasiDiag it came from (its inverse is Q + regul·I, its "
            "log-determinant -Q.logdet(regul)), or to_torch() on small models")

    def inverse(self, regul=1e-8):
        self._back_to_quasidiag("inverse")

    def pow(self, x, regul=0.0):
        self._back_to_quasidiag("pow")

    def logdet(self, regul=0.0):
        self._back_to_quasidiag("logdet")

    def mm(self, other):
        self._back_to_quasidiag("mm")

    def __add__(self, other):
        self._back_to_quasidiag("__add__")

    def __sub__(self, other):
        self._back_to_quasidiag("__sub__")


def _check_solve(solve):
    if solve not in ("default", "solve", "schur"):
        raise ValueError(f"unknown solve '{solve}' for PMatQuasiDiag: use 'default' (Schur complement)")
