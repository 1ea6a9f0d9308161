"""Curvature statistics of a user's own training step: no extra forward pass.

A K-FAC-style optimizer needs, every few steps, a curvature estimate on the step's mini-batch.
Running the engine on that batch costs one more forward and backward pass. The statistics
need the inputs of each layer (the forward pass of the training step has them) and the
gradients of the *curvature's* output directions w.r.t. each layer's output (for the Monte-Carlo
Fisher, ``∇_s log p(ŷ|x)`` with ``ŷ`` sampled from the model: not the gradients of the training
loss). `StepCapture` records the layers' calls during the user's forward pass and, when
the user's ``loss.backward()`` reaches the model's output, runs the curvature's backward pass
from there (re-entrantly, while the forward graph is still alive) down to the layers' outputs
only. The training step then costs one extra partial backward pass, and no forward pass.

The recorded batch is then replayed into any representation by `ReplayBackend`, a
generator whose passes feed the recorded statistics to the representation's accumulators
instead of running the model: ``PMatKFAC(generator=ReplayBackend(capture), examples=...)``
equals ``FIM_MonteCarlo(model, batch, PMatKFAC)`` with the same draws.
"""
import copy
import weakref

import torch

from ..layer_types.base import is_recording_paused
from .consumers import BatchContext
from .jacobian import TorchHooksJacobianBackend
from .model_and_data import _refuse_batch_statistics, in_engine_pass


class CaptureError(RuntimeError):
    """The training step could not be recorded (no forward pass with gradients since the
    capture was armed, or its backward pass did not reach the model's output)."""


class StepCapture:
    """Records the curvature statistics of the next training step of ``model``.

    ``with StepCapture(generator, layer_collection) as cap:`` (or ``arm()`` / ``disarm()``)
    arms the capture. While it is armed, every forward pass of ``model`` with gradients
    enabled is recorded: the collection's modules are hooked for the time of that call only
    (the model carries no hook, no instance attribute and no reference to the capture between
    its calls, so ``copy.deepcopy(model)`` and ``torch.save(model)`` work at any time, and the
    copies are never recorded). The record lives with the forward's output tensor: when the
    first backward pass that reaches one recorded output runs (the user's ``loss.backward()``,
    or the ``torch.autograd.grad`` of a gradient penalty through that output), the output
    transform of ``generator.function`` (an `nngeometry.curvature.OutputTransform` that
    does not read the batch: closed-form or unseeded Monte-Carlo Fisher) is applied to the
    recorded output and its directions are back-propagated to the layers' outputs, keeping the
    forward graph for the user's own backward pass. That record is complete (``ready``) and
    the capture disarms itself: one record per arming. Every later backward pass (through the
    same output with ``retain_graph``, a validation loss, a second model call) costs nothing.

    Not recorded: passes without gradients (an evaluation under ``torch.no_grad()``), passes
    inside a ``torch.func`` transform (``vmap`` over ``grad`` / ``jacrev`` of the same model:
    per-example gradients of the user's own), the library's own passes on the model (a matrix
    built in the middle of training), and the calls of the model's copies.

    The model's batch statistics must not couple the examples (BatchNorm in training mode is
    refused, as for every matrix).
    """

    def __init__(self, generator, layer_collection):
        fn = generator.function
        if not (hasattr(fn, "split") and hasattr(fn, "model_outputs")):
            raise TypeError("StepCapture needs an output transform (closed-form or Monte-Carlo "
                            "Fisher) as the generator's function")
        if getattr(fn, "needs_batch", False):
            raise TypeError("this curvature reads the batch (its targets or a seed's key): it "
                            "cannot be taken from the training step's output alone; compute it "
                            "with an extra pass on the batch instead")
        self.generator = generator
        self.model = generator.model
        self.layer_collection = layer_collection
        self._handle = None   # the process-wide pre-hook that spots the model's calls
        self._open = None     # (hooks context, calls, finishing handle) of the call in progress
        self._record = None   # the latest complete record

    # ------------------------------------------------------------------ arming
    @property
    def armed(self):
        return self._handle is not None

    def arm(self):
        if self._handle is not None:
            return self
        _refuse_batch_statistics(self.model)
        self._modules = self.layer_collection.get_layerid_module_map(self.model)
        self._record = None
        # a process-wide pre-hook rather than one on the model: nothing of the capture is in
        # the model's state (pickling, deepcopy), and the hook holds the capture weakly
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(
            _weak_pre_hook(weakref.ref(self)))
        # a capture dropped while armed (its optimizer gone without close()) takes its hook
        # with it
        self._finalizer = weakref.finalize(self, self._handle.remove)
        return self

    def disarm(self):
        if self._handle is not None:
            self._finalizer.detach()
            self._handle.remove()
            self._handle = None
        self._close_call()

    def __deepcopy__(self, memo):
        """A copy on the copy of the model (``copy.deepcopy((model, optimizer))``), armed if
        this one is, with hooks of its own (the process-wide hook is never shared)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            if k not in ("_handle", "_finalizer", "_open"):
                setattr(new, k, copy.deepcopy(v, memo))
        new._handle = new._open = None
        if self.armed:
            new.arm()
        return new

    def __enter__(self):
        return self.arm()

    def __exit__(self, *exc):
        self.disarm()

    @property
    def ready(self):
        return self._record is not None

    def take(self):
        """The latest complete record (and forget it)."""
        if self._record is None:
            raise CaptureError(
                "no training step was recorded: run the model's forward pass (with gradients) "
                "and loss.backward() before step(), or pass the batch to step()")
        rec, self._record = self._record, None
        return rec

    # ------------------------------------------------------------------ hooks
    def _records(self, module):
        """Whether this call of ``module`` is a training forward pass to record."""
        return (module is self.model and self._open is None and torch.is_grad_enabled()
                and not _in_torch_func() and not is_recording_paused()
                and not in_engine_pass(self.model))

    def _on_pre_forward(self, module):
        if not self._records(module):
            return
        ctx = self.generator._hooks(self.layer_collection, self._modules)
        calls = ctx.__enter__()
        try:
            # registered after the layers' hooks: runs after them (the model itself may be
            # one of the layers), and also when the forward raises (always_call)
            finish = module.register_forward_hook(self._on_forward, always_call=True)
        except BaseException:
            ctx.__exit__(None, None, None)
            raise
        self._open = (ctx, calls, finish)

    def _close_call(self):
        """Remove the hooks of the call in progress; its calls (or None)."""
        if self._open is None:
            return None
        ctx, calls, finish = self._open
        self._open = None
        finish.remove()
        ctx.__exit__(None, None, None)
        return calls

    def _on_forward(self, module, args, output):
        calls = self._close_call()
        if calls is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        record = _Record(calls, self._modules)
        done = []
        ref = weakref.ref(self)

        def on_output_grad(grad):
            # fires again for the re-entrant pass itself (it reaches the output too), and for
            # any later backward pass through this output: one capture per record
            if done:
                return
            done.append(True)
            cap = ref()
            # disarmed: another output's backward completed this arming's record already
            if cap is None or not cap.armed or _in_torch_func():
                return
            with torch.enable_grad():
                cap._differentiate(record, output)
            cap._record = record
            cap.disarm()

        output.register_hook(on_output_grad)

    def _differentiate(self, record, raw):
        gen, lc = self.generator, self.layer_collection
        out, columns = gen._transformed(raw)
        n, n_output = out.shape
        gen._check_calls(out, lc, record.modules, record.calls, "the training step")
        # calls found shared by their gradients (a table as long as the batch): their inputs
        # get the batch axis their per-example gradients are computed with
        for store in record.calls.values():
            for c in store:
                if c.shared is not None:
                    c.expand_shared()
        # keep_graph: the user's backward pass goes on through the same graph
        for k0, k1, grads in gen._direction_chunks(out, columns, record.calls, lc,
                                                   keep_graph=True):
            record.chunks.append((k0, k1, [g.detach() if g is not None else None
                                           for g in grads]))
        record.n, record.n_output, record.outputs = n, n_output, out.detach()


def _in_torch_func():
    """Whether the code runs inside a ``torch.func`` transform (``vmap``, ``grad``, ``jacrev``,
    ``jvp``...): those passes are another computation's, never the training step."""
    return torch._C._functorch.maybe_current_level() is not None


def _weak_pre_hook(ref):
    """A process-wide forward pre-hook that hands the calls to the capture ``ref()`` (held
    weakly: the hook alone does not keep a capture, its generator and model alive)."""

    def pre_hook(module, args):
        cap = ref()
        if cap is not None:
            cap._on_pre_forward(module)

    return pre_hook


class _Record:
    """One recorded training step: the layers' calls, and the gradients of each chunk of output
    directions w.r.t. everything the calls differentiate to."""

    def __init__(self, calls, modules):
        self.calls = calls
        self.modules = modules
        self.chunks = []
        self.n = 0
        self.n_output = 0
        self.outputs = None

    def contexts(self, layer_collection):
        """The `BatchContext` of each chunk, as the engine's pass would give them."""
        layer_calls = [c for store in self.calls.values() for c in store]
        for k0, k1, grads in self.chunks:
            i = 0
            for c in layer_calls:
                c.set_gradients(grads[i:i + len(c.targets)], k1 - k0)
                i += len(c.targets)
            yield BatchContext(layer_collection, self.modules, self.calls, self.n, k1 - k0, k0,
                               self.n_output, None, self.outputs)


class ReplayBackend(TorchHooksJacobianBackend):
    """A generator whose passes replay one recorded training step (`StepCapture`)
    instead of running the model: the representations built from it hold the curvature of the
    recorded batch. Only statistics accumulated in one pass are available (not implicit
    products, and not centering)."""

    def __init__(self, capture, record):
        gen = capture.generator
        super().__init__(capture.model, gen.function, layer_collection=capture.layer_collection,
                         check_deterministic=False,
                         distributed=getattr(gen, "distributed", None),
                         process_group=getattr(gen, "process_group", None))
        self.record = record

    def accumulate(self, examples, layer_collection, consumer, chunk_bytes=None, finalize=True):
        """Feed the recorded step's statistics to ``consumer``. Under data parallelism (the
        training step of every rank recorded) the sums are reduced over the ranks, as a pass
        of the engine does: every rank gets the statistic of the global batch."""
        missing = [lid for lid in layer_collection.layer_ids() if lid not in self.record.calls]
        if missing:
            raise ValueError(f"layers {missing} were not recorded in the training step")
        for ctx in self.record.contexts(layer_collection):
            consumer.update(ctx)
        consumer.count = getattr(consumer, "count", 0) + self.record.n
        group = self._group()
        if group is not None:
            consumer.all_reduce(group, self._device())
        if consumer.count == 0:
            raise ValueError("the recorded training step had no examples")
        if finalize:
            consumer.finalize(consumer.count)
        return consumer

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "a recorded training step gives the statistics of one pass; products with the "
            "model (PMatImplicit, Jacobian-vector products) need the model: use an extra pass")

    _mv = _vTMv = _Jv = _JTv = _JV = _mm = _unsupported
