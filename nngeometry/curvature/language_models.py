"""The language-model conventions: which logits predict which label, and which positions count.

A causal language model's logits ``(n, T, V)`` at position ``t`` predict the label at
``t + 1`` (`is_causal_lm`, `LMConvention`); a position counts when its label is not
``ignore_index`` and its ``attention_mask`` entry is not 0. Under the convention example
``i``'s terms are weighted by ``w_{i,s} = 1 / N_i`` (``positions='mean'``, ``N_i`` its counted
positions: Hugging Face's per-sequence ``loss``) or 1 (``'sum'``), 0 where a position does not
count (`lm_positions`). `_SoftmaxLayout` gives the softmax likelihoods (closed form,
Monte-Carlo, GGN) the positions ``(n, S, C)`` and their weights with or without a convention.
"""
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .positions import _from_positions, class_positions, output_class_dim


def is_causal_lm(model):
    """Whether ``model`` is a causal language model whose own loss shifts the labels (logits at
    position ``t`` predict token ``t + 1``): Hugging Face's ``*ForCausalLM`` / ``*LMHeadModel``
    classes, or a model whose ``loss_type`` is ``'ForCausalLM'``."""
    if getattr(model, "loss_type", None) == "ForCausalLM":
        return True
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


class LMConvention:
    """How a language model's outputs ``(n, T, V)`` meet its batch, as its own loss reads them.

    * ``causal``: the logits at position ``t`` predict the label at ``t + 1`` (the last
      position predicts nothing); otherwise position ``t`` predicts label ``t``.
    * A position counts when its target's label is not ``ignore_index`` (-100) and its
      target's ``attention_mask`` entry is not 0 (padding); the labels are those of
      ``target_key`` (dict batches) or ``batch[1]``, the mask ``batch[0][mask_key]``.
      Without labels (the closed-form and Monte-Carlo Fisher need none) only the mask counts.
    * ``positions='mean'`` (the default under the convention) divides example ``i``'s terms by
      ``N_i``, its number of counted positions: its loss is the mean over its tokens, Hugging
      Face's ``loss`` on that sequence alone; ``'sum'`` sums them."""

    def __init__(self, causal, target_key="labels", mask_key="attention_mask",
                 ignore_index=-100):
        self.causal, self.target_key = bool(causal), target_key
        self.mask_key, self.ignore_index = mask_key, ignore_index

    def __repr__(self):
        return f"LMConvention(causal={self.causal}, target_key={self.target_key!r})"


def lm_convention(model, causal_lm=None, target_key="labels", function=None):
    """The `LMConvention` of ``model`` (None: no language-model convention).

    With a user ``function`` (the outputs are then the user's, e.g. logits already shifted)
    nothing is detected: only ``causal_lm=True`` / ``False`` applies a convention.

    ``causal_lm``: None detects it (`is_causal_lm`: a causal LM gets the convention with
    shifted labels, any other model none); True forces the causal convention, False the
    convention without the shift (position ``t`` with label ``t``, as a masked LM or a token
    classifier: padding and -100 excluded, ``positions='mean'`` by default)."""
    if causal_lm is not None and not isinstance(causal_lm, bool):
        raise TypeError(f"causal_lm must be True, False or None (detect), got {causal_lm!r}")
    if causal_lm is None:
        if function is None and is_causal_lm(model):
            return LMConvention(True, target_key)
        return None
    return LMConvention(causal_lm, target_key)


def _resolve_positions(positions, conv):
    """``positions`` as given, else the default: ``'mean'`` under a language-model convention
    ``conv`` (its loss averages over tokens), ``'sum'`` otherwise."""
    return positions if positions is not None else ("mean" if conv is not None else "sum")


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
