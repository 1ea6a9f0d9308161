"""Natural-gradient preconditioning for any ``torch.optim`` optimizer.

[`NaturalGradient`][nngeometry.optim.NaturalGradient] replaces the gradients of a model, in place, by the damped
natural-gradient direction:

```
g ← (F̄ + λ I)⁻¹ g
```

with ``F̄`` a running average of the curvature (Fisher, Monte-Carlo Fisher, or any curvature a
callable returns) in the representation you choose, then lets the optimizer (SGD, with or
without momentum, is the usual choice) take its step. The pattern of K-FAC optimizers (Martens &
Grosse 2015; Ba et al. 2017):

```
precond = NaturalGradient(model, PMatKFAC, damping=1e-3, update_freq=10, inv_freq=10)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for x, y in loader:
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    precond.step((x, y))          # curvature refreshed on this batch when due; grads replaced
    opt.step()
```

* **Curvature.** Every ``update_freq`` steps a new estimate ``F_t`` is computed on the step's
  batch and averaged, ``F̄ ← β F̄ + (1 − β) F_t`` (``β = ema_decay``; the first estimate is taken
  as is). For ``PMatKFAC`` (and ``PMatEKFAC``, whose eigenbasis comes from the averaged KFAC) the
  running average is over the Kronecker factors, ``Ā ← β Ā + (1 − β) A_t`` and likewise ``G``,
  as K-FAC optimizers do; for the other representations it is the exact average of the matrices.
  With ``curvature='mc'`` or ``'fisher'`` the estimate is taken from the training step itself
  (``capture=True``, the default): the preconditioner records the layers' inputs during the
  step's forward pass, and when ``loss.backward()`` reaches the model's output it
  back-propagates the curvature's own output directions (one sampled label per example for
  ``'mc'``) to the layers' outputs, keeping the graph for the loss's backward pass
  (`nngeometry.backend.capture`). No extra forward pass: the update step costs one partial
  backward pass more than an SGD step. Otherwise (a callable curvature, a custom ``function``,
  ``capture=False``, or a step whose forward pass was not recorded) the estimate is computed by
  an extra pass on the batch given to ``step``.
* **Inverse.** The matrix used for the solves is refreshed every ``inv_freq`` steps (its
  eigendecompositions / factorizations are cached in between). ``PMatEKFAC`` also refits its
  diagonal in the new eigenbasis on that step's batch.
* **Damping** ``λ``: a float or a function of the step number; ``damping='exact'`` solves with
  ``(F̄ + λ I)`` exactly (KFAC through its factors' eigendecompositions), ``'pi'`` uses KFAC's
  π-damped factors (only KFAC has them).
* **KL clipping** (Ba et al. 2017): with ``kl_clip=κ`` and the optimizer's learning rate ``η``,
  the direction ``p`` is scaled by ``ν = min(1, sqrt(κ / (η² |pᵀ g|)))``.
"""
import math

import torch

from ._entry import resolve_representation
from .backend import TorchHooksJacobianBackend
from .backend.capture import ReplayBackend, StepCapture
from .backend.model_and_data import default_function, refuse_random_modules, unwrap_model
from .curvature import closed_form_function, monte_carlo_function
from .layercollection import LayerCollection
from .metrics import FIM, FIM_MonteCarlo
from .object.pspace import PMatEKFAC, PMatKFAC
from .object.vector import PVector
from .serialization import from_state, to_state

_DAMPINGS = ("exact", "pi")


_RANDOM_ESTIMATE = (
    "each curvature estimate would be that of one random draw of the network, not of the "
    "network. Pass NaturalGradient(..., check_deterministic=False) to precondition with it "
    "anyway (with capture=True: the curvature of the training step's own draw, the one its "
    "gradient was taken with), or remove the random module")


class NaturalGradient:
    """Natural-gradient preconditioner (see the module docstring for the maths).

    Args:
        model: the network being trained.
        representation: the ``PMat*`` class of the curvature (``PMatKFAC``, ``PMatEKFAC``,
            ``PMatDiag``, ``PMatBlockDiag``, ``PMatDense``, ...), or its name (``'kfac'``, ...).
        curvature: ``'mc'`` (``FIM_MonteCarlo`` with ``trials`` samples), ``'fisher'`` (the
            closed-form ``FIM``), or a callable ``(model, batch, representation) -> PMat`` (e.g.
            an empirical Fisher or a GGN).
        variant: the likelihood of ``FIM`` / ``FIM_MonteCarlo`` (``'classif_logits'``,
            ``'regression'``, ...).
        damping: ``λ``, a float or a function ``step -> λ``.
        damping_mode: ``'exact'`` (default) or ``'pi'`` (KFAC only).
        update_freq: steps between curvature estimates.
        inv_freq: steps between refreshes of the matrix used for solves (default
            ``update_freq``).
        ema_decay: ``β`` of the running average (0: the latest estimate only).
        kl_clip: ``κ`` of KL clipping, or ``None``; needs ``lr`` or ``optimizer``.
        lr: the learning rate used by KL clipping (default: read from ``optimizer``).
        optimizer: the optimizer whose first parameter group's ``lr`` KL clipping reads.
        trials: samples per example of the Monte-Carlo Fisher.
        function: ``function(*batch) -> outputs``, as for ``FIM`` (default ``model(batch[0])``).
        layer_collection: the layers preconditioned (default: all the model's layers); the
            gradients of other parameters are left as they are.
        capture: take the curvature of ``'mc'`` / ``'fisher'`` from the training step's own
            forward and backward passes (see the module docstring); ``False`` always runs an
            extra pass on the batch given to ``step``.
        check_deterministic: refuse, at every step that estimates the curvature, a model with a
            random module in training mode (dropout, ``nn.MultiheadAttention`` with dropout),
            with or without ``capture`` (``RuntimeError`` naming the module). ``False``
            preconditions with the curvature of the random network: with ``capture`` that of
            the training step's own dropout masks (the masks its gradient was taken with),
            with an extra pass that of a fresh draw of the masks.
    """

    def __init__(self, model, representation=PMatKFAC, curvature="mc", variant="classif_logits",
                 damping=1e-3, damping_mode="exact", update_freq=10, inv_freq=None,
                 ema_decay=0.95, kl_clip=None, lr=None, optimizer=None, trials=1, function=None,
                 layer_collection=None, capture=True, check_deterministic=True):
        if damping_mode not in _DAMPINGS:
            raise ValueError(f"damping_mode={damping_mode!r}: use 'exact' ((F + λI)⁻¹) or 'pi' "
                             "(KFAC's π-damped factors)")

        # a name ('kfac', 'ekfac', ...) as the class, so that the EKFAC and π-damping checks
        # below see it
        representation = resolve_representation(representation, "NaturalGradient")
        if damping_mode == "pi" and not (isinstance(representation, type) and
                                         issubclass(representation, PMatKFAC)):
            raise ValueError("damping_mode='pi' exists for PMatKFAC only (π-damped Kronecker "
                             "factors); use damping_mode='exact' with " + representation.__name__)
        if curvature not in ("mc", "fisher") and not callable(curvature):
            raise ValueError(f"curvature={curvature!r}: use 'mc', 'fisher' or a callable "
                             "(model, batch, representation) -> PMat")
        if not 0.0 <= float(ema_decay) < 1.0:
            raise ValueError(f"ema_decay={ema_decay} must lie in [0, 1)")
        for name, f in (("update_freq", update_freq), ("inv_freq", inv_freq)):
            if f is not None and (int(f) != f or f < 1):
                raise ValueError(f"{name}={f} must be a positive integer")
        if kl_clip is not None and lr is None and optimizer is None:
            raise ValueError("kl_clip needs the learning rate: pass lr= or optimizer=")
        # a DistributedDataParallel wrapper: its .module holds the parameters (and their grads)
        self.model = unwrap_model(model)
        self.representation = representation
        self.curvature = curvature
        self.variant = variant
        self.damping = damping
        self.damping_mode = damping_mode
        self.update_freq = int(update_freq)
        self.inv_freq = int(inv_freq) if inv_freq is not None else int(update_freq)
        self.ema_decay = float(ema_decay)
        self.kl_clip = kl_clip
        self.lr = lr
        self.optimizer = optimizer
        self.trials = trials
        self.function = function
        self.layer_collection = layer_collection
        self.check_deterministic = bool(check_deterministic)
        self.steps = 0
        self.running = None      # F̄, the running average
        self.for_solves = None   # F̄ as of the last inverse refresh
        self._latest = None      # the latest estimate (its generator refits EKFAC diagonals)
        self._capture = None     # records the training step's statistics (see _arm)
        if capture and curvature in ("mc", "fisher") and function is None:
            self._capture = self._make_capture()
            self._arm()

    # ------------------------------------------------------------------ curvature
    def _make_capture(self):
        if self.layer_collection is None:
            self.layer_collection = LayerCollection.from_model(self.model)
        f = default_function(self.model)
        transform = monte_carlo_function(f, self.variant, self.trials) \
            if self.curvature == "mc" else closed_form_function(f, self.variant)
        gen = TorchHooksJacobianBackend(self.model, transform,
                                        layer_collection=self.layer_collection,
                                        check_deterministic=self.check_deterministic)
        return StepCapture(gen, self.layer_collection)

    def _due(self, step):
        """``(update, refresh)``: whether step ``step`` estimates the curvature and refreshes
        the matrix used for solves."""
        return step % self.update_freq == 0, self.for_solves is None or step % self.inv_freq == 0

    def _arm(self):
        """Record the next training step when it needs statistics (an estimate, or EKFAC's
        diagonal refit); otherwise no hooks stay on the model."""
        update, refresh = self._due(self.steps)
        if update or (refresh and self.representation is PMatEKFAC):
            self._capture.arm()
        else:
            self._capture.disarm()

    def _replay(self, record):
        return ReplayBackend(self._capture, record)

    def _estimate(self, batch, record=None):
        rep = PMatKFAC if self.representation is PMatEKFAC else self.representation
        if record is not None:
            return rep(layer_collection=self.layer_collection, generator=self._replay(record),
                       examples=record)
        _need_batch(batch)
        kw = dict(variant=self.variant, function=self.function,
                  layer_collection=self.layer_collection,
                  check_deterministic=self.check_deterministic)
        if self.curvature == "mc":
            return FIM_MonteCarlo(self.model, batch, rep, trials=self.trials, **kw)
        if self.curvature == "fisher":
            return FIM(self.model, batch, rep, **kw)
        return self.curvature(self.model, batch, rep)

    def _average(self, new):
        b = self.ema_decay
        if self.running is None or b == 0.0:
            return new
        if isinstance(new, PMatKFAC):
            return self.running.factor_average(new, b, 1.0 - b)
        return b * self.running + (1.0 - b) * new

    def _refresh_for_solves(self, batch, record=None):
        if self.representation is PMatEKFAC:
            ekfac = PMatEKFAC.from_kfac(self.running)
            if record is not None:
                ekfac.generator = self._replay(record)
                ekfac.update_diag(record)
            else:
                _need_batch(batch)
                ekfac.generator = self._latest_generator(batch)
                ekfac.update_diag(batch)
            return ekfac
        return self.running

    def _latest_generator(self, batch):
        if self._latest is None and self._capture is None:
            # restored from a state dict: a generator of the curvature, from an estimate
            self._latest = self._estimate(batch)
        gen = None if self._latest is None else self._latest.generator
        if gen is None or isinstance(gen, ReplayBackend):
            # the estimate came from a recorded step: refit on this batch with a real pass
            return self._capture.generator
        return gen

    def current_damping(self):
        return float(self.damping(self.steps)) if callable(self.damping) else float(self.damping)

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, batch=None):
        """Refresh the curvature when due (from the recorded training step, or from an extra
        pass on ``batch``), then replace the gradients of the preconditioned parameters by
        ``(F̄ + λI)⁻¹ g`` (KL-clipped if asked). Call after ``loss.backward()`` and before
        ``optimizer.step()``; returns the direction (a PVector)."""
        update, refresh = self._due(self.steps)
        if (update or refresh) and self.check_deterministic:
            refuse_random_modules(self.model, _RANDOM_ESTIMATE)
        record = None
        if self._capture is not None and self._capture.ready:
            record = self._capture.take()
        if update:
            with torch.enable_grad():
                self._latest = self._estimate(batch, record)
            self.running = self._average(self._latest)
            if self.layer_collection is None:
                self.layer_collection = self._latest.layer_collection
        if refresh:
            with torch.enable_grad():
                self.for_solves = self._refresh_for_solves(batch, record)
        lam = self.current_damping()  # λ of this step (a schedule reads the step number)
        self.steps += 1
        if self._capture is not None:
            self._arm()
        g = PVector.from_model_grad(self.model, self.layer_collection)
        if self.damping_mode == "pi":
            p = self.for_solves.solve(g, regul=lam)
        elif isinstance(self.for_solves, PMatKFAC):
            p = self.for_solves.solve(g, regul=lam, damping="exact")
        else:
            p = self.for_solves.solve(g, regul=lam)
        if self.kl_clip is not None:
            lr = self.lr if self.lr is not None else self.optimizer.param_groups[0]["lr"]
            vg = abs(float(p.dot(g)))
            nu = min(1.0, math.sqrt(self.kl_clip / (lr ** 2 * vg))) if vg > 0 else 1.0
            p = p * nu
        _write_grads(self.model, self.layer_collection, p)
        return p

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """The step count, the matrices and the layer collection as plain tensors, numbers,
        strings and containers (no model, no function inside): ``torch.save(pre.state_dict(),
        f)`` then ``pre.load_state_dict(torch.load(f))`` with the defaults
        (``weights_only=True``; see `nngeometry.serialization`)."""
        return to_state({"steps": self.steps, "running": self.running,
                         "for_solves": self.for_solves,
                         "layer_collection": self.layer_collection})

    def load_state_dict(self, state):
        """Restore a state saved by `state_dict` (also a state dict of an earlier
        release, which held the objects themselves)."""
        state = from_state(state)
        self.steps = int(state["steps"])
        self.running, self.for_solves = state["running"], state["for_solves"]
        self.layer_collection = state["layer_collection"]
        # the latest estimate (whose generator refits EKFAC's diagonal) is not saved: the next
        # refresh without a recorded step estimates it again
        self._latest = None
        if self._capture is not None:
            self._capture.disarm()
            self._capture = self._make_capture()
            self._arm()

    def close(self):
        """Remove the hooks that record training steps from the model (a preconditioner that
        is no longer used leaves the model as it was)."""
        if self._capture is not None:
            self._capture.disarm()
            self._capture = None



def _need_batch(batch):
    if batch is None:
        raise ValueError("this step needs a curvature estimate but no training step was "
                         "recorded (the forward pass ran without gradients, inside a torch.func "
                         "transform, through another function than the model, or no backward "
                         "pass reached its output; or capture=False): pass the batch, "
                         "step((inputs, targets))")


def _write_grads(model, layer_collection, direction):
    """Copy the PVector ``direction`` into the ``.grad`` of the collection's parameters; a
    frozen parameter (``requires_grad=False``) gets none: an optimizer would otherwise update
    it."""
    parts = direction.get_dict_representation()
    modules = layer_collection.get_layerid_module_map(model)
    for lid, module in modules.items():
        for p, d in zip(layer_collection[lid].parameters_of(module), parts[lid]):
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = d.detach().clone().reshape(p.shape)
            else:
                p.grad.copy_(d.reshape(p.shape))


__all__ = ["NaturalGradient"]
