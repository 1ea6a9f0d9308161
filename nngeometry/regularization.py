"""Elastic weight consolidation (EWC): quadratic penalties that keep a network close to the
parameters it had after earlier tasks, weighted by each task's Fisher information.

* EWC (Kirkpatrick et al. 2017), one anchor per task:

  ```
  R(θ) = ½ λ Σ_t (θ − θ_t)ᵀ F_t (θ − θ_t)
  ```

* online EWC (Schwarz et al. 2018), one anchor and one running matrix:

  ```
  F ← γ F + F_t,    θ* ← θ_t,    R(θ) = ½ λ (θ − θ*)ᵀ F (θ − θ*)
  ```

``F_t`` is any parameter-space matrix (``PMatDiag``, ``PMatKFAC``, ``PMatEKFAC``,
``PMatBlockDiag``, ``PMatDense``, ``PMatLowRank``, ``PMatQuasiDiag``...) that stores the
matrix: the penalty only needs its ``vTMv``, which is differentiable with respect to ``θ``.
(``PMatImplicit`` is refused: its products run the model at its current parameters, not at
the task's.)

The running sum ``γ F + F_t`` of online EWC is formed exactly where the representation's sum
is (Dense, BlockDiag, Diag, QuasiDiag, LowRank). For ``PMatKFAC`` the sum of two Kronecker
products is not one: it is approximated by averaging the factors,
``γ A₁⊗G₁ + A₂⊗G₂ ≈ (γ A₁ + A₂)/(γ+1) ⊗ (γ G₁ + G₂)``, exact when the two matrices share
either factor (and the approximation kfac-pytorch-style optimizers make for running averages).
For the other representations (EKFAC with two eigenbases) the weighted terms are kept
side by side under the one anchor: exact, with memory growing with the number of tasks.
"""
import torch

from .object.pspace import PMatImplicit, PMatKFAC
from .object.vector import PVector
from .serialization import from_state, to_state


class EWC:
    """An EWC penalty on the parameters of ``model`` (see the module's docstring for the maths).

    Args:
        model: the network whose parameters are penalised.
        lam: the strength ``λ`` (the penalty is ``½ λ Σ ...``).
        gamma: ``None`` for EWC (one anchor per task); a float in ``[0, 1]`` for online EWC,
            the decay of the running matrix (``γ = 1``: plain sum of the tasks' matrices).
        layer_collection: the layers penalised (default: those of the matrices registered, which
            must all share one collection).

    Example:
        ```python
        ewc = EWC(model, lam=100.)
        ewc.register_task(FIM(model, loader_a, PMatKFAC))   # anchor: the current parameters
        loss = criterion(model(x), y) + ewc.penalty()
        ```
    """

    def __init__(self, model, lam=1.0, gamma=None, layer_collection=None):
        if gamma is not None and not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"gamma={gamma}: online EWC's decay must lie in [0, 1] (gamma=None "
                             "for EWC with one anchor per task)")
        if float(lam) < 0:
            raise ValueError(f"lam={lam}: the penalty's strength must be non-negative")
        self.model = model
        self.lam = float(lam)
        self.gamma = None if gamma is None else float(gamma)
        self.layer_collection = layer_collection
        # EWC: [(anchor, [(weight, F)])] one entry per task;
        # online EWC: one entry whose terms are merged where the representation allows
        self.tasks = []

    # ------------------------------------------------------------------ tasks
    def register_task(self, fisher, anchor=None):
        """Add the task whose matrix is ``fisher``; its anchor is ``anchor`` (a PVector) or, by
        default, a detached copy of the model's current parameters."""
        if isinstance(fisher, PMatImplicit):
            raise TypeError(
                "EWC needs the matrix of the task as it was: PMatImplicit stores nothing and its "
                "products run the model at its current parameters, which training then moves "
                "(a silently different penalty). Build a representation that stores the matrix "
                "(PMatDiag, PMatKFAC, PMatEKFAC, PMatBlockDiag, PMatLowRank, PMatDense)")
        lc = fisher.layer_collection
        if self.layer_collection is None:
            self.layer_collection = lc
        elif lc != self.layer_collection:
            raise ValueError(
                "this matrix is built on another LayerCollection than the earlier tasks'; build "
                "every task's matrix with the same layer_collection= (or pass it to EWC)")
        if anchor is None:
            anchor = PVector.from_model(self.model, lc).detach().clone()
        elif not isinstance(anchor, PVector) or anchor.layer_collection != lc:
            raise ValueError("anchor must be a PVector on the matrix's LayerCollection")
        anchor = anchor.detach()
        if self.gamma is None or not self.tasks:
            self.tasks.append((anchor, [(1.0, fisher)]))
            return self
        _, terms = self.tasks[0]
        terms = [(self.gamma * w, F) for w, F in terms]
        self.tasks[0] = (anchor, _merge(terms, fisher))
        return self

    @property
    def n_tasks(self):
        return len(self.tasks)

    # ------------------------------------------------------------------ penalty
    def penalty(self, model=None):
        """``½ λ Σ (θ − θ_t)ᵀ F_t (θ − θ_t)`` at the current parameters of ``model`` (default:
        the model given at construction): a 0-d tensor, differentiable w.r.t. them."""
        model = self.model if model is None else model
        if not self.tasks:
            return torch.zeros((), device=_device(model), dtype=_dtype(model))
        theta = PVector.from_model(model, self.layer_collection)
        total = 0.0
        for anchor, terms in self.tasks:
            delta = theta - anchor
            for weight, F in terms:
                total = total + weight * F.vTMv(delta)
        return 0.5 * self.lam * total

    __call__ = penalty

    # ------------------------------------------------------------------ state
    def state_dict(self):
        """Everything but the model, as plain tensors, numbers, strings and containers:
        ``torch.save(ewc.state_dict(), f)`` then ``ewc.load_state_dict(torch.load(f))`` with
        the defaults (``weights_only=True``; see `nngeometry.serialization`)."""
        return to_state({"lam": self.lam, "gamma": self.gamma,
                         "layer_collection": self.layer_collection,
                         "tasks": [[a, [list(wF) for wF in t]] for a, t in self.tasks]})

    def load_state_dict(self, state):
        """Restore a state saved by `state_dict` (also a state dict of an earlier
        release, which held the objects themselves)."""
        state = from_state(state)
        self.lam, self.gamma = state["lam"], state["gamma"]
        self.layer_collection = state["layer_collection"]
        self.tasks = [(a, [tuple(wF) for wF in t]) for a, t in state["tasks"]]


def _merge(terms, fisher):
    """``Σ w F + fisher`` as a list of weighted terms, merged into one matrix where that is exact
    (or, for KFAC, the documented factor average)."""
    if len(terms) == 1:
        (w, F), = terms
        if isinstance(F, PMatKFAC) and type(fisher) is PMatKFAC:
            return [(1.0, F.factor_average(fisher, w, 1.0))]
        try:
            return [(1.0, w * F + fisher)]
        except NotImplementedError:
            pass
    return terms + [(1.0, fisher)]


def _device(model):
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _dtype(model):
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


__all__ = ["EWC"]
