"""The generalized Gauss-Newton matrix's output transform.

``g(x_i) = S_iᵀ f_i`` with ``S_i S_iᵀ = H_i = ∇²_f ℓ_i``, the per-example loss's Hessian in
output space, ``S_i`` a constant of the backward pass: ``J_gᵀ J_g = J_fᵀ H_i J_f`` and the
generator's ``(1/n) Σ_i J_gᵀ J_g`` is the GGN. ``S_i`` comes from a closed form for the losses
of `known_loss` (the multinomial covariance's square root for the cross-entropy, ``sqrt(h)``
for elementwise losses) and from `psd_sqrt` of `output_hessians` for any other loss.
"""
import torch

from .._memory import check_fits
from .closed_form import _softmax_root_g, softmax_metric
from .language_models import _SoftmaxLayout, _lm_active, _takes_full_outputs, lm_positions
from .losses import LOSS_NAMES, known_loss, targets_of
from .output_hessians import output_hessians, psd_sqrt
from .positions import (_position_scale, check_class_dim, check_positions,
                        class_positions, output_class_dim)
from .transform import OutputTransform, _origin_extras, _resolve_positions


def _ggn_softmax_layout(known, out, targets, positions, function, class_dim, conv, info):
    """``(lay, kept)`` for a softmax loss: the `_SoftmaxLayout` of the outputs (the
    convention's under ``conv``) and the ``(n, S)`` 0/1 weights of the positions whose target
    is not ``ignore_index`` (None: all), or None where the closed form does not apply
    (probability targets: generic path)."""
    if _lm_active(conv, out):
        cd = output_class_dim(function, class_dim)
        lay = _SoftmaxLayout(out, info, function, -1 if cd is None else cd, conv, positions)
        return lay, None  # (the convention's weights exclude -100 and padding)
    y = targets[0] if targets else None
    if not isinstance(y, torch.Tensor) or y.is_floating_point():
        return None  # class probabilities: H = (Σ q)(diag p - ppᵀ), left to the generic path
    n = out.shape[0]
    if known.classes != "last" and out.dim() < 2:
        raise ValueError(f"{known.name} expects outputs (n, C) or (n, C, d1, ...), got "
                         f"shape {tuple(out.shape)}")
    cd = output_class_dim(function, class_dim) if known.classes == "last" else 1
    lay = _SoftmaxLayout(out, None, function, cd, None, positions)
    _, S, C = lay.fp.shape
    if y.numel() != n * S:
        raise ValueError(
            f"{known.name}: outputs of shape {tuple(out.shape)} have {n * S} positions of "
            f"{C} classes, the targets have shape {tuple(y.shape)} ({y.numel()} class "
            "indices); classes are " + ("along class_dim" if known.classes == "last" else
                                        "dimension 1, as for torch.nn.CrossEntropyLoss"))
    kept = None
    if known.ignore_index is not None:
        k = (y.reshape(n, S) != known.ignore_index)
        if not bool(k.all()):
            kept = k.to(out.dtype)
    return lay, kept


def _closed_form_ggn(known, out, targets, positions, function=None, class_dim=None, conv=None,
                     info=None):
    """``g`` (``(n, K)``) with ``J_gᵀ J_g = J_fᵀ H J_f`` from the closed form of ``known``, or
    None where it does not apply (probability targets of the cross-entropy: generic path)."""
    n = out.shape[0]
    if known.kind == "softmax":
        got = _ggn_softmax_layout(known, out, targets, positions, function, class_dim, conv,
                                  info)
        if got is None:
            return None
        lay, kept = got

        def roots(L):
            L = lay.weighted(L, 0.5)
            return L if kept is None else L * kept.reshape(kept.shape + (1, 1))
        return _softmax_root_g(lay.fp, roots)
    f = out
    h = known.curvature(f.detach(), targets)
    y = targets[0] if targets else None
    if isinstance(y, torch.Tensor) and torch.broadcast_shapes(f.shape, y.shape) != f.shape:
        raise ValueError(
            f"{known.name}: targets of shape {tuple(y.shape)} broadcast against outputs of "
            f"shape {tuple(f.shape)} to a larger shape: the loss would compare every output "
            "with every target. Give targets of the outputs' shape")
    if isinstance(h, torch.Tensor) and torch.broadcast_shapes(f.shape, h.shape) != f.shape:
        raise ValueError(f"{known.name}: the curvature of shape {tuple(h.shape)} does not "
                         f"broadcast to the outputs' shape {tuple(f.shape)}")
    D = f[0].numel() if n else f.shape[1:].numel()
    g = (f * torch.sqrt(h.clamp(min=0))).reshape(n, D)
    return g * _position_scale(D, positions) if positions == "mean" else g


def ggn_function(function, loss_function, positions="sum", target_key="labels",
                 class_dim=None, lm=None):
    """``g(*batch)`` of shape ``(n, D)`` (``D`` outputs per example) with
    ``J_gᵀ J_g = J_fᵀ H J_f``, ``H = ∇²_f ℓ`` the per-example loss's Hessian in output space:
    ``g = S_iᵀ f_i`` with ``S_i S_iᵀ = H_i`` (`psd_sqrt` of `output_hessians`),
    ``S_i`` a constant of the backward pass.

    The cross-entropy (``'cross_entropy'``, ``nn.CrossEntropyLoss``) has the closed-form output
    metric (`OutputTransform.metric`), used by the implicit products. ``lm`` (a
    `LMConvention`): the language model's positions and weights (`lm_positions`);
    a callable ``loss_function`` then gets the shifted logits ``(n, S, V)`` and labels
    ``(n, S)`` (-100 where a position does not count), a per-position result ``(n, S)``
    weighted by the positions' weights (generic output Hessians)."""
    if positions is not None or class_dim is not None:  # the defaults need no check
        check_positions(positions)
        check_class_dim(class_dim)
    lm = None if _takes_full_outputs(loss_function) else lm
    positions = _resolve_positions(positions, lm)
    known = known_loss(loss_function) if isinstance(loss_function, (str, torch.nn.Module)) \
        else None
    if known is None and (loss_function is None or not callable(loss_function)):
        raise TypeError("GGN needs loss_function(outputs, *targets) -> per-example losses (n,), "
                        "e.g. lambda out, y: F.cross_entropy(out, y, reduction='none'), a "
                        f"torch.nn loss module with reduction='none', or one of {LOSS_NAMES}")

    def lm_generic(out, info):
        """``(loss, targets)`` of a callable under the convention: the loss of the full
        outputs ``(m, T, V)`` given the convention's labels and weights ``(m, S)``, per
        example, so that its output Hessians are those of the model's own loss."""
        cd = output_class_dim(function, class_dim)
        cd = -1 if cd is None else cd
        _, y, w = lm_positions(out, info.batch, lm, cd, positions)
        if y is None:
            raise ValueError(f"the GGN needs the observed targets: the batch has no "
                             f"{lm.target_key!r} (dict batches) or targets (batch[1])")

        def loss(o, yy, ww):
            fp = class_positions(o, cd)
            fp = fp[:, :-1] if lm.causal else fp
            losses = loss_function(fp, yy)
            if losses.dim() == 2 and tuple(losses.shape) == tuple(ww.shape):
                return (losses * ww).sum(1)
            return losses
        return loss, (y, w)

    def g(out, info):
        if _lm_active(lm, out) and known is not None and known.kind != "softmax":
            raise ValueError(f"{known.name} is not a loss of a language model's logits; pass "
                             "causal_lm=False for other outputs")
        if _lm_active(lm, out) and known is None:
            generic_loss, targets = lm_generic(out, info)
            S = psd_sqrt(output_hessians(generic_loss, out, targets, positions))
            n = out.shape[0]
            return torch.einsum("nd,nde->ne", out.reshape(n, -1), S.to(out.dtype))
        targets = () if _lm_active(lm, out) else targets_of(info.batch, target_key, "the GGN")
        if known is not None:
            closed = _closed_form_ggn(known, out, targets, positions, function, class_dim, lm,
                                      info)
            if closed is not None:
                return closed
        n = out.shape[0]
        D = out[0].numel() if n else out.shape[1:].numel()
        need = n * D * D * out.element_size() * 3
        if need > 2 ** 26:  # (reading the memory available costs more than small Hessians)
            check_fits(need,
                       f"the per-example output Hessians of the loss ({n} × {D}² entries)",
                       "use fewer outputs per example, smaller batches, or FIM(variant=...) / "
                       "EmpiricalFisher for this model")
        generic_loss = loss_function if known is None else known.losses
        S = psd_sqrt(output_hessians(generic_loss, out, targets, positions))
        return torch.einsum("nd,nde->ne", out.reshape(n, D), S.to(out.dtype))

    def softmax_hu(out, u, info):
        """``H u`` by the closed form of a softmax loss (probability targets: generic)."""
        targets = () if _lm_active(lm, out) else targets_of(info.batch, target_key,
                                                           "the GGN")
        got = _ggn_softmax_layout(known, out, targets, positions, function, class_dim, lm,
                                  info)
        if got is None:  # probability targets: the generic output Hessians
            S = psd_sqrt(output_hessians(known.losses, out, targets, positions))
            n = out.shape[0]
            uf = u.reshape(n, -1)
            return torch.einsum("nde,ne->nd", S, torch.einsum("nde,nd->ne", S, uf))\
                .reshape(u.shape)
        lay, kept = got
        hu = lay.weighted(softmax_metric(lay.fp, lay.view(u)))
        if kept is not None:
            hu = hu * kept.unsqueeze(2)
        return lay.unview(hu)

    metric = softmax_hu if known is not None and known.kind == "softmax" else None
    t = OutputTransform(function, g, needs_batch=True, metric=metric)
    t.origin = ("nngeometry.curvature.ggn_function(function, loss_function"
                + _origin_extras(positions, class_dim, lm) + ")")
    return t
