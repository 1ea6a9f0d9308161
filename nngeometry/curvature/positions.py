"""The positions of a model's outputs and the class axis.

An output ``(n, C)`` has one position of ``C`` classes; an output with more dimensions has
``S`` positions, the classes along ``class_dim`` (``-1``: ``(n, T, C)``, sequences; ``1``:
``(n, C, H, W)``, PyTorch's ``cross_entropy`` layout), viewed as ``(n, S, C)`` by
`class_positions`. A likelihood that factorises over positions has a Fisher that is the sum of
the per-position terms (``positions='sum'``) or their mean (``'mean'``, for losses averaged
over tokens): an output transform ``g`` is then scaled by ``1/sqrt(S)`` (`_position_scale`),
so that ``gᵀg`` scales by ``1/S``.
"""


def _as_2d(out):
    return out.reshape(out.shape[0], -1)


POSITIONS = ("sum", "mean")


def check_positions(positions):
    """``ValueError`` unless ``positions`` is ``'sum'``, ``'mean'`` or None (the default: the
    language-model convention's ``'mean'``, ``'sum'`` otherwise)."""
    if positions is not None and positions not in POSITIONS:
        raise ValueError(f"positions must be 'sum' (the log-likelihood sums over the positions "
                         f"of an output (n, T, C) / (n, C, H, W)) or 'mean' (the "
                         f"per-position terms averaged, for losses that are means over tokens), "
                         f"got {positions!r}")


def check_class_dim(class_dim):
    """``TypeError`` unless ``class_dim`` is None or an int."""
    if class_dim is not None and (isinstance(class_dim, bool) or not isinstance(class_dim, int)):
        raise TypeError(f"class_dim must be an int (the axis of the outputs that holds the "
                        f"classes, e.g. -1 or 1) or None, got {type(class_dim).__name__}")


def _layout_error(out):
    shape = tuple(out.shape)
    return ValueError(
        f"outputs of shape {shape} have more than 2 dimensions: which axis holds the classes? "
        f"Pass class_dim=-1 for classes last, (n, T, C) (sequences, Hugging Face's (batch, "
        f"tokens, vocabulary)), or class_dim=1 for classes along dimension 1, (n, C, L) / "
        f"(n, C, H, W) (PyTorch's cross_entropy layout, segmentation). (Hugging Face outputs "
        f"with .logits are read with classes last.)")


def output_class_dim(function, class_dim=None):
    """The class axis of ``function``'s outputs: ``class_dim`` when given, else the one the
    function reports (the default function on a Hugging Face output reads ``.logits`` with
    classes last and sets ``function.output_class_dim = -1`` when it does), else None."""
    if class_dim is not None:
        return class_dim
    return getattr(function, "output_class_dim", None)


def class_positions(out, class_dim=None):
    """The outputs ``out`` as ``(n, S, C)``: ``S`` positions of ``C`` classes each.

    * ``(n, C)``: one position (``class_dim`` ignored, or -1 / 1);
    * more dimensions: the classes along ``class_dim`` (``-1``: ``(n, T, C)``, Hugging Face's
      ``(batch, tokens, vocabulary)``; ``1``: ``(n, C, L)``, ``(n, C, H, W)``, PyTorch's
      ``cross_entropy`` layout), the other axes flattened (row-major) into the positions.
      Without ``class_dim`` a ``ValueError`` names both layouts: the class axis is never
      guessed from the shape."""
    n = out.shape[0]
    if out.dim() <= 2:
        return out.reshape(n, 1, -1)
    if class_dim is None:
        raise _layout_error(out)
    d = class_dim % out.dim()
    if d == 0:
        raise ValueError(f"class_dim={class_dim} is the batch axis of outputs of shape "
                         f"{tuple(out.shape)}; the classes are along another axis")
    C = out.shape[d]
    if d != out.dim() - 1:
        out = out.movedim(d, -1)
    return out.reshape(n, -1, C)


def _from_positions(fp, shape, class_dim):
    """The inverse of `class_positions`: ``(n, S, C)`` back to the outputs' ``shape``."""
    if len(shape) <= 2:
        return fp.reshape(shape)
    d = class_dim % len(shape)
    moved = list(shape[:d]) + list(shape[d + 1:]) + [shape[d]]
    out = fp.reshape(moved)
    return out if d == len(shape) - 1 else out.movedim(-1, d)


def _position_scale(S, positions):
    """The factor of the per-example output transform ``g``: 1 for the sum over the ``S``
    positions, ``1/sqrt(S)`` for their mean (``gᵀg`` scales by ``1/S``)."""
    return 1.0 if positions != "mean" or S == 1 else S ** -0.5
