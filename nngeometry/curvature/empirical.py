"""The empirical Fisher's output transform: each example's loss of its observed target.

``g(x_i) = ℓ_i`` (shape ``(n, 1)``), so that ``J_gᵀ J_g = ∇θℓ_i ∇θℓ_iᵀ`` and the generator's
``(1/n) Σ_i J_gᵀ J_g`` is the empirical Fisher ``(1/n) Σ_i ∇θℓ_i ∇θℓ_iᵀ``.
"""
import torch

from .language_models import _lm_active, _takes_full_outputs, lm_positions
from .losses import loss_or_default, known_loss, per_example_losses, targets_of
from .positions import check_class_dim, check_positions, output_class_dim
from .transform import OutputTransform, _origin_extras, _resolve_positions


def empirical_function(function, loss_function=None, positions="sum", target_key="labels",
                       class_dim=None, lm=None):
    """``g(*batch)`` of shape ``(n, 1)``: the per-example loss ``ℓ_i`` of the observed target,
    so that ``J_gᵀ J_g = ∇θℓ_i ∇θℓ_iᵀ``, the empirical Fisher's term of example ``i``.

    ``loss_function(outputs, *targets) -> (n,)`` (or ``(n, ...)``, reduced over positions by
    ``positions``); default `cross_entropy_losses` (classes along ``class_dim``).
    ``targets``: see `targets_of`.

    ``lm`` (a `LMConvention`), for outputs ``(n, T, V)``: the loss is called on the
    positions that predict something and their labels (`lm_positions`: ``(n, S, V)``
    logits, ``(n, S)`` labels, -100 where a position does not count: a -100 label or padding),
    a per-position result ``(n, S)`` weighted by the positions' weights: summed over the
    counted positions (``positions='sum'``) or averaged over them (``'mean'``, the default:
    Hugging Face's ``loss`` of the sequence alone). ``nn.CrossEntropyLoss`` gets its classes
    along dimension 1 (the logits transposed)."""
    if positions is not None or class_dim is not None:  # the defaults need no check
        check_positions(positions)
        check_class_dim(class_dim)
    lm = None if _takes_full_outputs(loss_function) else lm
    positions = _resolve_positions(positions, lm)
    loss = loss_or_default(loss_function, lambda: output_class_dim(function, class_dim))
    known = known_loss(loss_function) if isinstance(loss_function, (str, torch.nn.Module)) \
        else None

    def g(out, info):
        if _lm_active(lm, out):
            cd = output_class_dim(function, class_dim)
            fp, y, w = lm_positions(out, info.batch, lm, -1 if cd is None else cd, positions)
            if y is None:
                raise ValueError(
                    f"the empirical Fisher needs the observed targets: the batch has no "
                    f"{lm.target_key!r} (dict batches) or targets (batch[1])")
            if known is not None and known.kind == "softmax" and known.classes == 1:
                losses = loss(fp.transpose(1, 2), y)
            elif known is not None and known.kind != "softmax":
                raise ValueError(f"{known.name} is not a loss of a language model's logits; "
                                 "pass causal_lm=False for other outputs")
            else:
                losses = loss(fp, y)
            if losses.dim() == 2 and tuple(losses.shape) == tuple(w.shape):
                return (losses * w).sum(1, keepdim=True)
            return per_example_losses(losses, out.shape[0], positions).unsqueeze(1)
        targets = targets_of(info.batch, target_key, "the empirical Fisher")
        losses = per_example_losses(loss(out, *targets), out.shape[0], positions)
        return losses.unsqueeze(1)
    t = OutputTransform(function, g, needs_batch=True)
    t.origin = ("nngeometry.curvature.empirical_function(function, loss_function"
                + _origin_extras(positions, class_dim, lm) + ")")
    return t
