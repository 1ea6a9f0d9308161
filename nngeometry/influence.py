"""Influence functions and data attribution on any curvature of this library.

The influence of a training example ``z`` on a query ``q`` is

    I(z, q) = ∇θ m(q)ᵀ (G + Λ)⁻¹ ∇θ ℓ(z)

with ``ℓ`` the training loss of one example, ``m`` the measurement of the query (by default the
same loss), ``G`` a curvature of the training loss, the **mean** over the training examples (as
every matrix of this library), in any representation, and ``Λ`` the damping (``λI``, one ``λ_l``
per layer, or the mean-eigenvalue heuristic). ``Influence`` builds ``G`` once
([`Influence.fit`][nngeometry.influence.Influence.fit]), preconditions the query gradients once ([`Influence.precondition`][nngeometry.influence.Influence.precondition])
and streams the training gradients batch by batch against them
([`Influence.pairwise_scores`][nngeometry.influence.Influence.pairwise_scores], [`Influence.self_scores`][nngeometry.influence.Influence.self_scores]). See the page "Influence
functions" of the documentation for the formulas and the choices.
"""
import math
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ._entry import prepare_entry
from .backend import TorchHooksJacobianBackend
from .backend import consumers
from .backend.distributed import all_gather_rows, resolve_group
from .backend.model_and_data import iterate_batches, unwrap_model
from .metrics import FIM, FIM_MonteCarlo, EmpiricalFisher, GGN
from .object.map import PFMapDense
from .object.pspace import (PMatAbstract, PMatEKFAC, PMatEye, PMatImplicit, PMatKFAC,
                             PMatMixed)
from .curvature import check_positions, empirical_function

_CURVATURES = ("ggn", "fisher", "mc", "empirical")
_SOLVERS = ("cg", "lissa")
#: LiSSA's options (``solve_options`` with ``solver='lissa'``) and their defaults
LISSA_DEFAULTS = {"depth": 1000, "scale": None, "repeats": 1, "batch_size": None, "seed": 0}
#: the mean-eigenvalue damping heuristic: ``λ_l = HEURISTIC_FACTOR · tr(G_l) / p_l``
HEURISTIC_FACTOR = 0.1


# ====================================================================== losses of language models
def _next_token_nll(logits, labels, caller):
    """``(per_token, targets)``: the cross-entropy of token ``t + 1`` given the tokens up to
    ``t`` (logits shifted left, labels shifted right), ``(n, T - 1)``, zero where the label is
    ``-100``, and the shifted labels."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"{caller} takes logits (n, T, V) and labels (n, T), got shapes "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
    n, T, V = shift_logits.shape
    per_token = F.cross_entropy(shift_logits.reshape(n * T, V), shift_labels.reshape(n * T),
                                ignore_index=-100, reduction="none").reshape(n, T)
    return per_token, shift_labels


def causal_lm_loss(logits, labels):
    """``(n,)``: each sequence's loss as a Hugging Face causal language model computes it for a
    batch of that one sequence: the cross-entropy of token ``t + 1`` given the tokens up to
    ``t`` (logits shifted left, labels shifted right), averaged over the positions whose label
    is not ``-100``. ``logits`` ``(n, T, V)``, ``labels`` ``(n, T)``. A sequence with no
    labelled position has loss 0."""
    per_token, shift_labels = _next_token_nll(logits, labels, "causal_lm_loss")
    counts = (shift_labels != -100).sum(1).clamp(min=1)
    return per_token.sum(1) / counts.to(per_token.dtype)


# (they shift the labels themselves: the entry points pass them the full logits and labels,
# without the language-model convention's own shift)
causal_lm_loss.nngeometry_full_outputs = True


def causal_lm_log_prob(logits, labels):
    """``(n,)``: the log-probability of each sequence's labelled tokens (those whose label is
    not ``-100``, e.g. a completion after its prompt), ``Σ_t log p(y_{t+1} | y_{≤t})``: a
    measurement for queries (its gradient points to where the completion becomes likelier)."""
    per_token, _ = _next_token_nll(logits, labels, "causal_lm_log_prob")
    return -per_token.sum(1)


causal_lm_log_prob.nngeometry_full_outputs = True


# ====================================================================== stored query gradients
def _matrix_shape(layer):
    """``(rows, cols)`` of the matrix view ``[W.reshape(out, -1) | b]`` of a layer whose
    parameters are a weight with at least two dimensions and an optional bias of ``out``
    entries, or None (other layers are stored in full)."""
    specs = layer.param_specs()
    if not specs or specs[0][0] != "weight" or len(specs[0][1].size) < 2 or len(specs) > 2:
        return None
    out = specs[0][1].size[0]
    cols = specs[0][1].numel() // out
    if len(specs) == 2:
        if specs[1][0] != "bias" or specs[1][1].size != (out,):
            return None
        cols += 1
    return out, cols


def _to_matrix(flat, shape, has_bias):
    """``(m, p_l)`` rows in the layer's flat layout -> ``(m, out, cols)``."""
    m = flat.shape[0]
    out, cols = shape
    if not has_bias:
        return flat.reshape(m, out, cols)
    nw = out * (cols - 1)
    return torch.cat([flat[:, :nw].reshape(m, out, cols - 1), flat[:, nw:].unsqueeze(2)], dim=2)


def _compress(rows, shape, has_bias, rank):
    """The best rank-``rank`` approximation (truncated SVD, Eckart–Young) of each row's matrix
    view: ``(L, R)`` with ``L`` ``(m, out, r)`` (singular values folded in) and ``R``
    ``(m, cols, r)``, so that the matrix is ``L Rᵀ``."""
    U, S, Vh = torch.linalg.svd(_to_matrix(rows, shape, has_bias), full_matrices=False)
    r = min(rank, S.shape[1])
    return U[:, :, :r] * S[:, None, :r], Vh[:, :r, :].transpose(1, 2)


#: bytes of query gradients solved at once by a stored matrix (each solve makes a few copies
#: of its rows: a batch of 20 gradients of a 7 M-parameter model is 560 MB in float32)
_SOLVE_CHUNK_BYTES = 2 ** 27

#: bytes of expanded low-rank query rows held at once while scoring (the whole ``(m, p_l)``
#: expansion of a wide layer, e.g. 100 queries of an 8192 × 256 output layer, is 840 MB)
_SCORE_CHUNK_BYTES = 2 ** 27


def _layer_scores(entry, shape, has_bias, g):
    """``(m, n)``: the stored rows of a layer entry (a ``(m, p_l)`` tensor, or the low-rank
    factors ``L (m, out, r)``, ``R (m, cols, r)`` of the rows' matrix views ``L Rᵀ``) times the
    ``(n, p_l)`` rows ``g``. Low-rank entries are expanded a few queries at a time (at most
    ``_SCORE_CHUNK_BYTES``), in the matrix view, against ``g``'s matrix view."""
    if isinstance(entry, torch.Tensor):
        return entry.to(device=g.device, dtype=g.dtype) @ g.t()
    L, R = entry
    gm = _to_matrix(g, shape, has_bias).reshape(g.shape[0], -1)
    step = max(1, _SCORE_CHUNK_BYTES // (gm.shape[1] * gm.element_size()))
    parts = []
    for i in range(0, L.shape[0], step):
        E = L[i:i + step].to(gm) @ R[i:i + step].to(gm).transpose(1, 2)
        parts.append(E.reshape(E.shape[0], -1) @ gm.t())
    return torch.cat(parts)


# ====================================================================== streamed scores
class _PairwiseScores(consumers.Consumer):
    """Scores of the preconditioned queries against each batch's per-example gradients,
    layer by layer (one layer's gradients held at a time): one column per training example.
    A row statistic: under data parallelism the ranks' columns are gathered in rank order."""

    reduction = "rows"
    state_attrs = ("scores",)

    def __init__(self, layer_collection, layer_rows, per_layer):
        self.lc = layer_collection
        self.layer_rows = layer_rows  # layer_id -> callable((n, p_l) rows) -> (n_query, n)
        self.per_layer = per_layer
        self.rows_dim = 2 if per_layer else 1
        self.scores = []
        self.result = None

    def update(self, ctx):
        parts = []
        for lid in ctx.layer_ids():
            g = ctx.per_example_grad(lid)
            g = g[0] if g.shape[0] == 1 else g.sum(0)
            parts.append(self.layer_rows[lid](g))
            ctx.release(lid)
        s = torch.stack(parts) if self.per_layer else sum(parts[1:], parts[0])
        if ctx.first_chunk:
            self.scores.append(s)
        else:
            self.scores[-1] = self.scores[-1] + s

    def _seal(self):
        if isinstance(self.scores, list):
            self.scores = torch.cat(self.scores, dim=self.rows_dim) if self.scores else None

    def finalize(self, n):
        self._seal()
        self.result = self.scores


# ====================================================================== LiSSA
def _check_lissa_options(options):
    """LiSSA's options with their defaults filled in; a clear error for any other key or a bad
    value."""
    unknown = sorted(set(options) - set(LISSA_DEFAULTS))
    if unknown:
        raise ValueError(f"solver='lissa' takes solve_options {sorted(LISSA_DEFAULTS)}, got "
                         f"unknown {unknown} (tol / max_iter are the conjugate gradients' "
                         "options: solver='cg')")
    out = dict(LISSA_DEFAULTS, **options)
    for key in ("depth", "repeats"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"solve_options['{key}'] must be a positive int, got {v!r}")
    b = out["batch_size"]
    if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
        raise ValueError(f"solve_options['batch_size'] must be a positive int (examples drawn "
                         f"per step) or None (all the training examples: deterministic), "
                         f"got {b!r}")
    sc = out["scale"]
    if sc is not None and (isinstance(sc, bool) or not isinstance(sc, (int, float)) or
                           not math.isfinite(sc) or sc <= 0):
        raise ValueError(f"solve_options['scale'] must be a finite number > 0 (above half the "
                         f"largest eigenvalue of G + Λ) or None (estimated), got {sc!r}")
    if isinstance(out["seed"], bool) or not isinstance(out["seed"], int):
        raise ValueError(f"solve_options['seed'] must be an int, got {out['seed']!r}")
    return out


def _cat_batches(batches):
    """One batch holding the examples of ``batches`` (tensors, tuples/lists and dicts of them,
    concatenated along their first dimension)."""
    first = batches[0]
    if torch.is_tensor(first):
        return torch.cat(batches)
    if isinstance(first, Mapping):
        return {k: _cat_batches([b[k] for b in batches]) if torch.is_tensor(first[k]) else first[k]
                for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_cat_batches([b[i] for b in batches]) for i in range(len(first)))
    raise TypeError(f"LiSSA's mini-batches draw examples from tensors, tuples or dicts of "
                    f"tensors; a batch holds a {type(first).__name__}")


def _take(batch, idx):
    """The examples ``idx`` of one batch (every tensor indexed along its first dimension)."""
    if torch.is_tensor(batch):
        return batch[idx]
    if isinstance(batch, Mapping):
        return {k: _take(v, idx) if torch.is_tensor(v) else v for k, v in batch.items()}
    return type(batch)(_take(v, idx) for v in batch)


def _n_examples(batch):
    if torch.is_tensor(batch):
        return batch.shape[0]
    vals = batch.values() if isinstance(batch, Mapping) else batch
    return next(_n_examples(v) for v in vals if torch.is_tensor(v) or
                isinstance(v, (Mapping, tuple, list)))


class _ExampleDraws:
    """Mini-batches of training examples drawn uniformly without replacement (within a
    draw): from a ``DataLoader``'s map-style dataset through its ``collate_fn``, otherwise from
    the loader's batches concatenated once (the training set held in memory: LiSSA is for small
    models)."""

    def __init__(self, loader):
        ds = getattr(loader, "dataset", None)
        if isinstance(loader, torch.utils.data.DataLoader) and hasattr(ds, "__getitem__") \
                and hasattr(ds, "__len__"):
            self.n = len(ds)
            self.take = lambda idx: loader.collate_fn([ds[int(i)] for i in idx])
        else:
            batches = [b for b in iterate_batches(loader)]
            if not batches:
                raise ValueError("LiSSA: the training examples yielded no data (empty loader)")
            whole = _cat_batches(batches)
            self.n = _n_examples(whole)
            self.take = lambda idx: _take(whole, idx)

    def draw(self, size, generator):
        if size > self.n:
            raise ValueError(f"solve_options['batch_size']={size} exceeds the {self.n} "
                             "training examples")
        return self.take(torch.randperm(self.n, generator=generator)[:size])


def _lissa(B, product, lam, options, scale):
    """LiSSA (Agarwal, Bullins & Hazan 2017, as used by Koh & Liang 2017): ``(G + Λ)⁻¹ B`` for
    the rows of ``B`` ``(m, P)`` by the truncated Neumann series ``(A/s)⁻¹ = Σ_j (I − A/s)^j``,
    ``A = G + Λ``, run as the recursion ``X_0 = B``, ``X_{j+1} = B + X_j − A_j X_j / s`` and
    returned as ``X_depth / s``, averaged over ``repeats`` runs. ``A_j = G_j + Λ`` with ``G_j``
    the curvature of the step's mini-batch (``product(X, step_generator)``): unbiased, so the
    mean of the iterates follows the deterministic recursion. With the full training set at every
    step, the error after ``depth`` steps is at most ``(1 − μ_min / s)^{depth + 1}`` times
    ``||A⁻¹ B||`` for ``s ≥ μ_max`` (``μ`` the eigenvalues of ``A``), and the recursion
    diverges for ``s < μ_max / 2``."""
    depth, repeats = options["depth"], options["repeats"]
    bnorm = B.norm()
    total = torch.zeros_like(B)
    for r in range(repeats):
        gen = torch.Generator().manual_seed(options["seed"] + 7919 * r)
        X = B.clone()
        for j in range(depth):
            X = B + X - (product(X, gen) + lam * X) / scale
            if j % 16 == 15 or j == depth - 1:
                norm = X.norm()
                if not torch.isfinite(norm) or norm > 1e12 * max(float(bnorm), 1e-300):
                    raise ValueError(
                        f"LiSSA diverged (step {j + 1}, |X| = {float(norm):.3g}): the scale "
                        f"s = {scale:.4g} is below half the largest eigenvalue of G + Λ on "
                        "the steps' examples; raise solve_options['scale'] (mini-batches "
                        "have larger eigenvalues than the full set)")
        total += X
    return total / (scale * repeats)


# ====================================================================== the entry point
class Influence:
    """Influence scores ``I(z, q) = ∇θ m(q)ᵀ (G + Λ)⁻¹ ∇θ ℓ(z)`` of training examples ``z`` on
    queries ``q``.

    * ``ℓ(z) = loss_function(model outputs, *targets)``: the per-example training loss
      (default: cross-entropy on logits, one per position for sequences, summed over positions
      with ``positions='sum'``); ``m(q)`` the query's ``measurement`` (default: the same loss).
    * ``G``: the curvature of the training loss, the mean over the training examples, built by
      `fit` with the library's entry points: ``curvature='ggn'`` (default,
      ``GGN(loss_function)``, for the cross-entropy the Fisher in closed form), ``'fisher'``
      (``FIM(variant=)``), ``'mc'`` (``FIM_MonteCarlo(variant=, trials=, seed=)``) or
      ``'empirical'`` (``EmpiricalFisher(loss_function)``, one backward direction: the choice
      for language models), in ``representation``: ``PMatEKFAC`` (default; its eigenvalues
      refitted on the training data after the KFAC pass, [`PMatEKFAC.update_diag`][nngeometry.object.pspace.PMatEKFAC.update_diag]),
      ``PMatKFAC``, ``PMatDiag``, ``PMatBlockDiag``, ``PMatLowRank``, ``PMatDense``,
      ``PMatImplicit`` (conjugate-gradient or LiSSA solves, ``solver=``, no matrix stored),
      ``PMatMixed`` (a representation per group of layers, given by ``curvature_options=
      {'layer_map': {layer_id: group}, 'sub_pmats': {group: PMat class}}``; its EKFAC groups
      refitted as above, its KFAC groups damped exactly) or ``PMatEye`` (``G = I``:
      the scores are gradient similarities, TracIn's at one checkpoint when ``damping=0``).
    * ``Λ``: ``damping`` a number ``λ`` (``λI``), a dict ``{layer_id: λ_l}`` or ``'heuristic'``
      (default): ``λ_l = 0.1 · tr(G_l) / p_l``, a tenth of the mean eigenvalue of each layer's
      diagonal block (kronfluence's default heuristic, per layer). Solves are exact for
      ``(G + Λ)`` in every representation (KFAC's too: ``damping='exact'`` through the
      eigendecompositions of the factors, not π-damping, unless ``solve_options`` says so).

    Shapes: [`pairwise_scores`][nngeometry.influence.Influence.pairwise_scores] returns ``(n_query, n_train)`` (``(n_layers, n_query,
    n_train)`` with ``per_layer=True``, the layers in the collection's order, summing to the
    scores), [`self_scores`][nngeometry.influence.Influence.self_scores] ``(n_train,)`` (``(n_layers, n_train)``).

    Args:
        model: the ``torch.nn.Module`` (in eval mode, or deterministic).
        representation: the ``PMat*`` class of ``G``.
        damping: see above.
        loss_function: ``loss_function(outputs, *targets) -> (n,)`` per-example losses, a name
            (``'cross_entropy'``, ``'mse'``, ``'bce_with_logits'``) or a ``torch.nn`` loss with
            ``reduction='none'``; for Hugging Face causal language models
            [`causal_lm_loss`][nngeometry.influence.causal_lm_loss] (the model's own ``.loss`` per sequence). ``targets`` is
            ``batch[1:]`` or ``(batch['labels'],)`` for dict batches.
        measurement: ``measurement(outputs, *targets) -> (n,)`` for the queries (e.g.
            [`causal_lm_log_prob`][nngeometry.influence.causal_lm_log_prob] of a completion); default the loss.
        curvature: ``'ggn'``, ``'fisher'``, ``'mc'`` or ``'empirical'`` (see above).
        variant: the likelihood of ``'fisher'`` / ``'mc'`` (see ``FIM``).
        trials: the sampled targets per example of ``'mc'`` (see ``FIM_MonteCarlo``).
        seed: the seed of ``'mc'``'s draws (see ``FIM_MonteCarlo``).
        function: ``function(*batch) -> outputs``; default the model on ``batch[0]`` (or
            ``model(**batch)`` without the targets' key for dict batches, its ``.logits``).
        layer_collection: the parameters ``θ`` (default all the layers of the model).
        positions: ``'sum'`` or ``'mean'`` of a loss per position over the positions.
        target_key: the targets' key in dict batches.
        refit_eigenvalues: EKFAC only: refit the eigenvalues on the training data (default).
        query_rank: keep each preconditioned query gradient as rank-``r`` matrices per layer
            (the truncated SVD of the layer's ``[W | b]`` view, the best rank-``r``
            approximation; layers without a matrix view are kept in full); ``None``: in full.
        dtype: storage dtype of the preconditioned query gradients (default: the model's;
            ``torch.float32`` or ``torch.bfloat16`` to halve memory); scores are computed in
            the model's dtype.
        solve_options: extra keywords of the representation's ``solvePFMap`` (e.g.
            ``{'tol': 1e-10, 'max_iter': 200}`` for ``PMatImplicit``); default
            ``{'damping': 'exact'}`` for ``PMatKFAC``. With ``solver='lissa'``, LiSSA's:
            ``depth`` (steps of the recursion, default 1000), ``scale`` (``s``, above half the
            largest eigenvalue of ``G + Λ``; default ``None``: 1.25 times the largest
            eigenvalue of ``G`` by 20 power iterations, plus the largest ``λ``), ``repeats`` (independent runs averaged, default 1),
            ``batch_size`` (training examples drawn per step; default ``None``: the whole
            training set at every step, deterministic) and ``seed`` (of the draws, default 0).
        curvature_options: extra keywords of the curvature entry point (e.g. ``kfac_approx``).
        verbose: progress bars over the batches.
        check_deterministic: as for the entry points.
        distributed: data parallelism over ``torch.distributed`` (``None``: on when a process
            group of more than one rank is initialised; see the page "Data-parallel and GPU"):
            each rank passes its shard of the training data; the curvature is reduced over the
            ranks, every rank preconditions the same (whole) query set, and the scores'
            training columns are gathered in rank order.
        process_group: the group of ranks (default: the world).
        solver: how ``PMatImplicit`` solves ``(G + Λ) x = ∇m(q)``: ``'cg'`` (conjugate
            gradients, default) or ``'lissa'`` (LiSSA, the stochastic Neumann series of
            Agarwal et al. 2017 used by Koh & Liang 2017: ``X_0 = b``,
            ``X_{j+1} = b + X_j − (G_j + Λ) X_j / s``, ``x ≈ X_depth / s``, ``G_j`` the
            curvature of the step's mini-batch of training examples (the mean over them), or of
            all of them with ``batch_size=None``); its options in ``solve_options``.
    """

    def __init__(self, model, representation=PMatEKFAC, damping="heuristic", loss_function=None,
                 measurement=None, curvature="ggn", variant="classif_logits", trials=1,
                 seed=None, function=None, layer_collection=None, positions="sum",
                 target_key="labels", refit_eigenvalues=True, query_rank=None, dtype=None,
                 solve_options=None, curvature_options=None, verbose=False,
                 check_deterministic=True, distributed=None, process_group=None, solver="cg"):
        if curvature not in _CURVATURES:
            raise ValueError(f"curvature={curvature!r}: use one of {', '.join(map(repr, _CURVATURES))}")
        if not (isinstance(representation, type) and issubclass(representation, PMatAbstract)):
            raise TypeError(f"representation must be a PMat* class (PMatEKFAC, PMatKFAC, "
                            f"PMatDiag, PMatDense, ...), got {representation!r}")
        _check_damping(damping)
        if query_rank is not None and (isinstance(query_rank, bool) or
                                       not isinstance(query_rank, int) or query_rank < 1):
            raise ValueError(f"query_rank must be a positive int (or None: no compression), "
                             f"got {query_rank!r}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        check_positions(positions)
        resolve_group(distributed, process_group)
        _refuse_sharded(model)
        self.model = unwrap_model(model)
        self.function, self.layer_collection = prepare_entry(self.model, function,
                                                             layer_collection, target_key)
        self.representation = representation
        self.damping = damping
        self.loss_function = loss_function
        self.measurement = measurement
        self.curvature = curvature
        self.variant = variant
        self.trials = trials
        self.seed = seed
        self.positions = positions
        self.target_key = target_key
        self.refit_eigenvalues = refit_eigenvalues
        self.query_rank = query_rank
        self.dtype = dtype
        if solver not in _SOLVERS:
            raise ValueError(f"solver={solver!r}: use 'cg' (conjugate gradients) or 'lissa' "
                             "(stochastic Neumann series)")
        self.solver = solver
        self.solve_options = dict(solve_options or {})
        if solver == "lissa":
            if not issubclass(representation, PMatImplicit):
                raise ValueError(f"solver='lissa' solves with an implicit curvature: pass "
                                 f"representation=PMatImplicit ({representation.__name__} is "
                                 "stored and solved exactly)")
            self.solve_options = _check_lissa_options(self.solve_options)
            if self.solve_options["batch_size"] is not None and \
                    resolve_group(distributed, process_group) is not None:
                raise ValueError("solver='lissa' with mini-batches (batch_size) draws examples "
                                 "from one process's data: not supported with data "
                                 "parallelism; use batch_size=None (the full set) or 'cg'")
        if issubclass(representation, (PMatKFAC, PMatMixed)):
            # (a PMatMixed passes it to its KFAC groups)
            self.solve_options.setdefault("damping", "exact")
        if issubclass(representation, PMatMixed) and not \
                {"sub_pmats", "data"} & set(curvature_options or {}):
            raise ValueError("representation=PMatMixed needs its groups: pass curvature_options="
                             "{'layer_map': {layer_id: group}, 'sub_pmats': {group: PMat class}} "
                             "(e.g. {'a': PMatEKFAC, 'b': PMatDense})")
        self.curvature_options = dict(curvature_options or {})
        self.verbose = verbose
        self.check_deterministic = check_deterministic
        self.distributed = distributed
        self.process_group = process_group
        self.matrix = None
        self.damping_value = None
        self._lissa_draws = None
        self._lissa_scale = None

    # ------------------------------------------------------------------ the curvature
    def fit(self, train_loader):
        """Build ``G`` (the mean over ``train_loader``'s examples) and resolve the damping.
        Returns ``self``; the matrix is ``self.matrix``, the damping used ``self.damping_value``
        (a number or ``{layer_id: λ_l}``)."""
        if issubclass(self.representation, PMatEye):
            lc = self.layer_collection
            ref = next(self.model.parameters())
            self.matrix = PMatEye(lc, scaling=torch.tensor(1.0, dtype=lc.dtype or ref.dtype,
                                                           device=lc.device or ref.device))
        else:
            self.matrix = self._build(train_loader)
            if self.refit_eigenvalues:
                parts = self.matrix.data.values() if isinstance(self.matrix, PMatMixed) \
                    else [self.matrix]
                for part in parts:
                    if isinstance(part, PMatEKFAC):
                        part.update_diag(train_loader)
        self.damping_value = self._resolve_damping()
        return self

    def _build(self, loader):
        common = dict(function=self.function, layer_collection=self.layer_collection,
                      verbose=self.verbose, check_deterministic=self.check_deterministic,
                      positions=self.positions, target_key=self.target_key,
                      distributed=self.distributed, process_group=self.process_group,
                      **self.curvature_options)
        rep = self.representation
        if self.curvature == "ggn":
            loss = "cross_entropy" if self.loss_function is None else self.loss_function
            return GGN(self.model, loader, rep, loss, **common)
        if self.curvature == "fisher":
            return FIM(self.model, loader, rep, variant=self.variant, **common)
        if self.curvature == "mc":
            return FIM_MonteCarlo(self.model, loader, rep, variant=self.variant,
                                  trials=self.trials, seed=self.seed, **common)
        return EmpiricalFisher(self.model, loader, rep, loss_function=self.loss_function,
                               **common)

    def _resolve_damping(self):
        if isinstance(self.damping, str):
            diag = self.matrix.get_diag()
            diag = diag.get_flat_representation() if hasattr(diag, "get_flat_representation") \
                else diag
            lc = self.layer_collection
            return {lid: HEURISTIC_FACTOR * float(diag[lc.slice(lid)].mean())
                    for lid in lc.layer_ids()}
        if isinstance(self.damping, dict):
            missing = [lid for lid in self.layer_collection.layer_ids() if lid not in self.damping]
            extra = [lid for lid in self.damping if lid not in self.layer_collection.layers]
            if missing or extra:
                raise ValueError(f"damping dict must give one λ per layer of the collection: "
                                 f"missing {missing}, unknown {extra}")
        return self.damping

    def _check_fitted(self):
        if self.matrix is None:
            raise RuntimeError("Influence: call fit(train_loader) first (or load_state_dict)")

    # ------------------------------------------------------------------ gradients
    def _generator(self, loss, distributed=False):
        return TorchHooksJacobianBackend(
            self.model, empirical_function(self.function, loss, self.positions, self.target_key),
            layer_collection=self.layer_collection, verbose=False,
            check_deterministic=self.check_deterministic, distributed=distributed,
            process_group=self.process_group if distributed else None)

    def _batch_gradients(self, generator, batch):
        """``(n_batch, P)``: the per-example gradients of one batch."""
        return generator.get_jacobian([batch], self.layer_collection)[0]

    def _solve(self, G):
        """``(G + Λ)⁻¹`` applied to the rows of ``G`` ``(m, P)``."""
        if self.solver == "lissa":
            return self._solve_lissa(G)
        X = PFMapDense(self.layer_collection, data=G.unsqueeze(0))
        return self.matrix.solvePFMap(X, regul=self.damping_value,
                                      **self.solve_options).to_torch()[0]

    def _damping_flat(self, like):
        """``Λ`` as a scalar or a ``(P,)`` tensor of ``like``'s dtype and device."""
        lam = self.damping_value
        if not isinstance(lam, dict):
            return float(lam)
        lc = self.layer_collection
        d = like.new_zeros(lc.numel())
        for lid in lc.layer_ids():
            d[lc.slice(lid)] = float(lam[lid])
        return d

    def _solve_lissa(self, B):
        M, opts, lc = self.matrix, self.solve_options, self.layer_collection
        lam = self._damping_flat(B)
        if opts["batch_size"] is None:
            def product(X, gen):
                return M._mm_rows(X)
        else:
            if self._lissa_draws is None:
                self._lissa_draws = _ExampleDraws(M.examples)
            draws, size = self._lissa_draws, opts["batch_size"]

            def product(X, gen):
                # the matrix's own product on the step's examples (the mean over them)
                return M.scale * M._gen().implicit_mm(X, [draws.draw(size, gen)], lc) + \
                    M.shift * X
        scale = opts["scale"]
        if scale is None:
            if self._lissa_scale is None:
                self._lissa_scale = self._estimate_scale(B, lam)
            scale = self._lissa_scale
        return _lissa(B, product, lam, opts, float(scale))

    def _estimate_scale(self, like, lam, iterations=20):
        """LiSSA's default scale: 1.25 times ``μ_G + max Λ``, an upper bound of the largest
        eigenvalue of ``G + Λ`` with ``μ_G`` the largest eigenvalue of ``G`` (the full training
        set) estimated by ``iterations`` power iterations from a fixed random start (from
        below: the recursion converges for ``s > μ_max / 2``)."""
        g = torch.Generator().manual_seed(0)
        v = torch.randn(1, like.shape[1], generator=g, dtype=torch.float64).to(like)
        v = v / v.norm()
        mu = 0.0
        for _ in range(iterations):
            w = self.matrix._mm_rows(v)
            mu = float((v * w).sum())
            nw = w.norm()
            if not nw > 0:
                break
            v = w / nw
        lam_max = float(lam.max()) if torch.is_tensor(lam) else lam
        return 1.25 * max(mu + lam_max, torch.finfo(like.dtype).tiny)

    def _progress(self, it, loader, what):
        if not self.verbose:
            return it
        total = len(loader) if hasattr(loader, "__len__") and \
            isinstance(loader, torch.utils.data.DataLoader) else None
        return tqdm(it, total=total, desc=what, unit="batch")

    def query_gradients(self, query_loader):
        """``(n_query, P)``: ``∇θ m(q)`` of every query (not preconditioned)."""
        gen = self._generator(self.measurement if self.measurement is not None
                              else self.loss_function)
        return torch.cat([self._batch_gradients(gen, b) for b in iterate_batches(query_loader)])

    def precondition(self, query_loader):
        """The preconditioned query gradients ``(G + Λ)⁻¹ ∇θ m(q)``, computed once, batch by
        batch, and kept per layer in ``dtype`` (low-rank factors with ``query_rank``): a plain
        dict (``torch.save`` / ``torch.load`` it as is) to pass to [`pairwise_scores`][nngeometry.influence.Influence.pairwise_scores] as
        ``queries=``. Entries: ``'layers'`` ``{layer_id: (n_query, p_l) tensor or (L, R)}``
        (the layer's ``[W | b]`` view is ``L Rᵀ``, ``L`` ``(n_query, out, r)``, ``R``
        ``(n_query, cols, r)``), ``'n'`` the number of queries."""
        self._check_fitted()
        gen = self._generator(self.measurement if self.measurement is not None
                              else self.loss_function)
        lc = self.layer_collection
        pieces = {lid: [] for lid in lc.layer_ids()}
        # the (out, cols) matrix view of the layers whose queries are kept at low rank
        low_rank = {}
        if self.query_rank is not None:
            for lid in lc.layer_ids():
                shape = _matrix_shape(lc[lid])
                if shape is not None and self.query_rank < min(shape):
                    low_rank[lid] = shape
        n = 0
        for batch in self._progress(iterate_batches(query_loader), query_loader, "queries"):
            G = self._batch_gradients(gen, batch)
            n += G.shape[0]
            # a stored matrix solves each row on its own: a few rows at a time bound the
            # solve's intermediate copies (the matrix-free solvers keep the batch together:
            # their iterations and random draws are the batch's)
            step = G.shape[0] if isinstance(self.matrix, PMatImplicit) else \
                max(1, _SOLVE_CHUNK_BYTES // (G.shape[1] * G.element_size()))
            for i in range(0, G.shape[0], step):
                Q = self._solve(G[i:i + step])
                for lid in lc.layer_ids():
                    rows = Q[:, lc.slice(lid)]
                    if lid in low_rank:
                        L, R = _compress(rows, low_rank[lid], lc[lid].has_bias(), self.query_rank)
                        pieces[lid].append((self._store(L), self._store(R)))
                    else:
                        pieces[lid].append(self._store(rows))
                del Q
            del G
        layers = {}
        for lid, p in pieces.items():
            if isinstance(p[0], tuple):
                layers[lid] = (torch.cat([a for a, _ in p]), torch.cat([b for _, b in p]))
            else:
                layers[lid] = torch.cat(p)
        return {"layers": layers, "n": n}

    def _store(self, t):
        return t.detach().to(self.dtype) if self.dtype is not None else t.detach()

    # ------------------------------------------------------------------ scores
    def pairwise_scores(self, train_loader, query_loader=None, queries=None, per_layer=False,
                        checkpoint=None, checkpoint_every=1):
        """``(n_query, n_train)``: ``I(z_j, q_i) = ∇θ m(q_i)ᵀ (G + Λ)⁻¹ ∇θ ℓ(z_j)``.

        The queries are preconditioned once (or given: ``queries=`` from [`precondition`][nngeometry.influence.Influence.precondition]);
        the training gradients are streamed batch by batch, layer by layer, and never stored
        for the whole set. ``per_layer=True``: ``(n_layers, n_query, n_train)``, each layer's
        share ``((G + Λ)⁻¹ ∇m(q))_l · ∇ℓ(z)_l`` (they sum to the scores; for a block-diagonal
        ``G`` (EKFAC, KFAC, Diag, BlockDiag, Eye) it is the influence through that layer
        alone).

        Resuming: with ``checkpoint`` a file path, the scores are computed by chunks of
        ``checkpoint_every`` training batches, and after each chunk the preconditioned queries
        and the scores so far are written there (``torch.save``, loadable with the defaults;
        replaced atomically). A call whose checkpoint exists starts where it stopped: it uses
        the saved queries (``query_loader`` / ``queries`` may then be omitted; ``queries``
        given must equal the saved ones; a ``query_loader`` is not run again) and skips the
        training batches already scored, so ``train_loader`` must yield the same batches in the
        same order (no shuffling, or a seeded sampler). The result equals an uninterrupted
        run's. Not with data parallelism."""
        self._check_fitted()
        lc = self.layer_collection
        state = None
        if checkpoint is not None:
            if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or \
                    checkpoint_every < 1:
                raise ValueError(f"checkpoint_every must be a positive int (training batches "
                                 f"per saved chunk), got {checkpoint_every!r}")
            if resolve_group(self.distributed, self.process_group) is not None:
                raise ValueError("checkpoint= is not supported with data parallelism (each rank "
                                 "would need its own file and the columns their rank order)")
            if os.path.exists(checkpoint):
                state = self._load_checkpoint(checkpoint, queries, per_layer)
                queries = state["queries"]
        if state is None and (query_loader is None) == (queries is None):
            raise ValueError("pass either query_loader= or queries= (from precondition()), "
                             "exactly one")
        if queries is None:
            queries = self.precondition(query_loader)
        if set(queries["layers"]) != set(lc.layer_ids()):
            raise ValueError("queries were preconditioned on other layers than this Influence's "
                             f"collection: {sorted(queries['layers'])} vs {lc.layer_ids()}")

        def rows_of(lid):
            entry = queries["layers"][lid]
            has_bias = lc[lid].has_bias()
            shape = _matrix_shape(lc[lid])

            return lambda g: _layer_scores(entry, shape, has_bias, g)

        rows = {lid: rows_of(lid) for lid in lc.layer_ids()}
        gen = self._generator(self.loss_function, distributed=self.distributed)
        gen.verbose = self.verbose
        if checkpoint is None:
            return gen.accumulate(train_loader, lc, _PairwiseScores(lc, rows, per_layer)).result
        return self._chunked_scores(gen, train_loader, rows, per_layer, queries, state,
                                    checkpoint, checkpoint_every)

    def _chunked_scores(self, gen, train_loader, rows, per_layer, queries, state, path, every):
        lc = self.layer_collection
        done = state["batches"] if state is not None else 0
        parts = [state["scores"]] if state is not None and state["scores"] is not None else []

        def save():
            scores = torch.cat(parts, dim=-1) if parts else None
            tmp = f"{path}.tmp"
            torch.save({"queries": queries, "scores": scores, "batches": done,
                        "per_layer": per_layer, "layer_ids": list(lc.layer_ids())}, tmp)
            os.replace(tmp, path)
        if state is None:
            save()  # the preconditioned queries, before the first chunk
        batches = iterate_batches(train_loader)
        for _ in range(done):
            if next(batches, None) is None:
                raise ValueError(f"the checkpoint {path} holds the scores of {done} training "
                                 "batches, train_loader yields fewer: pass the loader it was "
                                 "computed with")
        chunk = []
        for batch in self._progress(batches, train_loader, "scores"):
            chunk.append(batch)
            if len(chunk) == every:
                parts.append(gen.accumulate(chunk, lc, _PairwiseScores(lc, rows, per_layer))
                             .result)
                done += len(chunk)
                chunk = []
                save()
        if chunk:
            parts.append(gen.accumulate(chunk, lc, _PairwiseScores(lc, rows, per_layer)).result)
            done += len(chunk)
            save()
        if not parts:
            raise ValueError("pairwise_scores: the training examples yielded no data "
                             "(empty loader)")
        return torch.cat(parts, dim=-1)

    def _load_checkpoint(self, path, queries, per_layer):
        state = torch.load(path)
        lc = self.layer_collection
        if not isinstance(state, dict) or not {"queries", "scores", "batches"} <= set(state):
            raise ValueError(f"{path} is not a checkpoint of pairwise_scores")
        if list(state["layer_ids"]) != list(lc.layer_ids()) or state["per_layer"] != per_layer:
            raise ValueError(f"the checkpoint {path} was written for other layers or another "
                             f"per_layer ({state['layer_ids']}, per_layer={state['per_layer']}): "
                             "use another file")
        if queries is not None and not _same_queries(queries, state["queries"]):
            raise ValueError(f"the queries given differ from those saved in the checkpoint "
                             f"{path}: use another file, or omit queries= to resume")
        return state

    def self_scores(self, train_loader, per_layer=False):
        """``(n_train,)``: ``∇θ ℓ(z)ᵀ (G + Λ)⁻¹ ∇θ ℓ(z)`` (the training loss on both sides), one
        solve per batch of training examples. ``per_layer=True``: ``(n_layers, n_train)``."""
        self._check_fitted()
        gen = self._generator(self.loss_function)
        lc = self.layer_collection
        out = []
        for batch in self._progress(iterate_batches(train_loader), train_loader, "self-scores"):
            G = self._batch_gradients(gen, batch)
            prod = G * self._solve(G).to(G.dtype)
            out.append(torch.stack([prod[:, lc.slice(lid)].sum(1) for lid in lc.layer_ids()])
                       if per_layer else prod.sum(1))
        group = resolve_group(self.distributed, self.process_group)
        if group is None and not out:
            raise ValueError("self_scores: the training examples yielded no data (empty loader)")
        scores = torch.cat(out, dim=-1) if out else None
        if group is not None:
            # a rank whose shard is empty takes part with no rows
            dim = 1 if per_layer else 0
            count = scores.shape[-1] if scores is not None else 0
            device = next(self.model.parameters()).device
            scores, _ = all_gather_rows(scores, count, group, dim, "self_scores", device)
        return scores

    # ------------------------------------------------------------------ saving
    def state_dict(self):
        """The fitted curvature and damping as plain tensors, dicts, tuples and numbers:
        ``torch.save`` it, ``torch.load`` it with the defaults (``weights_only=True``), and
        `load_state_dict` it into an ``Influence`` of the same model. ``PMatImplicit``
        stores no matrix (refit it instead)."""
        self._check_fitted()
        parts = self.matrix.data.values() if isinstance(self.matrix, PMatMixed) else [self.matrix]
        if any(isinstance(m, PMatImplicit) for m in parts):
            raise ValueError("PMatImplicit stores no matrix (its products run the model on the "
                             "training data): call fit(train_loader) again instead of saving it")
        if isinstance(self.matrix, PMatMixed):
            # each group as its class's name, its layers and its data
            data = {g: {"representation": type(m).__name__,
                        "layer_ids": list(m.layer_collection.layer_ids()),
                        "data": m.scaling if isinstance(m, PMatEye) else m.data}
                    for g, m in self.matrix.data.items()}
        else:
            data = self.matrix.scaling if isinstance(self.matrix, PMatEye) else self.matrix.data
        damping = self.damping_value
        if isinstance(damping, dict):
            damping = {k: float(v) for k, v in damping.items()}
        elif torch.is_tensor(damping):
            damping = float(damping)
        return {"representation": type(self.matrix).__name__, "data": data,
                "damping": damping, "layer_ids": list(self.layer_collection.layer_ids())}

    def load_state_dict(self, state):
        """Restore what [`state_dict`][nngeometry.object.pspace.abstract.PMatAbstract.state_dict] saved (the model and collection are this object's)."""
        name = state.get("representation")
        if name != self.representation.__name__:
            raise ValueError(f"the state holds a {name}, this Influence uses "
                             f"{self.representation.__name__}")
        if list(state["layer_ids"]) != list(self.layer_collection.layer_ids()):
            raise ValueError("the state was saved for other layers: "
                             f"{state['layer_ids']} vs {self.layer_collection.layer_ids()}")
        if issubclass(self.representation, PMatEye):
            self.matrix = PMatEye(self.layer_collection, scaling=state["data"])
        elif issubclass(self.representation, PMatMixed):
            from .object import pspace
            lc, subs, each = self.layer_collection, {}, {}
            for g, part in state["data"].items():
                cls = getattr(pspace, part["representation"])
                each[g] = lc.sub(part["layer_ids"])
                subs[g] = PMatEye(each[g], scaling=part["data"]) if cls is PMatEye else \
                    cls(layer_collection=each[g], data=part["data"])
            self.matrix = PMatMixed(lc, None, layer_collection_each=each, sub_pmats=subs)
        else:
            self.matrix = self.representation(layer_collection=self.layer_collection,
                                              data=state["data"])
        self.damping_value = state["damping"]
        return self


def _refuse_sharded(model):
    """A clear error for a model whose parameters are sharded over the ranks (FSDP)."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a build of torch without torch.distributed
        return
    for name, m in model.named_modules():
        if isinstance(m, FullyShardedDataParallel) or FSDPModule in type(m).__mro__:
            where = f" (module '{name}')" if name else ""
            raise ValueError(
                f"Influence: the model is sharded with FSDP{where}, which is not supported: "
                "the per-example gradients are read from each layer's whole weight and every "
                "rank keeps the whole curvature and preconditioned queries. Pass the unsharded "
                "model (data parallelism: DistributedDataParallel or distributed=True)")


def _same_queries(a, b):
    """Whether two dicts of preconditioned queries hold the same tensors."""
    if a.get("n") != b.get("n") or set(a["layers"]) != set(b["layers"]):
        return False
    for lid, x in a["layers"].items():
        y = b["layers"][lid]
        xs, ys = (x, y) if isinstance(x, tuple) else ((x,), (y,))
        if not isinstance(y, type(x)) or len(xs) != len(ys) or \
                not all(torch.equal(u, v) for u, v in zip(xs, ys)):
            return False
    return True


def _check_damping(damping):
    if isinstance(damping, str):
        if damping != "heuristic":
            raise ValueError(f"damping={damping!r}: use a number ≥ 0, a dict {{layer_id: λ}} or "
                             "'heuristic' (a tenth of each layer's mean eigenvalue)")
        return
    values = damping.values() if isinstance(damping, dict) else [damping]
    for v in values:
        if isinstance(v, bool) or not (isinstance(v, (int, float)) or
                                       (torch.is_tensor(v) and v.numel() == 1)):
            raise TypeError(f"damping must be a number ≥ 0, a dict {{layer_id: λ}} or "
                            f"'heuristic', got {damping!r}")
        if not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"damping must be finite and ≥ 0, got {float(v)}")


__all__ = ["Influence", "causal_lm_loss", "causal_lm_log_prob", "HEURISTIC_FACTOR"]
