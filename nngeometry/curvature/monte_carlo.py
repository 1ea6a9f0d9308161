"""Monte-Carlo output transforms of the Fisher information.

``g(x)`` of shape ``(n, T)`` with ``g_t = log p(y_t | x) / sqrt(T)``, ``y_t ~ p(· | x)`` drawn
and held constant for the backward pass, so that
``J_gᵀ J_g = (1/T) Σ_t ∇ log p(y_t|x) ∇ log p(y_t|x)ᵀ``, an unbiased estimate of the
example's Fisher information. Labels of the softmax likelihoods are drawn from PyTorch's
global RNG or, with a seed, by the Gumbel-max rule on counter-based uniforms (`rng`);
Gaussian targets of ``regression`` (variance ``σ²``) by ``torch.randn`` or Box-Muller.
"""
import math

import torch
import torch.nn.functional as F

from ..backend.model_and_data import all_finite, check_finite
from .language_models import _SoftmaxLayout
from .positions import (_as_2d, _position_scale, check_class_dim, check_positions,
                        class_positions, output_class_dim)
from .rng import counter_uniform
from .transform import OutputTransform, _origin_extras, _resolve_positions

MC_VARIANTS = ("classif_logits", "classif_logsoftmax", "segmentation_logits", "regression")


def monte_carlo_function(function, variant, trials, covariance=1.0, positions="sum",
                         seed=None, class_dim=None, lm=None):
    """``g(*batch)`` of shape ``(n, trials)`` with ``g_t = log p(y_t | x) / sqrt(trials)`` and
    ``y_t ~ p(· | x)`` sampled (constant for the backward pass), so that
    ``J_gᵀ J_g = (1/T) Σ_t ∇ log p(y_t|x) ∇ log p(y_t|x)ᵀ``.

    Outputs with positions (``(n, T, C)``: classes last; ``(n, C, H, W)``: classes along
    dimension 1, see `class_positions`): one label is drawn per position and the
    log-probabilities are summed over positions (``positions='sum'``), or averaged
    (``'mean'``: ``g`` scaled by ``1/sqrt(S)``, so the matrix is the sum's divided by ``S``).

    Without ``seed`` the labels are drawn from PyTorch's global RNG (of the outputs' device):
    ``torch.multinomial`` (``Exponential`` draws for one trial; for one trial of 1024 classes
    or more, the inverse CDF of one ``torch.rand`` per row) for the classification
    variants, ``torch.randn`` for ``regression``; seed it with ``torch.manual_seed`` for
    reproducible matrices. With ``seed`` (an int) no RNG state is used: the draws are a fixed
    function of the seed, the batch's index in the loader and its content (`batch_key`,
    `counter_uniform`; labels by the Gumbel-max rule, Gaussians by Box-Muller), so that
    every pass over the same loader sees the same targets: ``PMatImplicit`` is then one fixed
    matrix (CG, Lanczos and Hutchinson need that); the uniform numbers behind the draws are
    the same on every device (the labels then agree up to floating-point ties).

    The transform also gives the generator each chunk of columns ``g[:, k0:k1]`` as its own
    small graph (``OutputTransform.split``): the backward pass of ``K`` directions then works on
    ``(K, n, K)`` tensors, not on the ``(K, n, trials)`` one-hot cotangents of the whole output,
    whose memory and time grow as ``trials² · n``."""
    if positions is not None or class_dim is not None:  # the defaults need no check
        check_positions(positions)
        check_class_dim(class_dim)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int (or None for PyTorch's global RNG), got "
                        f"{type(seed).__name__}")
    g = _monte_carlo(function, variant, trials, covariance, _resolve_positions(positions, lm),
                     seed, class_dim, lm)
    extra = (f", covariance={covariance!r}" if covariance != 1.0 else "") + \
        _origin_extras(positions, class_dim, lm) + \
        (f", seed={seed!r}" if seed is not None else "")
    g.origin = (f"nngeometry.curvature.monte_carlo_function(function, {variant!r}, {trials!r}"
                f"{extra})")
    return g


#: memory of one block of rows of the inverse CDF's float64 cumulative sums
_CDF_BLOCK_BYTES = 16 * 2 ** 20

#: from this many classes the one-trial sampler draws by the inverse CDF
_INVERSE_CDF_CLASSES = 1024


def _monte_carlo(function, variant, trials, covariance, positions="sum", seed=None,
                 class_dim=None, conv=None):
    if not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")
    check_covariance(covariance)
    scale = trials ** -0.5

    def draw_labels(logp, from_softmax, key):
        # logp: (m, C) normalized log-probabilities -> labels (m, T)
        probs = logp.detach().exp()
        # checked here because sampling comes before the generator's check of the outputs;
        # torch.multinomial needs finite rows before it runs (a device-side assert on CUDA),
        # the other draws only need the error before the matrix is used (deferred on
        # accelerators: no host synchronisation per batch)
        msg = ("the model's outputs contain NaN or Inf; check the inputs (NaN/Inf in the data?) "
               "and the model's parameters")
        if key is None and not (trials == 1 and from_softmax):
            if not all_finite(probs):
                raise ValueError(msg)
        else:
            check_finite(probs, msg)
        if key is not None:
            # Gumbel-max: argmax_c (log p_c + G_c), G_c = -log(-log u_c), is a draw from p
            m, C = logp.shape
            u = counter_uniform(key, (m, trials, C), logp.dtype, logp.device)
            return (logp.detach().unsqueeze(1) - torch.log(-torch.log(u))).argmax(2)
        if trials == 1 and from_softmax and logp.shape[1] >= _INVERSE_CDF_CLASSES:
            # many classes (a vocabulary): the inverse CDF, one uniform per row and a binary
            # search in the cumulative sums (in float64), instead of one exponential per class
            # (which costs more than the model's forward for a 50k vocabulary)
            # by blocks of rows: the float64 sums of a whole batch (n · T · V: 400 MB for 8
            # sequences of 128 tokens) would be the largest tensor of the pass
            m, C = probs.shape
            u = torch.rand(m, 1, dtype=torch.float64, device=probs.device)
            rows = max(1, _CDF_BLOCK_BYTES // (8 * C))
            labels = []
            for r0 in range(0, m, rows):
                cdf = torch.cumsum(probs[r0:r0 + rows].to(torch.float64), dim=1)
                ub = (u[r0:r0 + rows] * cdf[:, -1:]).clamp_(min=torch.finfo(torch.float64).tiny)
                labels.append(torch.searchsorted(cdf, ub).clamp_(max=C - 1))
            return labels[0] if len(labels) == 1 else torch.cat(labels)
        if trials == 1 and from_softmax:
            # one draw per row: argmax_c p_c / E_c with E_c ~ Exp(1) is a draw from p (the
            # smallest of independent Exp(p_c) times), and it is the computation torch.multinomial
            # itself runs for one sample (same generator use, so the same labels for a seed),
            # minus its checks of the rows (non-negative, finite, positive sum: true here, for
            # finite log-softmax outputs), which cost more than the draw on small batches
            E = torch.empty_like(probs).exponential_(1).clamp_(min=torch.finfo(probs.dtype).tiny)
            return torch.div(probs, E).argmax(1, keepdim=True)  # (E = 0: 0/0 a NaN max)
        return torch.multinomial(probs, trials, replacement=True)

    def sampled(logp, from_softmax, key, n=None, root_w=None):
        """``(g, columns)`` for normalized log-probabilities ``logp`` (m, C); with ``n``, the
        m = n · positions rows are summed per example (sequences, segmentation), weighted by
        ``root_w`` ``(n, positions)`` when given (the square roots of the positions' weights
        in the matrix)."""
        y = draw_labels(logp, from_softmax, key)
        pos_scale = 1.0 if n is None else _position_scale(logp.shape[0] // max(n, 1), positions)

        def columns(k0, k1):
            lp = torch.gather(logp, 1, y[:, k0:k1].contiguous())  # (5x faster backward)
            if n is not None and root_w is not None:
                return (lp.reshape(n, -1, k1 - k0) * root_w.unsqueeze(2)).sum(1) * scale
            if n is not None:
                return lp.reshape(n, -1, k1 - k0).sum(1) * (scale * pos_scale)
            # one trial: scale = 1, no multiplication (one op less forward and backward)
            return lp if trials == 1 else lp * scale
        return columns(0, trials), columns

    def key_of(info):
        return None if info is None else info.key

    def classif(out, info, log_softmax):
        lay = _SoftmaxLayout(out, info, function, class_dim, conv, positions)
        fp = lay.fp
        n, S, C = fp.shape
        logp = fp.reshape(n * S, C)
        if log_softmax:
            logp = F.log_softmax(logp, dim=1)
        root_w = lay.w.sqrt() if isinstance(lay.w, torch.Tensor) else None
        return sampled(logp, log_softmax and trials == 1, key_of(info), None if S == 1 and
                       out.dim() <= 2 else n, root_w)

    needs = seed is not None or conv is not None
    if variant == "classif_logits":
        return OutputTransform(function, split=lambda out, info=None: classif(out, info, True),
                               needs_batch=needs, seed=seed)
    if variant == "classif_logsoftmax":
        return OutputTransform(function, split=lambda out, info=None: classif(out, info, False),
                               needs_batch=needs, seed=seed)
    if variant == "segmentation_logits":
        def split(f, info=None):  # f: (n, C, *spatial)
            if f.dim() < 3:
                raise ValueError("variant 'segmentation_logits' expects outputs (n, C, H, W, ...)")
            n, C = f.shape[:2]
            logp = F.log_softmax(f, dim=1).movedim(1, -1).reshape(-1, C)  # (n*pixels, C)
            return sampled(logp, True, key_of(info), n)
        return OutputTransform(function, split=split, needs_batch=needs, seed=seed)
    if variant == "regression":
        sigma2 = float(covariance)

        def split(out, info=None):
            f = _as_2d(out)
            S = class_positions(out, output_class_dim(function, class_dim)).shape[1] \
                if out.dim() > 2 and positions == "mean" else 1
            pos_scale = _position_scale(S, positions)
            shape = (f.shape[0], trials, f.shape[1])
            key = key_of(info)
            if key is None:
                noise = torch.randn(*shape, dtype=f.dtype, device=f.device)
            else:  # Box-Muller from two counter-based uniforms
                u = counter_uniform(key, (2,) + shape, f.dtype, f.device)
                noise = torch.sqrt(-2 * torch.log(u[0])) * torch.cos(2 * math.pi * u[1])
            y = f.detach().unsqueeze(1) + (sigma2 ** 0.5) * noise

            def columns(k0, k1):
                return -((y[:, k0:k1] - f.unsqueeze(1)) ** 2).sum(2) / (2 * sigma2) * \
                    (scale * pos_scale)
            return columns(0, trials), columns
        return OutputTransform(function, split=split, needs_batch=needs, seed=seed)
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
