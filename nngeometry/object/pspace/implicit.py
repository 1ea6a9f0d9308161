"""``PMatImplicit``: the exact matrix, never stored; every product runs the model."""

import torch

from ..map import PFMapDense
from ..vector import PVector
from . import _checks
from ._cg import conjugate_gradients
from ._prior import scalar_or_prior
from .abstract import (PMatAbstract, check_reduction, check_same_function, function_origin,
                       reduce_forms, resolve_layer_collection)


class PMatImplicit(PMatAbstract):
    """``M = (1/n) Σ_x J(x)ᵀ J(x)`` (times an optional scalar, see ``*``), exact, with nothing
    stored but the examples: each product is one pass over the data with Jacobian-vector
    products (forward mode) and vector-Jacobian products (reverse mode) through
    ``torch.func``; products with many vectors (a PFMap) are vmapped over them.

    * ``mv(v)``: ``M v``, one JVP + one VJP per batch; ``vTMv(v)``: ``(1/n) Σ ||J(x) v||²``,
      one JVP per batch; ``mmap`` / ``mapTMmap``: the same, vmapped over the PFMap's rows.
    * ``get_device()``: the device of the model's parameters.
    * ``get_diag()`` / ``trace()``: the diagonal through the generator (one pass, cached).
    * ``solve(x, regul=λ, tol=..., max_iter=..., M=preconditioner)``: ``(M + λI)⁻¹ x`` by
      (preconditioned) conjugate gradients, one pass over the data per iteration (the PFMap
      version runs one CG per row, batched).
    * Operations that need the matrix's entries (``inverse``, ``pow``, ``mm``, ``+``, ``-``,
      ``frobenius_norm``, ``logdet``) raise ``NotImplementedError``; ``to_torch()`` only builds
      the ``P × P`` matrix when asked explicitly with ``to_torch(allow_dense=True)``.

    Args:
        rows_per_pass: how many vectors ``mmap`` / ``mapTMmap`` / PFMap solves push through the
            model at once (memory ≈ that many copies of a batch's activations; default all).
    """

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None,
                 rows_per_pass=None, **kwargs):
        if data is not None:
            raise ValueError("PMatImplicit stores no data: give examples (and a generator)")
        if examples is None or generator is None:
            raise ValueError("PMatImplicit needs a generator and examples")
        self.layer_collection = resolve_layer_collection(layer_collection, generator, "PMatImplicit")
        self.generator = generator
        self.examples = examples
        self.data = None
        self.scale = 1.0
        # a diagonal added to scale·M: 0, a scalar, or a (P,) tensor (M + PMatEye, M + PMatDiag)
        self.shift = 0.0
        self.rows_per_pass = rows_per_pass
        self._diag = None
        self.last_cg_info = None

    def to(self, *args, **kwargs):
        """A copy, when the device and dtype asked for are the model's (the only ones this
        matrix has: it stores no entries, every product runs the model). Another device or
        dtype is refused (``ValueError``): move the model itself (``model.to(...)``; the matrix
        follows it, its products then take vectors on the model's device and in its dtype), or
        build a stored representation (``PMatDense``, ``PMatKFAC``, ...) and move that."""
        from .._moving import parse_to

        device, dtype, _ = parse_to(args, kwargs, "PMatImplicit")
        params = list(getattr(getattr(self.generator, "model", None), "parameters", list)())
        have_device = params[0].device if params else None
        have_dtype = params[0].dtype if params else None
        want_device = torch.device(device) if device is not None else None
        if want_device is not None and want_device.type != "cpu" and want_device.index is None \
                and have_device is not None and have_device.type == want_device.type:
            want_device = have_device  # 'cuda' is the model's 'cuda:k'
        if (want_device is not None and want_device != have_device) or \
                (dtype is not None and dtype != have_dtype):
            raise ValueError(
                f"PMatImplicit.to({', '.join(str(a) for a in (device, dtype) if a is not None)}): "
                "this matrix stores no entries, its products run the model, which is on "
                f"{have_device} in {have_dtype}. Move the model instead (model.to(...)): the "
                "matrix follows it. Or build a stored representation (PMatDense, PMatKFAC, "
                "PMatDiag, ...) and move that")
        return super().to(*args, **kwargs)

    def _gen(self):
        if self.generator is None:
            origin = self.__dict__.get("_function_origin")
            built = f" (it was built with the function {origin})" if origin else ""
            raise RuntimeError(
                "this PMatImplicit has no generator: it was unpickled, and the generator, which "
                "holds the model and its function, is not pickled" + built + ". Attach a "
                "generator built with the SAME function the matrix was built with, not the bare "
                "model (that would give another matrix): for FIM(model, ..., variant=v), "
                "M.generator = TorchHooksJacobianBackend(model, "
                "nngeometry.curvature.closed_form_function(lambda *b: model(b[0]), v)); for "
                "FIM_MonteCarlo, nngeometry.curvature.monte_carlo_function(lambda *b: model(b[0]), "
                "v, trials); or build a new PMatImplicit with FIM(..., PMatImplicit)")
        check_same_function(self, "PMatImplicit")
        return self.generator

    def __getstate__(self):
        state = super().__getstate__()
        # the generator (model + function) is dropped; where its function came from is kept,
        # so that the error of an unpickled matrix can name the function to attach again, and
        # a generator attached with another function is refused (see check_same_function)
        origin = function_origin(self.generator)
        if origin is not None:
            state["_function_origin"] = origin
        return state

    def __setstate__(self, state_dict):
        super().__setstate__(state_dict)
        self.__dict__.setdefault("shift", 0.0)  # pickled before the shift existed

    def _like(self, scale):
        new = PMatImplicit.__new__(PMatImplicit)
        new.__dict__.update(self.__dict__)
        new.scale = scale
        new._diag = None if self._diag is None else self._diag * (scale / self.scale)
        new.last_cg_info = None
        return new

    @property
    def dtype(self):
        for p in self._gen().model.parameters():
            return p.dtype
        return torch.get_default_dtype()

    # ------------------------------------------------------------------ products
    def _mm_rows(self, V):
        """``M`` applied to the rows of ``V`` (shape ``(m, P)``)."""
        gen, lc = self._gen(), self.layer_collection
        step = self.rows_per_pass or V.shape[0]
        parts = [gen.implicit_mm(V[i:i + step], self.examples, lc) for i in range(0, V.shape[0], step)]
        return self.scale * torch.cat(parts, dim=0) + self.shift * V

    def _flat_mv(self, f):
        """``M f`` for a flat ``(P,)`` tensor (no autograd graph to ``f``)."""
        out = self._gen().implicit_mv(f, self.examples, self.layer_collection)
        # in place on the product's own (P,) result: `scale * out + shift * f` held three
        # more vectors of the parameters' size (the peak of a large model's product)
        if not (isinstance(self.scale, float) and self.scale == 1.0):
            out = out.mul_(self.scale)
        if torch.is_tensor(self.shift) or self.shift != 0.0:
            out = out.add_(self.shift * f)
        return out

    def mv(self, v):
        """``M v``: one JVP and one VJP per batch. Differentiable w.r.t. ``v`` (``M`` is
        symmetric, so the backward of ``v -> M v`` is one more product ``g -> M g``; twice
        differentiable too), not w.r.t. the model's parameters."""
        self._check_pvector(v)
        f = v.get_flat_representation()
        self._gen()  # an unpickled matrix says so before autograd is involved
        return PVector(self.layer_collection, vector_repr=_mat_vec(f, self._flat_mv))

    def vTMv(self, v):
        """``vᵀ M v = (1/n) Σ_x ||J(x) v||²``: one JVP per batch. Differentiable w.r.t. ``v``
        (gradient ``2 M v``: one ``mv`` in the backward pass)."""
        self._check_pvector(v)
        f = v.get_flat_representation()
        gen = self._gen()

        fd = f.detach()
        value = self.scale * gen.implicit_vTMv(fd, self.examples, self.layer_collection) \
            + (self.shift * fd * fd).sum()
        if torch.is_grad_enabled() and f.requires_grad:
            return _Quadratic.apply(f, value, self._flat_mv)
        return value

    def mmap(self, pfmap):
        """``M`` applied to every row of the PFMap (vmapped JVPs and VJPs)."""
        self._check_pfmap(pfmap)
        J = pfmap.to_torch()
        n_outputs, n_examples, n_params = J.shape
        rows = self._mm_rows(J.reshape(n_outputs * n_examples, n_params))
        return PFMapDense(self.layer_collection, data=rows.reshape(J.shape))

    def mapTMmap(self, pfmap, reduction="sum"):
        """``q[k, i] = J[k, i] M J[k, i]ᵀ`` (``'diag'``: ``(K, n)``; ``'sum'``: ``Σ_k``,
        ``(n,)``) with JVPs only: ``q_a = (1/N) Σ_{x, o} (J_o(x)·r_a)²`` for each row ``r_a``."""
        self._check_pfmap(pfmap)
        check_reduction(reduction)
        Q = pfmap.to_torch()
        n_outputs, n_examples, n_params = Q.shape
        rows = Q.reshape(n_outputs * n_examples, n_params)
        step = self.rows_per_pass or rows.shape[0]
        gen = self._gen()
        jvps = torch.cat([gen.implicit_JV(rows[i:i + step], self.examples, self.layer_collection)
                          for i in range(0, rows.shape[0], step)], dim=0)
        n_seen = jvps.shape[-1]  # examples of the matrix's data
        q = self.scale * (jvps * jvps).reshape(rows.shape[0], -1).sum(dim=-1).reshape(
            n_outputs, n_examples) / n_seen \
            + (self.shift * Q * Q).sum(dim=-1)
        return reduce_forms(q, reduction)

    # ------------------------------------------------------------------ solves
    def _preconditioner(self, M):
        """``Z = M R`` for the rows of ``R`` ``(m, P)``, from a PMat (one ``mmap``) or a
        callable taking and returning a PVector (one call per row); None: ``Z = R``."""
        if M is None:
            return lambda R: R
        lc = self.layer_collection
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

    def _solve_rows(self, B, regul, tol, max_iter, M, what="solve", return_info=False,
                    X0=None, atol=0.0):
        """``(M + Λ)⁻¹`` applied to the rows of ``B`` by CG. ``regul`` gives ``Λ``: a scalar
        ``λ``, a dict ``{layer_id: λ_l}``, a PVector, a PMatEye or a PMatDiag (any diagonal:
        CG only needs products). Differentiable w.r.t. ``B`` and ``Λ`` by implicit
        differentiation (one more CG solve in the backward pass), not through the iterations."""
        scalar, prior = scalar_or_prior(regul, self.layer_collection, "PMatImplicit", what)
        lam = scalar if prior is None else prior.flat(B)
        if _checks.needs_graph(B, lam):
            def solver(R, lam_value, return_info=False):
                with torch.no_grad():
                    return self._cg(R, lam_value, tol, max_iter, M, return_info, atol=atol)
            lam_t = lam if torch.is_tensor(lam) else torch.as_tensor(lam, dtype=B.dtype,
                                                                     device=B.device)
            with torch.no_grad():
                X = self._cg(B.detach(), lam_t.detach(), tol, max_iter, M, return_info, X0=X0,
                             atol=atol)
            return _CGSolve.apply(B, lam_t, X, solver)
        return self._cg(B, lam, tol, max_iter, M, return_info, X0=X0, atol=atol)

    def _cg(self, B, regul, tol, max_iter, M=None, return_info=False, X0=None, atol=0.0):
        """Batched (preconditioned) conjugate gradients: ``(M + regul I) X = B`` for the rows of
        ``B`` ``(m, P)``.

        Starts from ``X0`` (rows, default 0) and stops when every row has
        ``||r|| ≤ max(tol · ||b||, atol)``. In exact arithmetic CG ends after as
        many iterations as ``M + regul I`` has distinct eigenvalues, at most ``rank(M) + 1 ≤
        n_output · n + 1``; each iteration is one pass over the examples. With a preconditioner
        (argument ``M``, here written ``C``: symmetric positive definite, approximating
        ``(M + regul I)⁻¹``), the iterations are those of CG on the preconditioned system: as
        many as ``C (M + regul I)`` has distinct eigenvalues (one for ``C = (M + regul I)⁻¹``).
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
        self.last_cg_info = {"iterations": it, "relative_residual": rel,
                             "converged": converged}
        if not converged and not return_info:
            # the iterate of a solve that did not converge is not (M + regul·I)⁻¹ b: on a
            # singular M without damping it grows without bound (entries of 1e35)
            raise _checks.not_converged_error("PMatImplicit.solve (conjugate gradients)", it,
                                              rel, tol)
        return X

    def solvePVec(self, x, regul=1e-8, solve="default", tol=None, max_iter=None, M=None,
                  damping="exact", return_info=False, x0=None, rtol=None, atol=0.0):
        """``(M + regul·I)⁻¹ x`` by conjugate gradients.

        Args:
            tol: relative residual ``||b - (M + regul I) y|| / ||b||`` to reach (default
                ``eps^0.75``: about ``2e-12`` in float64, ``6e-6`` in float32).
            max_iter: most CG iterations, each one pass over the examples (default ``P``).
                Stopping there before ``tol`` raises ``SolverNotConvergedError`` (e.g. a
                singular ``M`` with ``regul=0``), unless ``return_info=True``.
            return_info: return ``(y, info)``, ``info`` a dict with ``iterations``,
                ``relative_residual`` (the largest over the rows) and ``converged``, and
                return the last iterate instead of raising when CG did not converge.
            M: a preconditioner ``C`` (the argument's name follows
                ``scipy.sparse.linalg.cg``; it is not this matrix): an approximation of
                ``(M + regul·I)⁻¹``, symmetric positive definite, given as a PMat (applied with
                ``mmap``; e.g. ``PMatDiag(...).inv(regul)`` for Jacobi, or a KFAC inverse)
                or a callable ``PVector -> PVector``. It changes the iterations, not the
                solution.
            x0: the starting point, a PVector (default 0), as in `nngeometry.solve.cg`.
            rtol: the name `nngeometry.solve.cg` gives ``tol`` (give one of the two).
            atol: also stop when ``||b - (M + regul I) y|| ≤ atol`` (default 0).
        """
        self._check_damping(damping, "solve")
        self._check_pvector(x)
        _check_solve(solve)
        tol = _tolerance(tol, rtol)
        X0 = None
        if x0 is not None:
            self._check_pvector(x0)
            X0 = x0.get_flat_representation().unsqueeze(0)
        y = self._solve_rows(x.get_flat_representation().unsqueeze(0), regul, tol, max_iter, M,
                             return_info=return_info, X0=X0, atol=atol)
        out = PVector(self.layer_collection, vector_repr=y.squeeze(0))
        return (out, dict(self.last_cg_info)) if return_info else out

    def solvePFMap(self, x, regul=1e-8, solve="default", tol=None, max_iter=None, M=None,
                   damping="exact", return_info=False, x0=None, rtol=None, atol=0.0):
        """``(M + regul·I)⁻¹`` applied to every row of the PFMap, by batched CG (see
        [`solvePVec`][nngeometry.object.pspace.abstract.PMatAbstract.solvePVec] for ``tol`` / ``rtol``, ``atol``, ``max_iter``, ``return_info`` and
        the preconditioner ``M``); ``x0``: a PFMap of the same shape, the starting rows
        (default 0)."""
        self._check_damping(damping, "solve")
        self._check_pfmap(x)
        _check_solve(solve)
        J = x.to_torch()
        n_rows, n_params = J.shape[0] * J.shape[1], J.shape[2]
        tol = _tolerance(tol, rtol)
        X0 = None
        if x0 is not None:
            self._check_pfmap(x0)
            X0 = x0.to_torch()
            if X0.shape != J.shape:
                raise ValueError(f"x0 has shape {tuple(X0.shape)}, the PFMap to solve "
                                 f"{tuple(J.shape)}: give a starting PFMap of the same shape")
            X0 = X0.reshape(n_rows, n_params)
        Y = self._solve_rows(J.reshape(n_rows, n_params), regul, tol, max_iter, M,
                             return_info=return_info, X0=X0, atol=atol)
        out = PFMapDense(self.layer_collection, data=Y.reshape(J.shape))
        return (out, dict(self.last_cg_info)) if return_info else out

    # ------------------------------------------------------------------ reductions
    def get_diag(self):
        """The diagonal, computed once through the generator (one pass) and cached."""
        if self._diag is None:
            self._diag = self.scale * self._gen().get_covariance_diag(self.examples,
                                                                      self.layer_collection)
        return self._diag + self.shift

    def trace(self):
        return self.get_diag().sum()

    def to_torch(self, allow_dense=False):
        """The ``(P, P)`` matrix, built through the generator, only with ``allow_dense=True``:
        it is what PMatImplicit exists to avoid (use PMatDense if you need it often)."""
        if not allow_dense:
            raise NotImplementedError(
                "PMatImplicit.to_torch() would build the P × P matrix; call "
                "to_torch(allow_dense=True) if that is really wanted, or build a PMatDense")
        _checks.check_dense_fits(self.layer_collection.numel(), self.dtype.itemsize,
                                 what="PMatImplicit.to_torch(allow_dense=True): a dense")
        D = self.scale * self._gen().get_covariance_matrix(self.examples, self.layer_collection)
        if torch.is_tensor(self.shift) and self.shift.dim():
            return D + torch.diag(self.shift.to(D.dtype))
        return D + self.shift * torch.eye(D.shape[0], dtype=D.dtype, device=D.device)

    def _needs_matrix(self, what, instead):
        raise NotImplementedError(
            f"PMatImplicit.{what} needs the matrix's entries, which PMatImplicit never stores; "
            f"{instead}")

    def frobenius_norm(self):
        self._needs_matrix("frobenius_norm", "use PMatLowRank (exact, from the r × r Gram "
                                             "matrix) or PMatDense")

    def inverse(self, regul=1e-8, damping="exact"):
        self._check_damping(damping, "inverse")
        self._needs_matrix("inverse", "use solve(x, regul) (conjugate gradients)")

    def pow(self, x, regul=0.0, damping="exact"):
        self._check_damping(damping, "pow")
        self._needs_matrix("pow", "use solve(x, regul) for x = -1, or PMatLowRank.pow")

    def logdet(self, regul=0.0, damping="exact"):
        self._check_damping(damping, "logdet")
        self._needs_matrix("logdet", "use PMatLowRank.logdet or PMatDense.logdet")

    def mm(self, other):
        self._needs_matrix("mm", "chain mv calls, or use PMatDense")

    def __add__(self, other):
        """``M + s·I`` (a `PMatEye`) or ``M + diag(d)`` (a `PMatDiag`): still
        implicit, every product adds the diagonal (nothing more is stored than the diagonal
        itself); sums with other matrices need their entries."""
        from .diag import PMatDiag
        from .eye import PMatEye

        if isinstance(other, (PMatEye, PMatDiag)):
            if other.layer_collection != self.layer_collection:
                raise ValueError("the two matrices are built on different LayerCollections")
            new = self._like(self.scale)
            new.shift = self.shift + (other.scaling if isinstance(other, PMatEye) else other.data)
            return new
        self._needs_matrix("__add__", "apply mv of each term and add the PVectors")

    def __sub__(self, other):
        from .diag import PMatDiag
        from .eye import PMatEye

        if isinstance(other, (PMatEye, PMatDiag)):
            return self + (-other)
        self._needs_matrix("__sub__", "apply mv of each term and subtract the PVectors")

    # ------------------------------------------------------------------ arithmetic
    def _scaled(self, x):
        new = self._like(self.scale * x)
        new.shift = self.shift * x
        return new


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


def _tolerance(tol, rtol):
    """``tol`` (ours) or ``rtol`` (the name of `nngeometry.solve.cg`), not two different ones."""
    if rtol is None:
        return tol
    if tol is not None and tol != rtol:
        raise ValueError(f"tol={tol} and rtol={rtol} name the same relative tolerance; give one")
    return rtol


def _check_solve(solve):
    if solve not in ("default", "cg"):
        raise ValueError(f"unknown solve '{solve}' for PMatImplicit: use 'cg' (the default)")
