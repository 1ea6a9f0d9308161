"""Trace and diagonal estimators from matrix-vector products, with standard errors.

For a symmetric ``P × P`` matrix ``M`` known only through products, and probe vectors ``ω`` with
``E[ω ωᵀ] = I`` (Rademacher or standard normal entries):

* **Hutchinson** (1989): ``tr(M) = E[ωᵀ M ω]``, and ``diag(M) = E[ω ⊙ M ω]`` (Bekas, Kokiopoulou
  & Saad 2007). With ``m`` independent probes the estimate is the mean of the ``m`` samples.
* **Hutch++** (Meyer, Musco, Musco & Woodruff 2021): ``k = ⌊m/3⌋`` probes ``S`` sketch the range
  of ``M``: ``Q = orth(M S)``; then ``tr(M) = tr(Qᵀ M Q) + tr((I - QQᵀ) M (I - QQᵀ))``, the first
  term exact (``k`` products), the second by Hutchinson on the ``m - 2k`` remaining probes
  projected by ``I - QQᵀ``. Exact when ``k ≥ rank(M)``, i.e. ``m ≥ 3 rank(M)``.
* **XTrace / XDiag** (Epperly, Tropp & Webber 2024): exchangeable estimators using ``s = ⌊m/2⌋``
  probes ``Ω`` for both the sketch and the residual. For each ``i``, ``Π_i`` is the orthogonal
  projector on the range of ``M Ω₋ᵢ`` (the sketch without probe ``i``), and
  ``t_i = tr(Π_i M) + ω_iᵀ (I - Π_i) M (I - Π_i) ω_i`` (trace),
  ``t_i = diag(Π_i M) + ω_i ⊙ (I - Π_i) M ω_i`` (diagonal): unbiased since ``ω_i`` is independent
  of ``Π_i``. The estimate is the mean of the ``t_i``. All ``Π_i`` come from one QR of the ``P × s``
  sketch ``Y = M Ω`` (``Y = U R``): the range of ``Y₋ᵢ`` is that of ``U`` minus the direction
  ``U σ_i``, with ``σ_i ∝ R⁻ᵀ eᵢ`` (orthogonal to every column of ``R`` but the ``i``-th), so
  ``Π_i = UUᵀ - (Uσ_i)(Uσ_i)ᵀ``; ``s`` more products give ``Z = M U``. Exact when
  ``rank(M) < s``.

**Standard error.** From the ``m`` samples ``t_1..t_m`` whose mean is the estimate (the
residual samples for Hutch++, whose sketch part is exact): ``stderr = std(t) / √m`` with
``std`` the sample standard deviation (``m - 1`` in the denominator); elementwise for diagonal
estimates. For Hutchinson and Hutch++ the samples are independent (given the sketch), so by the
central limit theorem the truth lies within ``± 2 stderr`` of the estimate about 95 % of the time
once ``m`` is a few tens (``Estimate.interval`` uses the Student-t quantile with ``m - 1``
degrees of freedom, which makes it right for a few samples too). For XTrace / XDiag the samples
are exchangeable but not independent, and the same formula is the error estimate the method's
authors propose; it misses the covariance the samples share through the sketch, which one run
cannot estimate: the error is understated by up to 25 % and the t-interval covers 85-93 % (measured
over 300-400 seeds, see docs/estimators.md).
"""
import math
import statistics
from dataclasses import dataclass, field

import torch

from ..object.vector import PVector
from ._operator import Operator, check_count, random_probes


@dataclass
class Estimate:
    """A stochastic estimate.

    Attributes:
        value: the estimate (a 0-dim tensor for a trace, a PVector for a diagonal).
        stderr: its standard error (same type as ``value``): ``std(samples) / √(number of
            samples)``. [`interval`][nngeometry.estimators.Estimate.interval] (``value ± t·stderr``, ``t`` the Student quantile)
            covers the truth about 95 % of the time for Hutchinson and Hutch++; 85-93 % for
            XTrace / XDiag, whose samples are not independent (module docstring).
        n_matvecs: matrix-vector products used.
        method: the estimator's name.
        samples: the samples whose mean is ``value`` (minus an exact part for Hutch++), shape
            ``(m,)`` for a trace, ``(m, P)`` for a diagonal.
    """

    value: object
    stderr: object
    n_matvecs: int
    method: str
    samples: torch.Tensor = field(repr=False, default=None)

    @property
    def dof(self):
        """Degrees of freedom of ``stderr``: the number of samples minus one."""
        return None if self.samples is None else int(self.samples.shape[0]) - 1

    def interval(self, z=None, level=0.95):
        """``(value - z·stderr, value + z·stderr)`` (flat tensors for a diagonal).

        ``z=None``: the Student-t quantile of ``level`` with [`dof`][nngeometry.estimators.Estimate.dof] degrees of freedom
        (``stderr`` is estimated from the samples: with 15 of them the 95 % quantile is 2.14, not
        1.96); ``z`` given: that multiple of ``stderr``."""
        if z is None:
            z = student_t_quantile(0.5 + level / 2, self.dof) if self.dof else 2.0
        v, e = _flat(self.value), _flat(self.stderr)
        return v - z * e, v + z * e


def student_t_quantile(p, dof):
    """The ``p``-quantile of Student's t distribution with ``dof`` degrees of freedom: exact for
    1 and 2, the Cornish-Fisher expansion in ``1/dof`` around the normal quantile (Abramowitz &
    Stegun 26.7.5, four terms; error below 0.004 at ``dof = 3`` and 1e-4 from ``dof = 7``)
    above. No scipy needed."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if dof < 1:
        raise ValueError(f"dof must be ≥ 1, got {dof}")
    if dof == 1:
        return math.tan(math.pi * (p - 0.5))
    if dof == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = statistics.NormalDist().inv_cdf(p)
    n = float(dof)
    return (z + (z ** 3 + z) / (4 * n)
            + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * n ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * n ** 3)
            + (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z)
            / (92160 * n ** 4))


def _flat(x):
    return x.get_flat_representation() if isinstance(x, PVector) else x


def _generator(generator, device):
    """A ``torch.Generator``: the one given, a new one seeded with an int, or None (global)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator(device=device).manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got "
                    f"{type(generator).__name__}")


def _mean_stderr(samples):
    """Mean over the first axis and its standard error ``std / √m`` (``m - 1`` in the std)."""
    m = samples.shape[0]
    return samples.mean(dim=0), samples.std(dim=0, correction=1) / math.sqrt(m)


def trace_estimate(M, n_matvecs, method="hutchinson", distribution="rademacher", generator=None,
                   batch_size=None, verbose=False):
    """Estimate ``tr(M)`` from ``n_matvecs`` products with ``M``.

    Args:
        M: a parameter-space matrix (any ``PMat*``, e.g. ``PMatImplicit`` of a Fisher, GGN or
            Hessian, or any object with ``mv`` and a ``layer_collection``); symmetric.
        n_matvecs: the budget of products ``m`` (``hutchinson``: m ≥ 2; ``hutchpp``: m ≥ 4;
            ``xtrace``: m ≥ 4, and an odd m leaves one product unused).
        method: ``'hutchinson'``, ``'hutchpp'`` or ``'xtrace'`` (module docstring: formulas).
        distribution: of the probe entries, ``'rademacher'`` (±1, lower variance) or ``'normal'``.
        generator: a ``torch.Generator`` or an int seed for the probes (None: torch's global RNG).
        batch_size: at most this many vectors per product call (default: all the probes of a
            stage in one call, i.e. one batched ``mmap``: one pass over the data for
            ``PMatImplicit``). Hutchinson only needs the quadratic forms ``ωᵀ M ω``: it calls
            ``mapTMmap`` (for ``PMatImplicit``: JVPs only, no backward pass).
        verbose: show a progress bar over the products.

    Returns an [`Estimate`][nngeometry.estimators.Estimate] with a 0-dim ``value`` and ``stderr``.
    """
    op = Operator(M, batch_size=batch_size, verbose=verbose, total=n_matvecs,
                  desc="trace estimate")
    gen = _generator(generator, op.device)
    if method == "hutchinson":
        check_count("n_matvecs", n_matvecs, 2, "the standard error needs two samples")
        W = random_probes(n_matvecs, op.P, distribution, op.dtype, op.device, gen)
        samples = op.quadratic_forms(W)  # ωᵀMω only: PMatImplicit needs no backward pass
        value, stderr = _mean_stderr(samples)
    elif method == "hutchpp":
        check_count("n_matvecs", n_matvecs, 4, "Hutch++ uses m//3 products for its sketch, as many "
                    "to project it, and the rest (at least 2) for the residual")
        k = n_matvecs // 3
        S = random_probes(k, op.P, distribution, op.dtype, op.device, gen)
        G = random_probes(n_matvecs - 2 * k, op.P, distribution, op.dtype, op.device, gen)
        Q = torch.linalg.qr(op.matmat(S).T).Q  # (P, min(k, P)), orthonormal columns
        kq = Q.shape[1]
        G = G - (G @ Q) @ Q.T  # residual probes (I - QQᵀ) g
        out = op.matmat(torch.cat([Q.T, G], dim=0))  # one batch: M Q and M (I - QQᵀ) g
        exact_part = (Q.T * out[:kq]).sum()
        samples = (G * out[kq:]).sum(dim=1)
        mean, stderr = _mean_stderr(samples)
        value = exact_part + mean
    elif method == "xtrace":
        check_count("n_matvecs", n_matvecs, 4, "XTrace uses m//2 probes (at least 2) and as many "
                    "products to project them")
        parts = _exchangeable(op, n_matvecs // 2, distribution, gen)
        samples = parts.trace_samples()
        value, stderr = _mean_stderr(samples)
    else:
        raise ValueError(f"unknown method '{method}': use 'hutchinson', 'hutchpp' or 'xtrace'")
    op.close()
    return Estimate(value=value, stderr=stderr, n_matvecs=op.n_matvecs, method=method,
                    samples=samples)


def diag_estimate(M, n_matvecs, method="hutchinson", distribution="rademacher", generator=None,
                  batch_size=None, verbose=False):
    """Estimate ``diag(M)`` from ``n_matvecs`` products with ``M``.

    Args: as [`trace_estimate`][nngeometry.estimators.trace_estimate] (``verbose``: a
    progress bar over the products); ``method`` is ``'hutchinson'`` (``mean(ω ⊙ M ω)``, m ≥ 2) or
    ``'xdiag'`` (exchangeable, exact when ``rank(M) < m/2``, m ≥ 4).

    Returns an [`Estimate`][nngeometry.estimators.Estimate] whose ``value`` and ``stderr`` are PVectors (elementwise
    standard errors).
    """
    op = Operator(M, batch_size=batch_size, verbose=verbose, total=n_matvecs,
                  desc="diagonal estimate")
    gen = _generator(generator, op.device)
    if method == "hutchinson":
        check_count("n_matvecs", n_matvecs, 2, "the standard error needs two samples")
        W = random_probes(n_matvecs, op.P, distribution, op.dtype, op.device, gen)
        samples = W * op.matmat(W)
    elif method == "xdiag":
        check_count("n_matvecs", n_matvecs, 4, "XDiag uses m//2 probes (at least 2) and as many "
                    "products to project them")
        samples = _exchangeable(op, n_matvecs // 2, distribution, gen).diag_samples()
    else:
        raise ValueError(f"unknown method '{method}': use 'hutchinson' or 'xdiag'")
    value, stderr = _mean_stderr(samples)
    op.close()
    return Estimate(value=op.pvector(value), stderr=op.pvector(stderr), n_matvecs=op.n_matvecs,
                    method=method, samples=samples)


class _exchangeable:
    """The shared part of XTrace and XDiag (module docstring): with ``s`` probes ``Ω`` (rows),
    ``Y = M Ω``, an orthonormal basis ``U`` of its range with ``Rc = Uᵀ Y``, ``Z = M U``,
    ``H = Uᵀ Z`` and the leave-one-out directions ``σ_i`` (columns of ``Sg``)."""

    def __init__(self, op, s, distribution, gen):
        self.Om = random_probes(s, op.P, distribution, op.dtype, op.device, gen).T  # (P, s)
        self.Y = op.matmat(self.Om.T).T  # (P, s)
        Q0, R0 = torch.linalg.qr(self.Y)
        # the SVD of the small R gives a rank-revealing basis U = Q0 Ur of range(Y)
        Ur, sv, Vt = torch.linalg.svd(R0)
        eps = torch.finfo(self.Y.dtype).eps
        rank = int((sv > sv.max() * eps * max(op.P, s) * 10).sum()) if sv.numel() else 0
        if rank == s:
            self.U = Q0 @ Ur
            self.Rc = sv.unsqueeze(1) * Vt  # Uᵀ Y
            Sg = Vt / sv.unsqueeze(1)  # Σ⁻¹ Vᵀ: column i is orthogonal to Rc e_j, j ≠ i
            self.Sg = Sg / torch.linalg.vector_norm(Sg, dim=0, keepdim=True)
        else:
            # rank(Y) < s: every s - 1 columns of Y already span range(Y) (the probes are in
            # general position), so Π_i is the projector on range(Y) for every i
            self.U = Q0 @ Ur[:, :rank]
            self.Rc = (sv[:rank].unsqueeze(1) * Vt[:rank])
            self.Sg = torch.zeros(rank, s, dtype=self.Y.dtype, device=self.Y.device)
        self.Z = op.matmat(self.U.T).T  # (P, r)
        H = self.U.T @ self.Z
        self.H = (H + H.T) / 2

    def trace_samples(self):
        U, Z, H, Sg, Om, Y, Rc = self.U, self.Z, self.H, self.Sg, self.Om, self.Y, self.Rc
        W = U.T @ Om  # (r, s)
        C = W - Sg * (Sg * W).sum(0)  # c_i = w_i - σ_i σ_iᵀ w_i
        # t_i = tr(H) - σ_iᵀHσ_i + ω_iᵀy_i - (Zᵀω_i)ᵀc_i - c_iᵀRc e_i + c_iᵀHc_i
        return (torch.trace(H) - (Sg * (H @ Sg)).sum(0) + (Om * Y).sum(0)
                - ((Z.T @ Om) * C).sum(0) - (C * Rc).sum(0) + (C * (H @ C)).sum(0))

    def diag_samples(self):
        U, Z, Sg, Om, Y, Rc = self.U, self.Z, self.Sg, self.Om, self.Y, self.Rc
        base = (U * Z).sum(1)  # diag(UUᵀM)
        D = Rc - Sg * (Sg * Rc).sum(0)  # (I - Π_i) y_i = y_i - U d_i
        T = base.unsqueeze(1) - (U @ Sg) * (Z @ Sg) + Om * (Y - U @ D)
        return T.T  # (s, P)
