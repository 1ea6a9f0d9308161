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
import torch

from .context import BatchContext
from .jacobian import TorchHooksJacobianBackend, _refuse_batch_statistics


class CaptureError(RuntimeError):
    """The training step could not be recorded (no forward pass with gradients since the
    capture was armed, or its backward pass did not reach the model's output)."""


class StepCapture:
    """Records the curvature statistics of the next training step of ``model``.

    ``with StepCapture(generator, layer_collection) as cap:`` (or ``arm()`` / ``disarm()``)
    hooks the collection's modules and the model's output. Every forward pass of ``model`` with
    gradients enabled inside the block starts a new record (passes without gradients, e.g. an
    evaluation, are ignored); when the backward pass of a loss reaches the model's output, the
    output transform of ``generator.function`` (an `OutputTransform`
    that does not read the batch: closed-form or unseeded Monte-Carlo Fisher) is applied to the
    recorded output and its directions are back-propagated to the layers' outputs, keeping the
    forward graph for the user's own backward pass. ``ready`` says whether a record is complete.

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
        self._stack = None
        self._calls = None
        self._record = None   # the latest complete record
        self._pending = None  # the record whose backward pass has not reached the output yet

    # ------------------------------------------------------------------ arming
    def arm(self):
        if self._stack is not None:
            return self
        _refuse_batch_statistics(self.model)
        modules = self.layer_collection.get_layerid_module_map(self.model)
        self._modules = modules
        ctx = self.generator._hooks(self.layer_collection, modules)
        self._calls = ctx.__enter__()
        self._stack = [ctx, self.model.register_forward_hook(self._on_forward)]
        self._record = self._pending = None
        return self

    def disarm(self):
        if self._stack is None:
            return
        ctx, handle = self._stack
        self._stack = None
        handle.remove()
        ctx.__exit__(None, None, None)

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
    def _on_forward(self, module, args, output):
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or \
                not output.requires_grad:
            for store in self._calls.values():
                store.clear()
            return
        # this pass's calls: the stores are refilled by the next forward pass
        calls = {lid: list(store) for lid, store in self._calls.items()}
        for store in self._calls.values():
            store.clear()
        record = _Record(calls, self._modules)
        self._pending = record
        done = []

        def on_output_grad(grad):
            # fires again for the re-entrant pass itself (it reaches the output too)
            if done:
                return
            done.append(True)
            with torch.enable_grad():
                self._differentiate(record, output)
            if self._pending is record:
                self._record, self._pending = record, None

        output.register_hook(on_output_grad)

    def _differentiate(self, record, raw):
        gen, lc = self.generator, self.layer_collection
        out, columns = gen._transformed(raw)
        n, n_output = out.shape
        gen._check_calls(out, lc, record.modules, record.calls, "the training step")
        # keep_graph: the user's backward pass goes on through the same graph
        for k0, k1, grads in gen._direction_chunks(out, columns, record.calls, lc,
                                                   keep_graph=True):
            record.chunks.append((k0, k1, [g.detach() if g is not None else None
                                           for g in grads]))
        record.n, record.n_output, record.outputs = n, n_output, out.detach()


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
