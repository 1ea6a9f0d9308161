"""The positions of a language model's outputs under its convention.

Under a `LMConvention` (see `transform`: how a causal language model's logits ``(n, T, V)``
meet its batch) the logits at position ``t`` predict the label at ``t + 1``; a position counts
when its label is not ``ignore_index`` and its ``attention_mask`` entry is not 0. Example
``i``'s terms are weighted by ``w_{i,s} = 1 / N_i`` (``positions='mean'``, ``N_i`` its counted
positions: Hugging Face's per-sequence ``loss``) or 1 (``'sum'``), 0 where a position does not
count (`lm_positions`). `_SoftmaxLayout` gives the softmax likelihoods (closed form,
Monte-Carlo, GGN) the positions ``(n, S, C)`` and their weights with or without a convention.
Nothing here runs for outputs without positions.
"""
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .positions import _from_positions, class_positions, output_class_dim


def _batch_parts(batch, conv):
    first = batch[0] if batch else None
    if isinstance(first, Mapping):
        return first.get(conv.target_key), first.get(conv.mask_key)
    return (batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None), None


def lm_positions(out, batch, conv, class_dim=-1, positions="mean"):
    """``(fp, y, w)`` for a language model's outputs ``out`` under ``conv``:

    * ``fp`` ``(n, S, V)``: the logits of the positions that predict something (``S = T - 1``
      for a causal LM);
    * ``y`` ``(n, S)``: their labels (``ignore_index`` where a position does not count), or
      None when the batch has none;
    * ``w`` ``(n, S)``: the weight of each position, 0 where it does not count, else 1
      (``positions='sum'``) or ``1 / N_i`` (``'mean'``, ``N_i`` the counted positions of
      example ``i``; an example with none has weights 0)."""
    fp = class_positions(out, class_dim)
    n, T, _ = fp.shape
    labels, mask = _batch_parts(batch, conv)
    for name, t in (("labels", labels), ("attention_mask", mask)):
        if t is not None and tuple(t.shape) != (n, T):
            raise ValueError(
                f"the language-model convention pairs logits {tuple(out.shape)} ((n, T, V)) with "
                f"{name} of shape (n, T) = ({n}, {T}), got {tuple(t.shape)}; pass causal_lm=False "
                "and a loss_function for another layout")
    if conv.causal:
        fp = fp[:, :-1]
        labels = None if labels is None else labels[:, 1:]
        mask = None if mask is None else mask[:, 1:]
    keep = torch.ones(fp.shape[:2], dtype=torch.bool, device=fp.device)
    if labels is not None:
        keep = keep & (labels != conv.ignore_index)
    if mask is not None:
        keep = keep & (mask != 0)
    w = keep.to(fp.dtype)
    if positions == "mean":
        w = w / keep.sum(1, keepdim=True).clamp(min=1).to(fp.dtype)
    y = None if labels is None else torch.where(keep, labels, conv.ignore_index)
    return fp, y, w


def _takes_full_outputs(loss_function):
    """Whether ``loss_function`` applies a language model's convention itself (it sets
    ``nngeometry_full_outputs = True``, e.g. [`nngeometry.influence.causal_lm_loss`][nngeometry.influence.causal_lm_loss],
    which shifts the labels): it then gets the full logits and labels, no convention."""
    return bool(getattr(loss_function, "nngeometry_full_outputs", False))


def _lm_active(conv, out):
    return conv is not None and out.dim() == 3


class _SoftmaxLayout:
    """The positions of a softmax output for one batch: ``view(t)`` ``(n, S, C)`` (the
    positions that count for the likelihood, the class axis last), ``unview(tp)`` back to the
    outputs' shape (zeros where a position was dropped), ``w`` the weight of each position
    (``(n, S)`` tensor, a float, or None for 1) and ``y`` the labels ``(n, S)`` when known."""

    def __init__(self, out, info, function, class_dim, conv, positions):
        self.shape = out.shape
        cd = output_class_dim(function, class_dim)
        self.lm = _lm_active(conv, out)
        if self.lm:
            self.cd = -1 if cd is None else cd
            batch = info.batch if info is not None else ()
            fp, self.y, self.w = lm_positions(out, batch, conv, self.cd, positions)
            self.causal = conv.causal
        else:
            self.cd, self.y, self.causal = cd, None, False
            fp = class_positions(out, cd)
            S = fp.shape[1]
            self.w = 1.0 / S if positions == "mean" and S > 1 else None
        self.fp = fp

    def view(self, t):
        tp = class_positions(t, self.cd)
        return tp[:, :-1] if self.causal else tp

    def unview(self, tp):
        if self.causal:
            tp = F.pad(tp, (0, 0, 0, 1))
        return _from_positions(tp, self.shape, self.cd)

    def weighted(self, tp, power=1.0):
        """``tp`` ``(n, S, ...)`` times ``w ** power`` per position."""
        if self.w is None:
            return tp
        if isinstance(self.w, float):
            return tp * self.w ** power
        w = self.w if power == 1.0 else self.w.sqrt()
        return tp * w.reshape(w.shape + (1,) * (tp.dim() - 2))
