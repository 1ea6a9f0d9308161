"""Losses of observed targets and the registry of losses with a closed-form output Hessian.

`targets_of` reads the targets from a batch, `cross_entropy_losses` is the default loss
``-log softmax(f)[y]`` per position, `per_example_losses` reduces what a loss returned to one
loss ``ℓ_i`` per example. `known_loss` recognises the losses (by name in `LOSS_NAMES`, or an
exact ``torch.nn`` loss type) whose per-example output Hessian ``H_i = ∇²_f ℓ_i`` has a
closed-form square root: ``diag(p) - p pᵀ`` per position for the cross-entropy, ``diag(h)``
for the elementwise losses (squared error, binary cross-entropy, Gaussian and Poisson NLL).
"""
import torch
import torch.nn.functional as F

from .positions import class_positions


def targets_of(batch, target_key="labels", caller="this matrix"):
    """The targets that a loss of the observed targets takes after the outputs:
    ``batch[1:]`` for a batch ``(inputs, targets, ...)``; for a dict batch (Hugging Face
    style) the value of ``target_key`` (``'labels'``) when the batch has no other element."""
    first = batch[0]
    if isinstance(first, dict) and len(batch) == 1:
        if target_key not in first:
            raise ValueError(
                f"{caller} needs the observed targets, and the dict batch has no key "
                f"{target_key!r} (its keys: {', '.join(map(repr, first))}); name the targets' key "
                "with target_key=, or pass batches (inputs, targets)")
        return (first[target_key],)
    if len(batch) < 2:
        raise ValueError(
            f"{caller} needs the observed targets: the batches hold only inputs. Pass batches "
            "(inputs, targets, ...) (a DataLoader of a TensorDataset(x, y)), or dicts with a "
            f"{target_key!r} key")
    return tuple(batch[1:])


def cross_entropy_losses(outputs, targets, class_dim=None):
    """``-log softmax(outputs)[targets]`` per position, shape ``(n, S)`` (positions as in
    `class_positions`, the classes along ``class_dim``); targets equal to -100 (PyTorch's
    and Hugging Face's ``ignore_index``) give 0."""
    fp = class_positions(outputs, class_dim)
    n, S, C = fp.shape
    if targets.is_floating_point() or targets.numel() != n * S:
        raise ValueError(
            f"the default loss (cross-entropy on logits) needs integer class targets, one per "
            f"position: {n * S} for outputs of shape {tuple(outputs.shape)}, got a "
            f"{targets.dtype} tensor of shape {tuple(targets.shape)}; pass loss_function= for "
            "another loss")
    y = targets.reshape(n * S)
    return F.cross_entropy(fp.reshape(n * S, C), y, reduction="none").reshape(n, S)


def per_example_losses(losses, n, positions="sum", loss_name="loss_function"):
    """The per-example losses ``(n,)`` from what a loss returned: ``(n,)`` as is, ``(n, ...)``
    (a loss per position) summed, or averaged with ``positions='mean'``, over the positions."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"{loss_name} must return a tensor of per-example losses (n,), got "
                        f"{type(losses).__name__}")
    if losses.dim() == 0 or losses.shape[0] != n:
        raise ValueError(
            f"{loss_name} must return one loss per example, shape ({n},) (reduction='none', e.g. "
            f"lambda out, y: F.cross_entropy(out, y, reduction='none')), got shape "
            f"{tuple(losses.shape)}: a loss reduced over the batch has no per-example gradients")
    if losses.dim() == 1:
        return losses
    flat = losses.reshape(n, -1)
    return flat.sum(1) if positions == "sum" else flat.mean(1)


def loss_or_default(loss_function, class_dim_of=lambda: None):
    """The loss ``(outputs, *targets) -> losses`` of ``loss_function``; the cross-entropy on
    logits (default, ``'cross_entropy'``) reads the class axis ``class_dim_of()`` at call
    time."""
    if loss_function is None or (isinstance(loss_function, str)
                                 and loss_function == "cross_entropy"):
        return lambda out, y, *rest: cross_entropy_losses(out, y, class_dim_of())
    if isinstance(loss_function, str) or (isinstance(loss_function, torch.nn.Module)
                                          and known_loss(loss_function) is not None):
        return known_loss(loss_function).losses  # (checks the name and the reduction)
    if not callable(loss_function):
        raise TypeError(f"loss_function must be callable, loss_function(outputs, *targets) -> "
                        f"per-example losses (n,), got {type(loss_function).__name__}")
    return loss_function


#: the losses that ``GGN(..., loss_function=name)`` / ``EmpiricalFisher`` accept by name
LOSS_NAMES = ("cross_entropy", "mse", "bce_with_logits")


class _KnownLoss:
    """A loss whose per-example output Hessian ``H_i`` has a closed-form square root, so the GGN
    needs neither output Hessians by double backward nor their eigendecompositions.

    ``kind``:

    * ``'softmax'``: cross-entropy on logits, ``H = diag(p) - p pᵀ`` per position
      (``p = softmax``), square root `multinomial_covariance_sqrt` (``C - 1`` columns).
      ``classes``: ``'last'`` (the library's convention, `class_positions`: ``(n, C)``,
      ``(n, T, C)``, ``(n, C, H, W)``) or ``1`` (``torch.nn.CrossEntropyLoss``: classes along
      dimension 1 for every shape). Positions whose target is ``ignore_index`` have ``H = 0``.
      Label smoothing ``ε`` leaves ``H`` unchanged (the smoothed targets sum to one).
    * ``'elementwise'``: a loss that is a sum over the output entries of a function of one
      entry, ``H = diag(h)``: ``h = 2`` (squared error ``(f - y)²``), ``σ(f)(1 - σ(f))``
      (binary cross-entropy on logits), ``1 / max(var, eps)`` (Gaussian NLL
      ``0.5 (log var + (f - y)² / var)``), ``exp(f)`` (Poisson NLL with log-rate outputs);
      square root ``sqrt(h)``.

    ``losses(out, *targets)`` is the loss itself (per position / per entry), for the empirical
    Fisher and for error messages."""

    def __init__(self, name, kind, losses, curvature=None, classes="last", ignore_index=None):
        self.name, self.kind, self.losses = name, kind, losses
        self.curvature = curvature      # elementwise: h(f_detached, targets) -> broadcastable
        self.classes = classes
        self.ignore_index = ignore_index

    def __call__(self, out, *targets):
        return self.losses(out, *targets)


def _mse_losses(out, y):
    return (out - y) ** 2


def _bce_losses(out, y):
    return F.binary_cross_entropy_with_logits(out, y.to(out.dtype), reduction="none")


def _ce_string_losses(out, y):
    return cross_entropy_losses(out, y)


def known_loss(loss_function):
    """The `_KnownLoss` behind ``loss_function`` (a name of `LOSS_NAMES` or a
    ``torch.nn`` loss module of an exact known type), or None for any other callable (the GGN
    then uses the generic output Hessians).

    Modules: ``nn.CrossEntropyLoss`` (class indices; with ``weight=`` or probability targets:
    generic path), ``nn.MSELoss``, ``nn.BCEWithLogitsLoss`` (with ``weight`` / ``pos_weight``:
    generic), ``nn.GaussianNLLLoss`` (targets ``(y, var)``), ``nn.PoissonNLLLoss(log_input=True)``.
    A module must have ``reduction='none'`` (``ValueError`` otherwise: a loss reduced over the
    batch has no per-example Hessians, and a mean would scale them by ``1/n``)."""
    nn = torch.nn
    if isinstance(loss_function, str):
        if loss_function == "cross_entropy":
            return _KnownLoss("cross_entropy", "softmax", _ce_string_losses, classes="last",
                              ignore_index=-100)
        if loss_function == "mse":
            return _KnownLoss("mse", "elementwise", _mse_losses,
                              lambda f, t: torch.full((), 2.0, dtype=f.dtype, device=f.device))
        if loss_function == "bce_with_logits":
            return _KnownLoss("bce_with_logits", "elementwise", _bce_losses, _bernoulli_h)
        raise ValueError(f"unknown loss_function {loss_function!r}: the names are "
                         f"{', '.join(map(repr, LOSS_NAMES))}; or pass a torch.nn loss module "
                         "with reduction='none', or a callable loss_function(outputs, *targets) "
                         "-> per-example losses (n,)")
    known_types = (nn.CrossEntropyLoss, nn.MSELoss, nn.BCEWithLogitsLoss, nn.GaussianNLLLoss,
                   nn.PoissonNLLLoss)
    if type(loss_function) not in known_types:
        return None  # (a subclass may redefine forward: the generic path is always right)
    m = loss_function
    if m.reduction != "none":
        raise ValueError(
            f"{type(m).__name__}(reduction={m.reduction!r}) reduces the losses over the batch: "
            "the GGN and the empirical Fisher need one loss per example (a 'mean' would also "
            f"scale every Hessian by 1/n). Use {type(m).__name__}(reduction='none')")
    if type(m) is nn.CrossEntropyLoss:
        if m.weight is not None:
            return None  # H scales with the target's class weight: generic path
        return _KnownLoss("CrossEntropyLoss", "softmax", m, classes=1,
                          ignore_index=m.ignore_index)
    if type(m) is nn.MSELoss:
        return _KnownLoss("MSELoss", "elementwise", m,
                          lambda f, t: torch.full((), 2.0, dtype=f.dtype, device=f.device))
    if type(m) is nn.BCEWithLogitsLoss:
        if m.weight is not None or m.pos_weight is not None:
            return None
        return _KnownLoss("BCEWithLogitsLoss", "elementwise", m, _bernoulli_h)
    if type(m) is nn.GaussianNLLLoss:
        eps = m.eps

        def gaussian_h(f, targets):
            if len(targets) < 2 or not isinstance(targets[1], torch.Tensor):
                raise ValueError("nn.GaussianNLLLoss needs the variances: batches "
                                 "(inputs, targets, var), called as loss(outputs, targets, var)")
            var = targets[1].detach().to(f.dtype)
            if var.shape != f.shape and var.shape == f.shape[:-1]:
                var = var.unsqueeze(-1)  # (torch's rule: the last dimension dropped = shared)
            return 1.0 / var.clamp(min=eps)
        return _KnownLoss("GaussianNLLLoss", "elementwise", m, gaussian_h)
    if not m.log_input:
        return None  # H = y / f² depends on the targets: generic path
    return _KnownLoss("PoissonNLLLoss", "elementwise", m, lambda f, t: torch.exp(f))


def _bernoulli_h(f, targets):
    s = torch.sigmoid(f)
    return s * (1 - s)
