"""Closed-form output transforms of the Fisher information: ``g(x)`` with
``J_g(x)ᵀ J_g(x)`` equal to the example's Fisher information. The Jacobian generator then
computes ``(1/n) Σ_x J_g(x)ᵀ J_g(x)``.

Closed forms (``F = (1/n) Σ_x J_f(x)ᵀ Σ_{y|x} J_f(x)``, ``f`` the model's outputs):

* ``regression``: ``Σ = I``: ``g = f``.
* ``classif_binary_logits``: Bernoulli on one logit, ``Σ = σ(f)(1 - σ(f))``: ``g = sqrt(Σ) f``.
* ``classif_logits``: ``Σ = diag(p) - p pᵀ``, ``p = softmax(f)``. ``Σ`` has rank ``C - 1``; with
  ``L`` its ``C × (C-1)`` Cholesky-type factor (``L Lᵀ = Σ``), ``g = Lᵀ f``: ``C - 1`` outputs,
  one backward direction fewer than the naive ``C``; its output metric ``Σ u = p ⊙ u − p (pᵀu)``
  (`softmax_metric`) serves the implicit products.

The factors are computed from detached probabilities: they are constants of the backward pass.
"""
import torch

from .language_models import _SoftmaxLayout
from .positions import (_as_2d, _position_scale, check_class_dim, check_positions,
                        class_positions, output_class_dim)
from .transform import OutputTransform, _origin_extras, _resolve_positions

CLOSED_FORM_VARIANTS = ("classif_logits", "classif_binary_logits", "regression")


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


def closed_form_function(function, variant, positions="sum", class_dim=None, lm=None):
    """``g(*batch)`` with ``J_gᵀ J_g`` the example's Fisher under ``variant``.

    Outputs with positions (more than 2 dimensions, the class axis ``class_dim``, see
    `class_positions`): the likelihood factorises over positions, the Fisher is the sum of
    the per-position terms (``positions='sum'``) or their mean (``'mean'``, for losses averaged
    over tokens). ``lm``: a `LMConvention` (language models ``(n, T, V)``: shifted
    positions for a causal LM, padding excluded, ``positions=None`` meaning ``'mean'`` over the
    counted positions, see `lm_positions`).

    ``classif_logits`` also has the closed-form output metric `OutputTransform.metric`:
    ``H u = p ⊙ u − p (pᵀu)`` per position, which the implicit products use instead of the
    ``C × (C − 1)`` square roots (``O(n·S·C)`` memory)."""
    if positions is not None or class_dim is not None:  # the defaults need no check
        check_positions(positions)
        check_class_dim(class_dim)
    g = _closed_form(function, variant, _resolve_positions(positions, lm), class_dim, lm)
    # named in the error of an unpickled PMatImplicit, which needs this function again
    g.origin = (f"nngeometry.curvature.closed_form_function(function, {variant!r}"
                + _origin_extras(positions, class_dim, lm) + ")")
    return g


def _softmax_root_g(fp, weights_sqrt_fn=None):
    n, S, C = fp.shape
    if C < 2:
        raise ValueError("variant 'classif_logits' needs at least 2 logits per example "
                         "(per position); use 'classif_binary_logits' for one logit")
    fl = fp.reshape(n * S, C)
    L = multinomial_covariance_sqrt(torch.softmax(fl.detach(), dim=1)).reshape(n, S, C, C - 1)
    if weights_sqrt_fn is not None:
        L = weights_sqrt_fn(L)
    return torch.einsum("nsc,nsck->nsk", fp, L).reshape(n, S * (C - 1))


def softmax_metric(fp, up):
    """``H u = p ⊙ u − p (pᵀu)`` per position (``p = softmax(fp)``, classes last): the
    multinomial covariance applied to ``up`` in ``O(C)`` per position."""
    p = torch.softmax(fp.detach(), dim=-1)
    pu = p * up
    return pu - p * pu.sum(-1, keepdim=True)


def _closed_form(function, variant, positions="sum", class_dim=None, conv=None):
    if variant == "regression":
        def g(out):
            # Σ = I: every entry is its own unit-variance Gaussian, the positions are summed
            f = _as_2d(out)
            if positions != "mean" or out.dim() <= 2:
                return f
            S = class_positions(out, output_class_dim(function, class_dim)).shape[1]
            return f * _position_scale(S, positions)
        return OutputTransform(function, g)
    if variant == "classif_binary_logits":
        def g(out):
            if out.dim() <= 2:
                f = _as_2d(out)
                if f.shape[1] != 1:
                    raise ValueError(
                        f"variant 'classif_binary_logits' expects one logit per example, the "
                        f"model gives {f.shape[1]}; use 'classif_logits' for several classes")
                S = 1
            else:
                fp = class_positions(out, output_class_dim(function, class_dim))
                if fp.shape[2] != 1:
                    raise ValueError(
                        f"variant 'classif_binary_logits' expects one logit per position, "
                        f"outputs of shape {tuple(out.shape)} have {fp.shape[2]} along the "
                        "class axis class_dim; use 'classif_logits' for several classes")
                f, S = _as_2d(out), fp.shape[1]
            s = torch.sigmoid(f.detach())
            return torch.sqrt(s * (1 - s)) * f * _position_scale(S, positions)
        return OutputTransform(function, g)
    if variant == "classif_logits":
        needs = conv is not None

        def layout(out, info):
            return _SoftmaxLayout(out, info, function, class_dim, conv, positions)

        def g(out, info=None):
            if out.dim() <= 2:
                # one position per example, of weight 1 (a language model's convention reads
                # outputs (n, T, V)): the outputs are the softmax's logits as they are
                return _softmax_root_g(out.reshape(out.shape[0], 1, -1))
            lay = layout(out, info)  # one softmax per counted position
            return _softmax_root_g(lay.fp, lambda L: lay.weighted(L, 0.5))

        def metric(out, u, info=None):
            if out.dim() <= 2:  # one position per example, of weight 1 (see g)
                n = out.shape[0]
                hu = softmax_metric(out.reshape(n, 1, -1), u.reshape(n, 1, -1))
                return hu.reshape(out.shape)
            lay = layout(out, info)
            return lay.unview(lay.weighted(softmax_metric(lay.fp, lay.view(u))))
        return OutputTransform(function, g, needs_batch=needs, metric=metric)
    raise ValueError(f"unknown variant '{variant}' for FIM; expected one of {CLOSED_FORM_VARIANTS}")
