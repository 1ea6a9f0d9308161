"""Guards shared by every representation: singular matrices, stale caches, half-precision
factorizations and dense allocations that cannot fit.

* `check_invertible` / `logdet_of`: one test and one message for "``M + regul·I`` is
  singular", so that no representation returns inf/NaN (or round-off garbage) from ``solve``,
  ``inverse``, ``pow(x < 0)`` or ``logdet``.
* `cached`: caches of factorizations keyed on what they were computed from (the data
  tensors' identity and version counters, the damping), so an in-place update of ``.data``
  (``F.data.mul_(0.9).add_(0.1 * new)``) is seen, and nothing holding an autograd graph is kept.
* `upcast` / `factor_dtype`: LAPACK has no float16 / bfloat16 kernels; factorizations
  run in float32 and results are cast back.
* `check_dense_fits`: a ``P × P`` allocation is refused, with its size, before the
  allocator fails (or the machine swaps).
"""
import weakref

import torch

from ... import _memory

_HALF = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------- singular matrices
class SingularMatrixError(ValueError):
    """``M + regul·I`` is singular (or numerically so): the operation has no finite result."""


class SolverNotConvergedError(RuntimeError):
    """An iterative solve (conjugate gradients, MINRES) reached its iteration limit before its
    tolerance: its iterate is not the solution asked for (e.g. a singular system without
    damping, whose right-hand side is outside the range, makes CG diverge)."""


def not_converged_error(caller, iterations, rel, tol, hint=""):
    """The shared error of an iterative solve that stopped before its tolerance."""
    return SolverNotConvergedError(
        f"{caller}: the iterative solve did not converge: {iterations} iterations left a relative "
        f"residual ||b - (A + regul·I) x|| / ||b|| = {rel:.3g} > tol = {tol:.3g}. The matrix may "
        "be singular or ill-conditioned at this damping: pass a damping regul > 0 (e.g. "
        "regul=1e-3 · trace/P), a preconditioner M, or a larger max_iter"
        + (f"; {hint}" if hint else "") + ". To accept the last iterate as it is, pass "
        "return_info=True: it returns (x, info) with the iteration count and the residual, "
        "and does not raise")


def _float(regul):
    """A damping as a float, without a warning for a tensor that requires grad."""
    return float(regul.detach()) if torch.is_tensor(regul) else float(regul)


def _is_damped(regul):
    """Whether the caller asked for a positive damping (then values are trusted as computed);
    a per-layer or per-parameter prior (``_prior.Prior``) is positive when all its entries are."""
    return _float(regul) > 0


def describe_regul(regul):
    """``regul=0.1``, or the description of a per-layer / per-parameter prior."""
    describe = getattr(regul, "describe", None)
    return describe() if describe is not None else f"regul={_float(regul):.3g}"


def singular_error(rep, what, regul, detail=""):
    """The shared error for an operation that needs ``M + regul·I`` invertible."""
    return SingularMatrixError(
        f"{rep}.{what}: the matrix is singular at this damping ({describe_regul(regul)})"
        + (f"; {detail}" if detail else "") + ": its inverse, negative powers and "
        "log-determinant are infinite. Pass a damping regul > 0 (e.g. regul=1e-3 · trace/P), "
        "or use pinv() for the pseudo-inverse")


def round_off_tol(values, scale=None):
    """Size below which a value computed by a factorization of a matrix of norm ``scale``
    (default ``max |values|``) is round-off: ``n · eps · scale`` with ``n`` the number of values
    (the usual numerical-rank tolerance, as ``torch.linalg.matrix_rank``)."""
    values = values.detach()
    if scale is None:
        scale = values.abs().max() if values.numel() else values.new_zeros(())
    eps = torch.finfo(values.dtype).eps
    return float(max(values.numel(), 1) * eps * scale)


def check_invertible(values, rep, what, regul, exact=False, detail=""):
    """Refuse with `singular_error` when a value of ``values`` (the eigenvalues, or
    pivots, of ``M + regul·I``) is zero.

    ``exact=True``: the values are stored exactly (a diagonal), only an exact 0 is singular.
    Otherwise they come out of a factorization: an undamped matrix (``regul <= 0``) is singular
    when a value is round-off (``|v| <= n·eps·max|v|``, the numerical rank test); a damped one
    (``regul > 0``, the user's choice of damping) only when a value is exactly 0."""
    if values.numel() == 0:
        return
    v = values.detach()
    small = v.abs().min()
    tol = 0.0 if exact or _is_damped(regul) else round_off_tol(v)
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"{rep}.{what}: the matrix has non-finite entries (NaN or Inf); check "
                         "how it was built or updated")
    if float(small) <= tol:
        if not detail:
            detail = (f"its smallest |eigenvalue|, {float(small):.3g}, is round-off "
                      f"(≤ {tol:.3g})" if tol > 0 else "it has a zero eigenvalue")
        raise singular_error(rep, what, regul, detail)


def logdet_of(values, rep, regul, exact=False, require_pd=True, multiplicity=1,
              allow_negative_det=False):
    """``log det(M + regul·I) = Σ log λ`` from the eigenvalues (or diagonal pivots) ``values``
    of ``M + regul·I``, each counted ``multiplicity`` times.

    Singular (see `check_invertible`): the shared singular error. ``require_pd=True``: a
    negative value is refused (log det of a matrix that should be positive definite, e.g. the
    damped Fisher of a Laplace posterior); ``require_pd=False``: ``log |det|`` when
    ``det > 0`` (an even number of negative values), the same clear error when ``det < 0``
    (``allow_negative_det=True``: ``log |det|`` in any case, for a part of a matrix whose
    caller checks the sign of the whole determinant)."""
    v = values.detach()
    low = float(v.min()) if v.numel() else 0.0
    if require_pd and low < -(0.0 if exact or _is_damped(regul) else round_off_tol(v)):
        neg = 1  # a genuinely negative eigenvalue: refused before asking about singularity
    else:
        check_invertible(values, rep, "logdet", regul, exact=exact)
        neg = int((v < 0).sum()) * multiplicity
    if neg and require_pd:
        raise not_psd_error(rep, "logdet", low, regul)
    if neg % 2 and not allow_negative_det:
        raise ValueError(
            f"{rep}.logdet: log-determinant of a matrix with a negative eigenvalue ({low:.3g}; "
            f"{neg} negative, so det < 0): M + regul·I must be positive definite; use a regul "
            f"above {-low:.3g}")
    return multiplicity * torch.log(values.abs()).sum()


class NotPositiveSemiDefiniteError(ValueError):
    """``M + Λ`` has a negative eigenvalue where the operation needs it PSD (fractional powers,
    square roots) or positive definite (log-determinants). One class and one message for every
    representation."""


def not_psd_error(rep, what, low, regul):
    """The shared error for a fractional power / square root / logdet of a matrix that is not
    positive semi-definite after damping (``low`` its most negative eigenvalue)."""
    return NotPositiveSemiDefiniteError(
        f"{rep}.{what}: M + regul·I is not positive semi-definite: it has a negative eigenvalue "
        f"({low:.3g}) at {describe_regul(regul)}, so its fractional powers, square root and "
        "log-determinant are not real (logdet needs M + regul·I positive definite: it must be "
        f"positive definite). Use a regul above {-low:.3g} (e.g. for an indefinite Hessian), "
        "or an integer power")


def psd_values(values, rep, what, regul, exact=False):
    """The eigenvalues ``values`` of ``M + Λ`` made ready for a fractional power: a genuinely
    negative one is refused (`not_psd_error`); negative round-off (``exact=False``: values
    out of a factorization) is clipped to 0. ``exact=True``: stored values, any negative one is
    genuine."""
    if values.numel() == 0:
        return values
    v = values.detach()
    low = float(v.min())
    if low >= 0:
        return values
    tol = 0.0 if exact else 100 * round_off_tol(v)
    if low < -tol:
        raise not_psd_error(rep, what, low, regul)
    return values.clamp(min=0)


def check_regul_nonnegative(rep, what, regul, why):
    if _float(regul) < 0:
        raise ValueError(f"{rep}.{what}: {describe_regul(regul)} is negative; {why}. Pass "
                         "regul ≥ 0")


# ---------------------------------------------------------------------- caches
def tensors_of(obj):
    """Every tensor in ``obj`` (a tensor, or nested dicts / tuples / lists of them)."""
    out = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if torch.is_tensor(o):
            out.append(o)
        elif isinstance(o, dict):
            stack.extend(reversed(list(o.values())))
        elif isinstance(o, (tuple, list)):
            stack.extend(reversed(list(o)))
    return out


def needs_graph(*objs):
    """Whether a result computed now from ``objs`` (tensors, numbers, nested containers)
    records an autograd graph: such a result must not be cached (a second ``backward`` or
    ``autograd.grad`` through a reused graph fails, and a graph-free cached value reused where
    a graph is wanted would silently drop gradients)."""
    if not torch.is_grad_enabled():
        return False
    return any(t.requires_grad for o in objs for t in tensors_of(o))


class Snapshot:
    """What a cached value was computed from: weak references to the source tensors (a
    tensor freed and replaced by a new one at the same address is not mistaken for it), their
    version counters (bumped by every in-place operation: ``mul_``, ``add_``, ``copy_``,
    indexed assignment) and data pointers. Checking it costs ``O(number of tensors)``.

    In-place changes that bypass the version counter are not seen: writes through
    ``tensor.data`` (a separate counter) or through a NumPy view."""

    __slots__ = ("refs", "state")

    def __init__(self, tensors):
        self.refs = tuple(weakref.ref(t) for t in tensors)
        self.state = tuple((t._version, t.data_ptr()) for t in tensors)

    def matches(self, tensors):
        if len(tensors) != len(self.refs):
            return False
        return all(r() is t and s == (t._version, t.data_ptr())
                   for r, s, t in zip(self.refs, self.state, tensors))


def regul_key(regul):
    """Cache key of a damping: its value, or None (do not cache) for a tensor that records a
    graph (see `needs_graph`), and for a per-layer / per-parameter prior its own key."""
    key = getattr(regul, "key", None)
    if key is not None:
        return key()
    if needs_graph(regul):
        return None
    return _float(regul)


def cached(store, name, key, compute, sources):
    """``compute()``, reused from ``store[name]`` while ``key`` is the same and the tensors of
    ``sources`` are the same objects, unchanged since (see `Snapshot`).

    Only the last key is kept (a factorization is as large as the matrix: a sweep over reguls
    must not pile them up); the previous value is freed before computing the new one. ``key``
    None, or sources that record an autograd graph, are computed and not cached."""
    if isinstance(key, tuple) and any(k is None for k in key):
        key = None  # e.g. (solve, regul_key(regul)) with a graph-recording regul
    tensors = tensors_of(sources)
    entry = store.get(name)
    if key is not None and entry is not None and entry[0] == key and entry[1].matches(tensors):
        return entry[2]
    store.pop(name, None)
    value = compute()
    if key is not None and not needs_graph(tensors):
        store[name] = (key, Snapshot(tensors), value)
    return value


# ---------------------------------------------------------------------- half precision
def factor_dtype(dtype):
    """The dtype a factorization runs in: float32 for float16 / bfloat16 (no LAPACK / cuSOLVER
    kernels for them), else ``dtype``."""
    return torch.float32 if dtype in _HALF else dtype


def upcast(t):
    """``t`` in `factor_dtype` (a copy for half precision, ``t`` itself otherwise)."""
    return t.to(factor_dtype(t.dtype))


# ---------------------------------------------------------------------- dense allocations
def check_dense_fits(p, itemsize, limit_bytes=None, what=None, count=1):
    """Refuse, with the size, ``count`` dense ``p × p`` matrices of ``itemsize`` bytes per
    entry that can't be allocated (more than the memory this process can still get)."""
    need = count * p * p * itemsize
    if limit_bytes is None:
        limit_bytes = _memory.available_memory()
    if limit_bytes is not None and need > limit_bytes:
        raise MemoryError(
            f"{what or 'a dense'} {p} × {p} matrix needs {need / 2**30:.1f} GiB, more than the "
            f"{limit_bytes / 2**30:.1f} GiB available; use a lower-memory representation "
            "(PMatKFAC, PMatEKFAC, PMatDiag, PMatBlockDiag, PMatImplicit) or its own operations "
            "(mv, solve, get_diag, ...) instead of a dense matrix, or a smaller LayerCollection")
