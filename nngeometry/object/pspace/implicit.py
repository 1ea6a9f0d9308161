"""``PMatImplicit``: the exact matrix, never stored; every product runs the model."""

import torch

from ..map import PFMapDense
from ..vector import PVector
from .abstract import (PMatAbstract, check_same_function, function_origin,
                       resolve_layer_collection)
from .blocks.implicit import ImplicitBlock


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
        # pickled when the kept diagonal included the scale: computed again on demand
        self.__dict__.pop("_diag", None)

    @property
    def dtype(self):
        for p in self._gen().model.parameters():
            return p.dtype
        return torch.get_default_dtype()

    def _like(self):
        """An empty tensor of the model's dtype and device (the matrix has no other)."""
        return torch.empty(0, dtype=self.dtype, device=self.get_device())

    # ------------------------------------------------------------------ the container
    # One `ImplicitBlock`, matrix-free: products (``mv``, ``vTMv``, ``mmap``, ``mapTMmap``), the
    # diagonal and trace, scaling, ``+ s·I`` / ``+ diag(d)`` are the base class's, on the
    # block; so are ``inverse``, ``pow``, ``logdet``, ``eigenvalues``, ``norm``, whose block
    # says what to use instead. The solves below only read the conjugate-gradient keywords.
    def _blocks(self):
        return [ImplicitBlock(self, self.scale, self.shift)]

    def _from_blocks(self, blocks):
        """A copy on the same examples (the diagonal once computed is shared) with the
        block's scale and shift."""
        (b,) = blocks
        new = PMatImplicit.__new__(PMatImplicit)
        new.__dict__.update(self.__dict__)
        new.scale, new.shift = b.scale, b.shift
        new.last_cg_info = None
        return new

    # ``M + PMatDiag``: the block adds the diagonal
    _ADDS_WITH = ("PMatDiag",)

    def _check_same_kind(self, other):
        if type(other) is not type(self) and type(other).__name__ not in self._ADDS_WITH:
            ImplicitBlock(self)._needs_matrix(
                f"__add__ / __sub__ with a {type(other).__name__}",
                "apply mv of each term and add (or subtract) the PVectors")
        super()._check_same_kind(other)

    def _mm_rows(self, V):
        """``M`` applied to the rows of ``V`` (shape ``(m, P)``): the block's batched product
        (what LiSSA iterates)."""
        return self._blocks()[0]._mm_rows(V)

    # ------------------------------------------------------------------ solves
    def _cg_solve(self, X, regul, damping, X0, return_info, **cg):
        """``(M + Λ)⁻¹`` on the rows of ``X`` by the block's conjugate gradients."""
        regul, (block,), (lam,) = self._dampings(regul, "solve", damping)
        return block.solve(X, lam, (type(self).__name__, regul), X0=X0,
                           return_info=return_info, **cg)

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
        y = self._cg_solve(x.get_flat_representation().unsqueeze(0), regul, damping, X0,
                           return_info, tol=tol, max_iter=max_iter, M=M, atol=atol)
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
        tol = _tolerance(tol, rtol)
        X0 = None
        if x0 is not None:
            self._check_pfmap(x0)
            X0 = x0.to_torch()
            if X0.shape != J.shape:
                raise ValueError(f"x0 has shape {tuple(X0.shape)}, the PFMap to solve "
                                 f"{tuple(J.shape)}: give a starting PFMap of the same shape")
        Y = self._cg_solve(J, regul, damping, X0, return_info, tol=tol, max_iter=max_iter, M=M,
                           atol=atol)
        out = PFMapDense(self.layer_collection, data=Y)
        return (out, dict(self.last_cg_info)) if return_info else out

    # ------------------------------------------------------------------ reductions
    def to_torch(self, allow_dense=False):
        """The ``(P, P)`` matrix, built through the generator, only with ``allow_dense=True``:
        it is what PMatImplicit exists to avoid (use PMatDense if you need it often)."""
        if not allow_dense:
            raise NotImplementedError(
                "PMatImplicit.to_torch() would build the P × P matrix; call "
                "to_torch(allow_dense=True) if that is really wanted, or build a PMatDense")
        return super().to_torch()

    def mm(self, other):
        ImplicitBlock(self)._needs_matrix("mm", "chain mv calls, or use PMatDense")


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
