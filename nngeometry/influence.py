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

import torch
import torch.nn.functional as F

from ._entry import prepare_entry
from .backend import TorchHooksJacobianBackend
from .backend import consumers as C
from .backend.batches import iterate_batches
from .backend.distributed import resolve_group, unwrap_model
from .metrics import FIM, FIM_MonteCarlo, EmpiricalFisher, GGN
from .object.map import PFMapDense
from .object.pspace import (PMatAbstract, PMatEKFAC, PMatEye, PMatImplicit, PMatKFAC)
from .curvature import check_positions, empirical_function

_CURVATURES = ("ggn", "fisher", "mc", "empirical")
#: the mean-eigenvalue damping heuristic: ``λ_l = HEURISTIC_FACTOR · tr(G_l) / p_l``
HEURISTIC_FACTOR = 0.1


# ====================================================================== losses of language models
def _next_token_nll(logits, labels, who):
    """``(per_token, targets)``: the cross-entropy of token ``t + 1`` given the tokens up to
    ``t`` (logits shifted left, labels shifted right), ``(n, T - 1)``, zero where the label is
    ``-100``, and the shifted labels."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"{who} takes logits (n, T, V) and labels (n, T), got shapes "
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


def _from_matrix(mat, has_bias):
    """Inverse of `_to_matrix`."""
    m = mat.shape[0]
    if not has_bias:
        return mat.reshape(m, -1)
    return torch.cat([mat[:, :, :-1].reshape(m, -1), mat[:, :, -1]], dim=1)


def _compress(rows, shape, has_bias, rank):
    """The best rank-``rank`` approximation (truncated SVD, Eckart–Young) of each row's matrix
    view: ``(L, R)`` with ``L`` ``(m, out, r)`` (singular values folded in) and ``R``
    ``(m, cols, r)``, so that the matrix is ``L Rᵀ``."""
    U, S, Vh = torch.linalg.svd(_to_matrix(rows, shape, has_bias), full_matrices=False)
    r = min(rank, S.shape[1])
    return U[:, :, :r] * S[:, None, :r], Vh[:, :r, :].transpose(1, 2)


def _expand(entry, shape, has_bias):
    """The ``(m, p_l)`` rows of a stored layer entry (a tensor, or low-rank factors)."""
    if isinstance(entry, torch.Tensor):
        return entry
    L, R = entry
    return _from_matrix(L @ R.transpose(1, 2), has_bias)


# ====================================================================== streamed scores
class _PairwiseScores(C.Consumer):
    """Scores of the preconditioned queries against each batch's per-example gradients,
    layer by layer (one layer's gradients held at a time): one column per training example.
    A row statistic: under data parallelism the ranks' columns are gathered in rank order."""

    reduction = "rows"
    state_attrs = ("scores",)

    def __init__(self, layer_collection, layer_rows, per_layer):
        self.lc = layer_collection
        self.layer_rows = layer_rows  # layer_id -> callable(dtype, device) -> (n_query, p_l)
        self.per_layer = per_layer
        self.rows_dim = 2 if per_layer else 1
        self.scores = []
        self.result = None

    def update(self, ctx):
        parts = []
        for lid in ctx.layer_ids():
            g = ctx.per_example_grad(lid)
            g = g[0] if g.shape[0] == 1 else g.sum(0)
            parts.append(self.layer_rows[lid](g.dtype, g.device) @ g.t())
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
      ``PMatImplicit`` (conjugate-gradient solves, no matrix stored) or ``PMatEye`` (``G = I``:
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
            ``{'damping': 'exact'}`` for ``PMatKFAC``.
        curvature_options: extra keywords of the curvature entry point (e.g. ``kfac_approx``).
        verbose: progress bars over the batches.
        check_deterministic: as for the entry points.
        distributed: data parallelism over ``torch.distributed`` (``None``: on when a process
            group of more than one rank is initialised; see the page "Data-parallel and GPU"):
            each rank passes its shard of the training data; the curvature is reduced over the
            ranks, every rank preconditions the same (whole) query set, and the scores'
            training columns are gathered in rank order.
        process_group: the group of ranks (default: the world).
    """

    def __init__(self, model, representation=PMatEKFAC, damping="heuristic", loss_function=None,
                 measurement=None, curvature="ggn", variant="classif_logits", trials=1,
                 seed=None, function=None, layer_collection=None, positions="sum",
                 target_key="labels", refit_eigenvalues=True, query_rank=None, dtype=None,
                 solve_options=None, curvature_options=None, verbose=False,
                 check_deterministic=True, distributed=None, process_group=None):
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
        self.solve_options = dict(solve_options or {})
        if issubclass(representation, PMatKFAC):
            self.solve_options.setdefault("damping", "exact")
        self.curvature_options = dict(curvature_options or {})
        self.verbose = verbose
        self.check_deterministic = check_deterministic
        self.distributed = distributed
        self.process_group = process_group
        self.matrix = None
        self.damping_value = None

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
            if isinstance(self.matrix, PMatEKFAC) and self.refit_eigenvalues:
                self.matrix.update_diag(train_loader)
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
        X = PFMapDense(self.layer_collection, data=G.unsqueeze(0))
        return self.matrix.solvePFMap(X, regul=self.damping_value,
                                      **self.solve_options).to_torch()[0]

    def _progress(self, it, loader, what):
        if not self.verbose:
            return it
        from tqdm.auto import tqdm
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
        n = 0
        for batch in self._progress(iterate_batches(query_loader), query_loader, "queries"):
            Q = self._solve(self._batch_gradients(gen, batch))
            n += Q.shape[0]
            for lid in lc.layer_ids():
                rows = Q[:, lc.slice(lid)]
                shape = _matrix_shape(lc[lid]) if self.query_rank is not None else None
                if shape is not None and self.query_rank < min(shape):
                    L, R = _compress(rows, shape, lc[lid].has_bias(), self.query_rank)
                    pieces[lid].append((self._store(L), self._store(R)))
                else:
                    pieces[lid].append(self._store(rows))
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
    def pairwise_scores(self, train_loader, query_loader=None, queries=None, per_layer=False):
        """``(n_query, n_train)``: ``I(z_j, q_i) = ∇θ m(q_i)ᵀ (G + Λ)⁻¹ ∇θ ℓ(z_j)``.

        The queries are preconditioned once (or given: ``queries=`` from [`precondition`][nngeometry.influence.Influence.precondition]);
        the training gradients are streamed batch by batch, layer by layer, and never stored
        for the whole set. ``per_layer=True``: ``(n_layers, n_query, n_train)``, each layer's
        share ``((G + Λ)⁻¹ ∇m(q))_l · ∇ℓ(z)_l`` (they sum to the scores; for a block-diagonal
        ``G`` (EKFAC, KFAC, Diag, BlockDiag, Eye) it is the influence through that layer
        alone)."""
        self._check_fitted()
        if (query_loader is None) == (queries is None):
            raise ValueError("pass either query_loader= or queries= (from precondition()), "
                             "exactly one")
        if queries is None:
            queries = self.precondition(query_loader)
        lc = self.layer_collection
        if set(queries["layers"]) != set(lc.layer_ids()):
            raise ValueError("queries were preconditioned on other layers than this Influence's "
                             f"collection: {sorted(queries['layers'])} vs {lc.layer_ids()}")

        def rows_of(lid):
            entry = queries["layers"][lid]
            has_bias = lc[lid].has_bias()
            shape = _matrix_shape(lc[lid])

            def get(dtype, device):
                return _expand(entry, shape, has_bias).to(device=device, dtype=dtype)
            return get

        consumer = _PairwiseScores(lc, {lid: rows_of(lid) for lid in lc.layer_ids()}, per_layer)
        gen = self._generator(self.loss_function, distributed=self.distributed)
        gen.verbose = self.verbose
        return gen.accumulate(train_loader, lc, consumer).result

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
            from .backend.distributed import all_gather_rows
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
        if isinstance(self.matrix, PMatImplicit):
            raise ValueError("PMatImplicit stores no matrix (its products run the model on the "
                             "training data): call fit(train_loader) again instead of saving it")
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
        else:
            self.matrix = self.representation(layer_collection=self.layer_collection,
                                              data=state["data"])
        self.damping_value = state["damping"]
        return self


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
