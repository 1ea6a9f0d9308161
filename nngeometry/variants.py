"""Output transforms that turn a model's outputs into functions ``g(x)`` with
``J_g(x)ᵀ J_g(x)`` equal to the example's Fisher information (closed form), or to a Monte-Carlo
sample of it. The Jacobian generator then computes ``(1/n) Σ_x J_g(x)ᵀ J_g(x)``.

Closed forms (``F = (1/n) Σ_x J_f(x)ᵀ Σ_{y|x} J_f(x)``, ``f`` the model's outputs):

* ``regression``: ``Σ = I``: ``g = f``.
* ``classif_binary_logits``: Bernoulli on one logit, ``Σ = σ(f)(1 - σ(f))``: ``g = sqrt(Σ) f``.
* ``classif_logits``: ``Σ = diag(p) - p pᵀ``, ``p = softmax(f)``. ``Σ`` has rank ``C - 1``; with
  ``L`` its ``C × (C-1)`` Cholesky-type factor (``L Lᵀ = Σ``), ``g = Lᵀ f``: ``C - 1`` outputs, one
  backward direction fewer than the naive ``C``.

The factors are computed from detached probabilities: they are constants of the backward pass.
"""
import math

import torch
import torch.nn.functional as F

from .backend.batches import all_finite, check_outputs

CLOSED_FORM_VARIANTS = ("classif_logits", "classif_binary_logits", "regression")
MC_VARIANTS = ("classif_logits", "classif_logsoftmax", "segmentation_logits", "regression")


def multinomial_covariance_sqrt(p):
    """``L`` of shape ``(n, C, C-1)`` with ``L Lᵀ = diag(p) - p pᵀ`` for each row of ``p``.

    Column ``j`` (0-based) is the ``j``-th step of a Cholesky factorization of the multinomial
    covariance: with ``r_j = Σ_{i≥j} p_i`` (tail mass),
    ``L[j, j] = sqrt(p_j r_{j+1} / r_j)`` and ``L[i, j] = -p_i sqrt(p_j / (r_j r_{j+1}))`` for
    ``i > j``, zero above the diagonal.
    """
    n, C = p.shape
    r = torch.flip(torch.cumsum(torch.flip(p, [1]), 1), [1])  # r[:, j] = sum_{i>=j} p_i
    r = r.clamp(min=0)
    r_j = r[:, :-1]                       # (n, C-1)
    r_next = r[:, 1:]                     # (n, C-1)
    p_j = p[:, :-1]
    tiny = torch.finfo(p.dtype).tiny
    diag = torch.sqrt(p_j * r_next / r_j.clamp(min=tiny))
    # -p_i sqrt(p_j / (r_j r_{j+1})) written so that r_{j+1} = 0 (then all p_i, i>j, are 0) is 0
    coef = torch.sqrt(p_j / r_j.clamp(min=tiny)) / torch.sqrt(r_next.clamp(min=tiny))
    rows = torch.arange(C, device=p.device).unsqueeze(1)
    cols = torch.arange(C - 1, device=p.device).unsqueeze(0)
    below = (rows > cols).to(p.dtype)     # (C, C-1)
    on = (rows == cols).to(p.dtype)
    L = -p.unsqueeze(2) * coef.unsqueeze(1) * below + diag.unsqueeze(1) * on
    return L


def _as_2d(out):
    return out.reshape(out.shape[0], -1)


class OutputTransform:
    """``g(*batch) = transform(function(*batch))``: a likelihood's transform of the model's
    outputs. The generator calls the two parts itself, so that it can check that
    ``function`` (the model, deterministic) gives the same outputs twice while ``transform``
    (e.g. Monte-Carlo sampling) may draw random numbers.

    Give either ``transform(f) -> g`` or ``split(f) -> (g, columns)``, where ``columns(k0, k1)``
    recomputes ``g[:, k0:k1]`` from the same draws through a graph of its own (see
    :func:`monte_carlo_function`)."""

    #: how the transform was made (e.g. ``closed_form_function(function, 'classif_logits')``)
    origin = None

    def __init__(self, function, transform=None, split=None):
        if (transform is None) == (split is None):
            raise TypeError("give either transform or split")
        self.function = function
        self._transform = transform
        self._split = split

    def model_outputs(self, *batch):
        """The model's outputs ``function(*batch)``, checked to be a tensor."""
        return check_outputs(self.function(*batch))

    def transform(self, f):
        """``g`` from the model's outputs ``f``."""
        return self._transform(f) if self._split is None else self._split(f)[0]

    def split(self, f):
        """``(g, columns)`` with ``columns(k0, k1)`` the graph of ``g[:, k0:k1]``, or
        ``(g, None)``."""
        if self._split is None:
            return self._transform(f), None
        return self._split(f)

    def __call__(self, *batch):
        return self.transform(self.model_outputs(*batch))


def closed_form_function(function, variant):
    """``g(*batch)`` with ``J_gᵀ J_g`` the example's Fisher under ``variant``."""
    g = _closed_form(function, variant)
    # named in the error of an unpickled PMatImplicit, which needs this function again
    g.origin = f"nngeometry.variants.closed_form_function(function, {variant!r})"
    return g


def _closed_form(function, variant):
    if variant == "regression":
        return OutputTransform(function, _as_2d)
    if variant == "classif_binary_logits":
        def g(out):
            f = _as_2d(out)
            if f.shape[1] != 1:
                raise ValueError(
                    f"variant 'classif_binary_logits' expects one logit per example, the model "
                    f"gives {f.shape[1]}; use 'classif_logits' for several classes")
            s = torch.sigmoid(f.detach())
            return torch.sqrt(s * (1 - s)) * f
        return OutputTransform(function, g)
    if variant == "classif_logits":
        def g(out):
            f = _as_2d(out)
            if f.shape[1] < 2:
                raise ValueError("variant 'classif_logits' needs at least 2 logits per example; "
                                 "use 'classif_binary_logits' for one logit")
            L = multinomial_covariance_sqrt(torch.softmax(f.detach(), dim=1))
            return torch.einsum("nc,nck->nk", f, L)
        return OutputTransform(function, g)
    raise ValueError(f"unknown variant '{variant}' for FIM; expected one of {CLOSED_FORM_VARIANTS}")


def monte_carlo_function(function, variant, trials, covariance=1.0):
    """``g(*batch)`` of shape ``(n, trials)`` with ``g_t = log p(y_t | x) / sqrt(trials)`` and
    ``y_t ~ p(· | x)`` sampled (constant for the backward pass), so that
    ``J_gᵀ J_g = (1/T) Σ_t ∇ log p(y_t|x) ∇ log p(y_t|x)ᵀ``.

    The labels are drawn from PyTorch's global RNG (of the outputs' device): ``torch.multinomial``
    (``Exponential`` draws for one trial) for the classification variants, ``torch.randn`` for
    ``regression``; seed it with ``torch.manual_seed`` for reproducible matrices.

    The transform also gives the generator each chunk of columns ``g[:, k0:k1]`` as its own
    small graph (``OutputTransform.split``): the backward pass of ``K`` directions then works on
    ``(K, n, K)`` tensors, not on the ``(K, n, trials)`` one-hot cotangents of the whole output,
    whose memory and time grow as ``trials² · n``."""
    g = _monte_carlo(function, variant, trials, covariance)
    g.origin = (f"nngeometry.variants.monte_carlo_function(function, {variant!r}, {trials!r}"
                + (f", covariance={covariance!r})" if covariance != 1.0 else ")"))
    return g


def _monte_carlo(function, variant, trials, covariance):
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    check_covariance(covariance)
    scale = trials ** -0.5

    def draw_labels(logp, from_softmax=False):
        # logp: (m, C) normalized log-probabilities -> labels (m, T)
        probs = logp.detach().exp()
        if not all_finite(probs):
            # checked here because sampling comes before the generator's check of the outputs
            raise ValueError(
                "the model's outputs contain NaN or Inf; check the inputs (NaN/Inf in the data?) "
                "and the model's parameters")
        if trials == 1 and from_softmax:
            # one draw per row: argmax_c p_c / E_c with E_c ~ Exp(1) is a draw from p (the
            # smallest of independent Exp(p_c) times), and it is the computation torch.multinomial
            # itself runs for one sample (same generator use, so the same labels for a seed),
            # minus its checks of the rows (non-negative, finite, positive sum: true here, for
            # finite log-softmax outputs), which cost more than the draw on small batches
            E = torch.empty_like(probs).exponential_(1).clamp_(min=torch.finfo(probs.dtype).tiny)
            return torch.div(probs, E).argmax(1, keepdim=True)  # (E = 0: 0/0 a NaN max)
        return torch.multinomial(probs, trials, replacement=True)

    def sampled(logp, from_softmax, n=None):
        """``(g, columns)`` for normalized log-probabilities ``logp`` (m, C); with ``n``, the
        m = n · pixels rows are summed per example (segmentation)."""
        y = draw_labels(logp, from_softmax)

        def columns(k0, k1):
            lp = torch.gather(logp, 1, y[:, k0:k1].contiguous())  # (5x faster backward)
            if n is not None:
                return lp.reshape(n, -1, k1 - k0).sum(1) * scale
            # one trial: scale = 1, no multiplication (one op less forward and backward)
            return lp if trials == 1 else lp * scale
        return columns(0, trials), columns

    if variant == "classif_logits":
        return OutputTransform(
            function, split=lambda out: sampled(F.log_softmax(_as_2d(out), dim=1), trials == 1))
    if variant == "classif_logsoftmax":
        return OutputTransform(function, split=lambda out: sampled(_as_2d(out), False))
    if variant == "segmentation_logits":
        def split(f):  # f: (n, C, *spatial)
            if f.dim() < 3:
                raise ValueError("variant 'segmentation_logits' expects outputs (n, C, H, W, ...)")
            n, C = f.shape[:2]
            logp = F.log_softmax(f, dim=1).movedim(1, -1).reshape(-1, C)  # (n*pixels, C)
            return sampled(logp, True, n)
        return OutputTransform(function, split=split)
    if variant == "regression":
        sigma2 = float(covariance)

        def split(out):
            f = _as_2d(out)
            y = f.detach().unsqueeze(1) + (sigma2 ** 0.5) * torch.randn(
                f.shape[0], trials, f.shape[1], dtype=f.dtype, device=f.device)

            def columns(k0, k1):
                return -((y[:, k0:k1] - f.unsqueeze(1)) ** 2).sum(2) / (2 * sigma2) * scale
            return columns(0, trials), columns
        return OutputTransform(function, split=split)
    raise ValueError(f"unknown variant '{variant}' for FIM_MonteCarlo; expected one of {MC_VARIANTS}")


def check_covariance(covariance):
    """``ValueError`` unless ``covariance`` (the variance ``σ²`` of the Gaussian of the
    ``regression`` variant) is a finite positive number."""
    try:
        value = float(covariance)
    except (TypeError, ValueError):
        raise TypeError(f"covariance must be a positive number (the variance σ² of the "
                        f"regression likelihood), got {type(covariance).__name__}") from None
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"covariance must be a finite positive number (the variance σ² of the "
                         f"regression likelihood N(f, σ²I)), got {covariance!r}")
