"""The matrix-free block of PMatImplicit: ``B = scale · M + diag(shift)``, ``M = (1/n) Σ_x
J(x)ᵀ J(x)`` never stored, every product one pass over the examples through the generator
(Jacobian-vector products forward, vector-Jacobian products backward, vmapped over the rows of a
batch).

Its layout is the flat ``(P,)`` vector. What needs only products is here: ``apply`` (``M v``,
differentiable with respect to ``v``), ``quadratic`` (JVPs only), ``solve`` (conjugate gradients,
the one loop of ``_cg.py``, differentiable with respect to the right-hand side and the damping
by implicit differentiation), ``diag`` / ``trace`` (the generator's diagonal, computed once),
``dense`` (the generator's dense matrix), ``scaled`` and the sums with ``s·I`` or a diagonal.
What needs the matrix's entries (powers, inverse, log-determinant, eigenvalues, Frobenius norm,
sums with other matrices) raises ``NotImplementedError`` naming what to use instead.

The block reads the generator, the examples, the collection and ``rows_per_pass`` from its
PMatImplicit (``source``), which also keeps the diagonal once computed and the last CG's
``last_cg_info``; ``scale`` and ``shift`` are the block's own (a scaled or shifted copy is a new
block on the same source).
"""
import torch

from ...map import PFMapDense
from ...vector import PVector
from .. import _checks
from .._cg import conjugate_gradients
from ..abstract import PMatAbstract
from .base import Block
from .diag import DiagBlock
from .identity import ScaledIdentityBlock


class ImplicitBlock(Block):
    """``scale · M + diag(shift)`` on the examples of ``source`` (see the module docstring);
    ``shift`` is 0, a scalar or a ``(P,)`` tensor."""

    __slots__ = ("source", "scale", "shift")

    def __init__(self, source, scale=1.0, shift=0.0):
        self.source, self.scale, self.shift = source, scale, shift

    @property
    def shape(self):
        return (self.source.layer_collection.numel(),)

    def _needs_matrix(self, what, instead):
        raise NotImplementedError(
            f"PMatImplicit.{what} needs the matrix's entries, which PMatImplicit never stores; "
            f"{instead}")

    # ------------------------------------------------------------------ products
    def _mm_rows(self, V):
        """The block applied to the rows of ``V`` (shape ``(m, P)``)."""
        src = self.source
        gen, lc = src._gen(), src.layer_collection
        step = src.rows_per_pass or V.shape[0]
        parts = [gen.implicit_mm(V[i:i + step], src.examples, lc)
                 for i in range(0, V.shape[0], step)]
        return self.scale * torch.cat(parts, dim=0) + self.shift * V

    def _flat_mv(self, f):
        """The block applied to a flat ``(P,)`` tensor (no autograd graph to ``f``)."""
        src = self.source
        out = src._gen().implicit_mv(f, src.examples, src.layer_collection)
        # in place on the product's own (P,) result: `scale * out + shift * f` held three
        # more vectors of the parameters' size (the peak of a large model's product)
        if not (isinstance(self.scale, float) and self.scale == 1.0):
            out = out.mul_(self.scale)
        if torch.is_tensor(self.shift) or self.shift != 0.0:
            out = out.add_(self.shift * f)
        return out

    def apply(self, V):
        """One vector: one JVP and one VJP per batch, differentiable w.r.t. ``V`` (``M`` is
        symmetric, so the backward of ``v -> M v`` is one more product; products of any order),
        not w.r.t. the model's parameters. A batch: the products vmapped over its rows."""
        if V.dim() == 1:
            self.source._gen()  # an unpickled matrix says so before autograd is involved
            return _mat_vec(V, self._flat_mv)
        rows = self._mm_rows(V.reshape(-1, V.shape[-1]))
        return rows.reshape(V.shape)

    def quadratic(self, V):
        """``vᵀ B v = scale · (1/n) Σ_x ||J(x) v||² + Σ shift v²``, JVPs only. One vector:
        differentiable w.r.t. ``V`` (gradient ``2 B v``: one product in the backward pass)."""
        src = self.source
        gen, lc = src._gen(), src.layer_collection
        if V.dim() == 1:
            fd = V.detach()
            value = self.scale * gen.implicit_vTMv(fd, src.examples, lc) \
                + (self.shift * fd * fd).sum()
            if torch.is_grad_enabled() and V.requires_grad:
                return _Quadratic.apply(V, value, self._flat_mv)
            return value
        rows = V.reshape(-1, V.shape[-1])
        step = src.rows_per_pass or rows.shape[0]
        jvps = torch.cat([gen.implicit_JV(rows[i:i + step], src.examples, lc)
                          for i in range(0, rows.shape[0], step)], dim=0)
        n_seen = jvps.shape[-1]  # examples of the matrix's data
        q = self.scale * (jvps * jvps).reshape(rows.shape[0], -1).sum(dim=-1) / n_seen \
            + (self.shift * rows * rows).sum(dim=-1)
        return q.reshape(V.shape[:-1])

    # ------------------------------------------------------------------ solves
    def solve(self, V, damping=0.0, caller=None, method=None, tol=None, max_iter=None, M=None,
              X0=None, atol=0.0, return_info=False):
        """``(B + Λ)⁻¹`` applied to the rows of ``V`` (``(..., P)``) by batched (preconditioned)
        conjugate gradients, ``Λ`` a scalar or the ``(P,)`` diagonal; ``X0``: the starting rows
        (default 0). Differentiable w.r.t. ``V`` and ``Λ`` by implicit differentiation (one
        more CG solve in the backward pass), not through the iterations. Not converged within
        ``max_iter``: ``SolverNotConvergedError``, unless ``return_info`` (then the last
        iterate)."""
        B = V.reshape(-1, V.shape[-1])
        if X0 is not None:
            X0 = X0.reshape(B.shape)
        lam = damping
        if _checks.needs_graph(B, lam):
            def solver(R, lam_value, return_info=False):
                with torch.no_grad():
                    return self._cg(R, lam_value, tol, max_iter, M, return_info, atol=atol)
            lam_t = lam if torch.is_tensor(lam) else torch.as_tensor(lam, dtype=B.dtype,
                                                                     device=B.device)
            with torch.no_grad():
                X = self._cg(B.detach(), lam_t.detach(), tol, max_iter, M, return_info, X0=X0,
                             atol=atol)
            X = _CGSolve.apply(B, lam_t, X, solver)
        else:
            X = self._cg(B, lam, tol, max_iter, M, return_info, X0=X0, atol=atol)
        return X.reshape(V.shape)

    def _preconditioner(self, M):
        """``Z = M R`` for the rows of ``R`` ``(m, P)``, from a PMat (one ``mmap``) or a
        callable taking and returning a PVector (one call per row); None: ``Z = R``."""
        if M is None:
            return lambda R: R
        lc = self.source.layer_collection
        if isinstance(M, PMatAbstract):
            if M.layer_collection != lc:
                raise ValueError("the preconditioner M is built on another LayerCollection than "
                                 "the matrix; build it on the same layers")
            return lambda R: M.mmap(PFMapDense(lc, data=R.unsqueeze(0))
                                    ).to_torch().squeeze(0)
        if callable(M):
            def apply(R):
                out = []
                for row in R:
                    z = M(PVector(lc, vector_repr=row))
                    out.append(z.get_flat_representation() if isinstance(z, PVector) else z)
                return torch.stack(out)
            return apply
        raise TypeError(f"the preconditioner M must be a PMat or a callable PVector -> PVector, "
                        f"got {type(M).__name__}")

    def _cg(self, B, regul, tol, max_iter, M=None, return_info=False, X0=None, atol=0.0):
        """Batched (preconditioned) conjugate gradients: ``(B + regul I) X = B_rhs`` for the rows
        of ``B`` ``(m, P)``.

        Starts from ``X0`` (rows, default 0) and stops when every row has
        ``||r|| ≤ max(tol · ||b||, atol)``. In exact arithmetic CG ends after as many iterations
        as the damped matrix has distinct eigenvalues, at most ``rank(M) + 1 ≤ n_output · n +
        1``; each iteration is one pass over the examples. With a preconditioner (argument
        ``M``, here written ``C``: symmetric positive definite, approximating the damped
        inverse), the iterations are those of CG on the preconditioned system: as many as
        ``C (B + regul I)`` has distinct eigenvalues (one for ``C = (B + regul I)⁻¹``).
        """
        low = float(regul.detach().min()) if torch.is_tensor(regul) and regul.dim() else \
            _checks._float(regul)
        if low < 0:
            raise ValueError(f"regul must be ≥ 0, got {low:.3g}")
        if tol is None:
            tol = torch.finfo(B.dtype).eps ** 0.75
        X, _, it, converged, rel = conjugate_gradients(
            self._mm_rows, B, regul, None if M is None else self._preconditioner(M), rtol=tol,
            atol=atol, max_iter=B.shape[1] if max_iter is None else max_iter, X0=X0)
        self.source.last_cg_info = {"iterations": it, "relative_residual": rel,
                                    "converged": converged}
        if not converged and not return_info:
            # the iterate of a solve that did not converge is not (M + regul·I)⁻¹ b: on a
            # singular M without damping it grows without bound (entries of 1e35)
            raise _checks.not_converged_error("PMatImplicit.solve (conjugate gradients)", it,
                                              rel, tol)
        return X

    # ------------------------------------------------------------------ functions
    def matpower(self, p, damping=0.0, caller=None):
        what = "inverse" if float(p) == -1.0 else f"pow({p})"
        self._needs_matrix(what, "use solve(x, regul) (conjugate gradients) for "
                                 "(M + regul·I)⁻¹ x, or PMatLowRank.pow / PMatDense for powers")

    def logdet(self, damping=0.0, caller=None):
        self._needs_matrix("logdet", "use PMatLowRank.logdet or PMatDense.logdet")

    def eigenvalues(self, damping=0.0):
        self._needs_matrix("eigenvalues", "use nngeometry.spectrum (Lanczos, from products), or "
                                          "PMatLowRank / PMatDense")

    # ------------------------------------------------------------------ reductions
    def diag(self):
        """The diagonal, through the generator (one pass, kept by the source)."""
        src = self.source
        base = src.__dict__.get("_base_diag")
        if base is None:
            base = src._base_diag = src._gen().get_covariance_diag(src.examples,
                                                                   src.layer_collection)
        return self.scale * base + self.shift

    def trace(self):
        return self.diag().sum()

    def dense(self):
        """The ``(P, P)`` matrix through the generator (what PMatImplicit exists to avoid)."""
        src = self.source
        D = self.scale * src._gen().get_covariance_matrix(src.examples, src.layer_collection)
        if torch.is_tensor(self.shift) and self.shift.dim():
            return D + torch.diag(self.shift.to(D.dtype))
        return D + self.shift * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)

    def frobenius_sq(self):
        self._needs_matrix("frobenius_norm", "use PMatLowRank (exact, from the r × r Gram "
                                             "matrix) or PMatDense")

    # ------------------------------------------------------------------ arithmetic
    def scaled(self, x):
        return ImplicitBlock(self.source, self.scale * x, self.shift * x)

    def add(self, other):
        """``+ s·I`` or ``+ diag(d)``: still implicit, every product adds the diagonal."""
        if isinstance(other, ScaledIdentityBlock):
            return ImplicitBlock(self.source, self.scale, self.shift + other.s)
        if isinstance(other, DiagBlock):
            return ImplicitBlock(self.source, self.scale, self.shift + other.d)
        self._needs_matrix("__add__ / __sub__", "apply mv of each term and add (or subtract) "
                                                "the PVectors")


def _mat_vec(v, product):
    """``M v`` by ``product`` (a function of flat tensors, ``M`` symmetric), differentiable
    w.r.t. ``v`` when ``v`` requires grad."""
    value = product(v.detach())
    if torch.is_grad_enabled() and v.requires_grad:
        return _MatVec.apply(v, value, product)
    return value


class _MatVec(torch.autograd.Function):
    """Links ``value = M v`` to ``v``: the vector-Jacobian product of the linear map ``v -> M v``
    is ``g -> Mᵀ g = M g``, one more product (through `_mat_vec` again: products of any
    order). The products are computed outside ``forward``, where forward-mode AD, which they
    use, is off."""

    @staticmethod
    def forward(ctx, v, value, product):
        ctx.product = product
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        return _mat_vec(g, ctx.product), None, None


class _Quadratic(torch.autograd.Function):
    """Links ``value = vᵀ M v`` to ``v``, with gradient ``2 M v``."""

    @staticmethod
    def forward(ctx, v, value, product):
        ctx.save_for_backward(v)
        ctx.product = product
        return value.clone()

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        return 2 * g * _mat_vec(v, ctx.product), None, None


class _CGSolve(torch.autograd.Function):
    """Links ``X = (M + Λ)⁻¹ B`` (rows, computed by CG outside) to ``B`` and to ``Λ`` (a scalar
    or the ``(P,)`` diagonal): with ``Z = (M + Λ)⁻¹ G`` for the incoming gradient ``G``,
    ``dB = Z`` and ``dΛ_pp = -Σ_rows Z_p X_p`` (summed over ``p`` for a scalar ``Λ``)."""

    @staticmethod
    def forward(ctx, B, lam, X, solver):
        ctx.save_for_backward(lam, X)
        ctx.solver = solver
        return X.clone()

    @staticmethod
    def backward(ctx, G):
        lam, X = ctx.saved_tensors
        Z = ctx.solver(G, lam.detach())
        g_lam = None
        if ctx.needs_input_grad[1]:
            g_lam = -(Z * X).sum(0)
            if lam.dim() == 0:
                g_lam = g_lam.sum()
        return Z, g_lam, None, None
