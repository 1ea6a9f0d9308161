"""Entry point: the exact Hessian of a loss summed over the batches."""
import torch

from ._memory import check_fits
from ._entry import check_representation, prepare_entry
from .backend import HessianBackend
from .backend.model_and_data import default_function, iterate_batches, prepare_batch, unwrap_model
from .backend.torch_func_hessian import loss_of_targets
from .curvature import loss_or_default, per_example_losses, targets_of


def Hessian(model, loader, representation, function=None, layer_collection=None, verbose=False,
            loss_function=None, device=None, output_function=None, check_deterministic=True,
            distributed=None, process_group=None, **kwargs):
    """The Hessian of the total loss, ``H = Σ_b ∇²_θ ℓ_b`` (a sum over the batches of the
    loader, not a mean), in the chosen representation.

    The loss of batch ``b = (x, y, ...)`` is, by priority:

    * ``function(prediction, y)`` with ``prediction = model(x)`` (upstream nngeometry's
      meaning of ``function``: a loss of the outputs and the targets ``batch[1]``);
    * ``loss_function(outputs, *batch)`` with ``outputs = output_function(*batch)`` (default
      ``model(batch[0])``), for losses that need the whole batch;
    * by default the cross-entropy of ``model(x)`` against ``y`` summed over the examples
      (``reduction='sum'``): ``H`` is then the Hessian of ``Σ_x -log p(y|x)`` over the data
      set, i.e. ``n`` times the mean-loss Hessian.

    Use a summed reduction in a custom loss for the Hessian of the total loss. Unlike a Fisher
    matrix ``H`` contains the second derivatives of the network itself and may be indefinite.

    Built from Hessian-vector products (forward-over-reverse ``torch.func``): supported
    representations are ``PMatDense`` (``P`` HVPs per batch), ``PMatBlockDiag`` and ``PMatDiag``
    (exact diagonal blocks / diagonal, ``P`` HVPs per batch), ``PMatImplicit`` (one HVP per batch
    and product; its CG ``solve`` needs ``H + regul·I`` positive definite) and ``PMatMixed``
    groups of those. KFAC, EKFAC, LowRank and QuasiDiag approximate a Gauss-Newton matrix
    ``Σ JᵀJ`` and raise ``NotImplementedError``.

    Args:
        model: the ``torch.nn.Module``.
        loader: a DataLoader (or a single mini-batch) of ``(inputs, targets, ...)``.
        representation: a ``PMat*`` class (see above), or its name (``'dense'``, ...).
        function: ``function(prediction, targets) -> scalar`` loss of a batch (see above).
        layer_collection: the layers to differentiate; default all layers of the model (the
            other parameters are held constant).
        verbose: show a progress bar.
        loss_function: ``loss_function(outputs, *batch) -> scalar`` (not with ``function``).
        device: kept for compatibility; batches are moved to the model's device.
        output_function: ``output_function(*batch) -> outputs`` given to ``loss_function``;
            default ``model(batch[0])``.
        check_deterministic: refuse a random model (dropout modules in training mode:
            ``RuntimeError`` naming ``model.eval()``); ``False`` skips the check.
        distributed: data parallelism over ``torch.distributed`` (as for
            [`nngeometry.FIM`][nngeometry.FIM]): ``loader`` is this rank's shard and every rank gets the
            Hessian of the loss summed over all the ranks' batches.
        process_group: the group to reduce over (default: the world).
        **kwargs: passed to the representation; a keyword it does not take is refused
            (``TypeError``), and so is ``PMatEye`` without ``scaling=`` (``ValueError``: not built
            from data).
    """
    representation = check_representation(representation, kwargs, "Hessian")
    if function is not None:
        if loss_function is not None:
            raise ValueError("pass either function(prediction, targets) or "
                             "loss_function(outputs, *batch), not both: both are the loss")
        if output_function is not None:
            raise ValueError("function(prediction, targets) receives model(batch[0]); to loss "
                             "other outputs use output_function= with loss_function=")
        loss_function = loss_of_targets(function)

    model = unwrap_model(model)
    output_function, layer_collection = prepare_entry(model, output_function, layer_collection)
    generator = HessianBackend(model, loss_function=loss_function, function=output_function,
                               verbose=verbose, distributed=distributed,
                               process_group=process_group)
    # the backend iterates the batches through its Jacobian generator, which checks the model
    generator._helper.check_deterministic = bool(check_deterministic)
    return representation(layer_collection=layer_collection, generator=generator,
                          examples=loader, **kwargs)




class ActivationHessian:
    """The Hessian of a batch's loss w.r.t. an intermediate feature: ``∇²_z L`` with ``z`` the
    output (or input) of the module named ``layer_name`` on one batch and
    ``L = Σ_i ℓ(f(x_i), y_i)`` the loss summed over the batch's examples, the rest of the
    network (after ``z``) held as a function of ``z`` (curvlinops' experimental
    ``ActivationHessianLinearOperator``). ``z`` has shape ``shape`` (the batch's, e.g.
    ``(n, d)``); the matrix is ``(N, N)`` with ``N = z.numel()``, in ``z.flatten()`` order.
    Examples interact only through the loss' sum, so the matrix is block-diagonal over the
    examples for per-example losses.

    Products (``mv``, one Hessian-vector product: reverse-over-reverse) need no ``N × N``
    memory; ``to_torch()`` forms the dense matrix (``N`` products).

    Args:
        model: the ``torch.nn.Module`` (in eval mode: dropout would make the Hessian random).
        batch: one mini-batch ``(inputs, targets, ...)`` or a dict batch.
        layer_name: the module's qualified name (``dict(model.named_modules())``).
        loss_function: ``loss_function(outputs, *targets) -> (n,)``; default cross-entropy on
            logits (as [`nngeometry.EmpiricalFisher`][nngeometry.EmpiricalFisher]).
        io: ``'output'`` (default) or ``'input'`` (the module's first positional input).
        function: ``function(*batch) -> outputs``; default ``model(batch[0])`` /
            ``model(**inputs)``.
        positions: as for [`nngeometry.EmpiricalFisher`][nngeometry.EmpiricalFisher].
        target_key: as for [`nngeometry.EmpiricalFisher`][nngeometry.EmpiricalFisher].
    """

    def __init__(self, model, batch, layer_name, loss_function=None, io="output", function=None,
                 positions="sum", target_key="labels"):
        if io not in ("output", "input"):
            raise ValueError(f"io must be 'output' or 'input', got {io!r}")
        modules = dict(model.named_modules())
        if layer_name not in modules:
            close = [n for n in modules if n and layer_name in n][:5]
            raise ValueError(f"no module named {layer_name!r} in the model"
                             + (f"; did you mean one of {close}?" if close else ""))
        self.module = modules[layer_name]
        batches = list(iterate_batches(batch))
        if len(batches) != 1:
            raise ValueError(f"ActivationHessian takes one mini-batch, got {len(batches)} batches")
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
        self.batch = prepare_batch(batches[0], device, dtype)
        self.function = function if function is not None else default_function(model, target_key)
        self.loss = loss_or_default(loss_function)
        self.targets = targets_of(self.batch, target_key, "the activation Hessian")
        self.io, self.positions = io, positions
        self._per_example = per_example_losses
        seen = []

        def grab(m, args, out=None):
            seen.append((out if io == "output" else args[0]))
        h = (self.module.register_forward_hook(grab) if io == "output"
             else self.module.register_forward_pre_hook(grab))
        try:
            with torch.no_grad():
                self.function(*self.batch)
        finally:
            h.remove()
        if not seen or not isinstance(seen[0], torch.Tensor):
            raise ValueError(f"module {layer_name!r} was not called with a tensor {io} by the "
                             "forward pass of this batch")
        self.z = seen[0].detach()
        self.shape = tuple(self.z.shape)

    def _loss_of(self, z):
        if self.io == "output":
            h = self.module.register_forward_hook(lambda m, a, o: z)
        else:
            h = self.module.register_forward_pre_hook(lambda m, a: (z,) + tuple(a[1:]))
        try:
            with torch.enable_grad():
                out = self.function(*self.batch)
                losses = self.loss(out, *self.targets)
                return self._per_example(losses, out.shape[0], self.positions).sum()
        finally:
            h.remove()

    def mv(self, v):
        """``H v`` for ``v`` of shape ``shape`` (or flat ``(N,)``); same shape as ``v``."""
        z = self.z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self._loss_of(z), z, create_graph=True)
        vv = v.reshape(self.shape).to(z.dtype)
        (hv,) = torch.autograd.grad(g, z, vv, allow_unused=True)
        hv = torch.zeros_like(z) if hv is None else hv
        return hv.reshape(v.shape).detach()

    def to_torch(self):
        """The dense ``(N, N)`` matrix (``N`` Hessian-vector products, vmapped)."""
        N = self.z.numel()
        check_fits(N * N * self.z.element_size(),
                   f"the activation Hessian ({N}² entries)", "use mv() products instead")
        z = self.z.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self._loss_of(z), z, create_graph=True)
        eye = torch.eye(N, dtype=z.dtype, device=z.device).reshape((N,) + self.shape)
        rows = []
        for e in eye:  # one HVP per coordinate (a loop: double backward of any model)
            (r,) = torch.autograd.grad(g, z, e, retain_graph=True, allow_unused=True)
            rows.append(torch.zeros_like(z).reshape(-1) if r is None else r.reshape(-1))
        return torch.stack(rows).detach()


__all__ = ["Hessian", "ActivationHessian"]

# Upstream import paths: re-exports only (upstream's module exposed these through its imports)
from .backend.torch_func_hessian import TorchFuncHessianBackend  # noqa: E402,F401
