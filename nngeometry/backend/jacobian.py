"""The Jacobian generator: runs the model over the data and feeds per-layer statistics to
consumers.

For a function ``f(batch) -> (n, K)`` of the model, the generator works with the per-example
Jacobians ``J(x) = ∂f(x)/∂θ`` (``K × P``). Representations are built from

    M = (1/n) Σ_x J(x)ᵀ J(x)        (n: number of examples seen),

so a Fisher matrix is obtained by choosing ``f`` such that ``J(x)ᵀ J(x)`` is the example's
Fisher (see `nngeometry.metrics`).

How: one forward pass per batch with hooks that record each layer's inputs and outputs, then a
single *batched* backward pass (``is_grads_batched``) from the ``K`` unit cotangents to the
layers' outputs: no parameter gradient is formed by autograd, and no Python loop over examples
or outputs. Each layer type turns ``(input, output gradient)`` into what is asked (per-example
gradients, diagonals, KFAC factors) in `nngeometry.layer_types`.

This module holds the public class, `TorchHooksJacobianBackend`: its constructor, one method
per statistic and the public matrix-free products. The machinery is split by concern:
`passes` (the pass driver, its hooks and the outputs the examples share), `strategy`
(chunk sizes and the backward-strategy autotuner), `model_and_data` (the model's lock and state
during a computation, the determinism and finiteness checks) and `products` (the
``torch.func`` products).
"""
import torch.distributed as dist

from .distributed import resolve_group
from .model_and_data import (_check_product, _check_uniform_params, _flat, default_function,
                             random_in_vmap_explained, unwrap_model)
from .passes import HookedPasses, _Broadcast, _examples_count
from .products import MatrixFreeProducts, _outside_inference_mode
from .._memory import check_fits
from ..layercollection import LayerCollection
from . import consumers

# Re-exported: the names this module held before the engine was split by concern, imported
# from here by code written against earlier releases.
from .model_and_data import model_lock as _model_lock
from .model_and_data import (_FORWARD_AD_LOCK, _ENGINE_PASSES, _MODEL_LOCKS, _no_fused_attention,
                             _nonfinite_layers, _random_outside_modules, _refuse_batch_statistics,
                             _refuse_inference_parameters, _rng_state, _same_rng, _tensor_leaves,
                             check_statistic, first_random_module, in_engine_pass,
                             refuse_random_modules, tensors_in_model)
from .passes import (_COINCIDENT_SHARED, _InstanceForward, _MeanJacobian, _expand_axis,
                     _mark_coincident_shared, _rebuild_tuple, _refuse_unbatched_calls,
                     check_parameter_uses)
from .products import _normal_tensor
from .strategy import (BACKWARD_TIMING_ROUNDS, DIRECTION_CHUNK_BYTES,
                       LOOPED_TIMING_DIRECTIONS, _BACKWARD_CHOICE, _BACKWARD_SAMPLES,
                       _VECTOR_CHUNK_NUMBERS, _backward_batched, _backward_looped,
                       _backward_sampled, _timed, _vector_chunk)

__all__ = [
    "TorchHooksJacobianBackend", "random_in_vmap_explained", "check_statistic",
    "first_random_module", "refuse_random_modules", "in_engine_pass", "tensors_in_model",
    "check_parameter_uses", "DIRECTION_CHUNK_BYTES", "LOOPED_TIMING_DIRECTIONS",
    "BACKWARD_TIMING_ROUNDS",
    # private names, kept importable from here
    "_COINCIDENT_SHARED", "_expand_axis", "_mark_coincident_shared", "_rebuild_tuple",
    "_refuse_unbatched_calls", "_FORWARD_AD_LOCK", "_ENGINE_PASSES", "_MODEL_LOCKS",
    "_model_lock", "_no_fused_attention", "_refuse_batch_statistics", "_check_uniform_params",
    "_InstanceForward", "_MeanJacobian", "_examples_count", "_nonfinite_layers",
    "_random_outside_modules", "_refuse_inference_parameters", "_rng_state", "_same_rng",
    "_tensor_leaves", "_check_product", "_flat", "_normal_tensor", "_outside_inference_mode",
    "_Broadcast", "_BACKWARD_CHOICE", "_BACKWARD_SAMPLES", "_VECTOR_CHUNK_NUMBERS",
    "_backward_batched", "_backward_looped", "_backward_sampled", "_timed", "_vector_chunk",
    "_required",
]

_CENTERED_KFAC = ("KFAC with centering=True is not implemented: build the generator with "
                  "centering=False, or use PMatDense / PMatBlockDiag / PMatDiag for the centered "
                  "matrix")


class TorchHooksJacobianBackend(HookedPasses, MatrixFreeProducts):
    """Computes per-example Jacobians of ``function`` and statistics built from them.

    Args:
        model: the ``torch.nn.Module``.
        function: ``function(*batch) -> outputs`` of shape ``(n, n_output)`` (or ``(n,)``, or
            ``(n, ...)``, flattened). Defaults to ``model(batch[0])``.
        centering: replace each example's Jacobian ``J(x)`` by ``J(x) - J̄``, with
            ``J̄ = (1/n) Σ_x J(x)`` the mean over the whole data set (not per mini-batch), in
            every statistic: e.g. ``M = (1/n) Σ_x (J(x) - J̄)ᵀ (J(x) - J̄)``. ``J̄`` is computed by
            a first pass over the examples (so they must be iterable twice, as a DataLoader
            is), and by another one at each implicit product. Not available for KFAC/EKFAC.
        verbose: show a progress bar over the batches.
        max_chunk_bytes: memory allowed for the output gradients of one batched backward pass;
            output directions are processed in chunks that fit.
        backward: how the gradients of several output directions are obtained: ``'batched'``
            (one vmapped backward), ``'looped'`` (one backward per direction) or ``'auto'``
            (default: the faster of the two, timed on the first batches' own directions, no
            extra pass, once per model structure and shape). Same numbers.
        layer_collection: the collection the statistics are computed for when a method is
            called without one (code written for nngeometry 0.4 builds the generator with it
            and then calls ``PMatDense(generator=g, examples=loader)``). Default: all the
            layers of the model (``LayerCollection.from_model(model)``).
        n_output: ignored (older releases needed the number of outputs in advance).
        check_deterministic: refuse random models (default ``True``): dropout modules in
            training mode (``RuntimeError`` naming the module and ``model.eval()``), and, once
            per pass over the examples when a module of the model is in training mode or when
            the first forward drew from the global RNG (CPU, and the model's CUDA device:
            randomness outside the modules, such as ``F.dropout(x, training=True)`` or
            ``torch.rand`` in ``forward``), a probe that runs the model again on the first batch
            (without gradients, on a forked RNG: the global RNG state is left as it was) and
            refuses outputs that differ. The implicit products watch the RNG the same way.
            Random outputs make every statistic a random matrix whose average is not the one
            asked for. ``False`` skips both.
        distributed: data parallelism over ``torch.distributed``: ``None`` (default: on when a
            process group is initialised and has more than one rank), ``True`` or ``False``.
            When on, each rank passes its own shard of the examples and every statistic and
            implicit product is that of all the ranks' examples (sums reduced once per
            statistic, per-example rows gathered in rank order; see
            `nngeometry.backend.distributed`); every rank must make the same calls.
        process_group: the group to reduce over (default: the world).

    A model wrapped in ``DistributedDataParallel`` (or ``DataParallel``) is unwrapped: the
    hooks go on its ``.module`` and the layer ids are the inner model's.

    Every statistic method takes ``(examples, layer_collection)``; both may be omitted:
    ``layer_collection`` then is the generator's, and ``examples`` is required (a clear
    ``ValueError`` says so).

    Refused models: BatchNorm layers that use batch statistics (training mode, or
    ``track_running_stats=False``) couple the examples of a batch, so per-example Jacobians are
    not defined (``RuntimeError``: call ``model.eval()``); parameters of the collection with
    different dtypes or devices (``ValueError``); random models (see ``check_deterministic``).

    Batches are moved to the device of the model's parameters, and their floating-point tensors
    cast to its dtype (integer tensors are never cast). Tensors made under
    ``torch.inference_mode()`` are copied, and the statistics are computed outside inference
    mode, so that a build inside ``with torch.inference_mode():`` gives the same numbers.
    """

    def __init__(self, model, function=None, centering=False, verbose=False,
                 max_chunk_bytes=2 ** 30, layer_collection=None, n_output=None, backward="auto",
                 check_deterministic=True, distributed=None, process_group=None):
        # layer_collection / n_output: accepted for code written against older releases, where
        # the generator held them; the representations now take the collection themselves
        self._layer_collection = layer_collection
        self.n_output = n_output
        model = unwrap_model(model)
        self.model = model
        self.function = function if function is not None else default_function(model)
        self.centering = centering
        self.verbose = verbose
        self.max_chunk_bytes = max_chunk_bytes
        if backward not in ("auto", "batched", "looped"):
            raise ValueError(f"unknown backward '{backward}': use 'auto', 'batched' or 'looped'")
        self.backward = backward
        self.check_deterministic = bool(check_deterministic)
        if distributed is not None:
            resolve_group(distributed, process_group)  # checks the value (and a required group)
        self.distributed = distributed
        self.process_group = process_group
        # one dict per implicit product in progress: batch index -> examples (see _counting)
        self._counters = []
        # the number of examples the hooks expand shared outputs to (see _broadcast_outputs)
        self._broadcast = _Broadcast()

    def _group(self):
        """The process group the statistics are reduced over, or None (one process)."""
        distributed = getattr(self, "distributed", None)
        if not distributed and not (dist.is_available() and dist.is_initialized()):
            return None  # one process: no group to look up
        return resolve_group(distributed, getattr(self, "process_group", None))

    # ================================================================== collection, dtype, device
    @property
    def layer_collection(self):
        """The collection used when a method is called without one: the one given to the
        constructor, else all the layers of the model."""
        if self._layer_collection is not None:
            return self._layer_collection
        try:
            return LayerCollection.from_model(self.model)
        except Exception as e:
            raise type(e)(f"the generator was built without a layer_collection and none can be "
                          f"read from the model ({e}); pass layer_collection= to the generator "
                          "or to the method") from e

    @layer_collection.setter
    def layer_collection(self, layer_collection):
        self._layer_collection = layer_collection

    def _resolve(self, examples, layer_collection):
        """``(examples, layer_collection)`` with the generator's collection as the default."""
        if examples is None:
            raise ValueError("no examples given: pass examples= (a DataLoader or a mini-batch "
                             "(inputs, targets, ...)) to compute a statistic")
        return examples, (layer_collection if layer_collection is not None
                          else self.layer_collection)

    def get_device(self, layer_collection=None):
        """The device of the collection's parameters in the model (``ValueError`` if they
        are not all on one device)."""
        return self._uniform_params(layer_collection)[1]

    def get_dtype(self, layer_collection=None):
        """The dtype of the collection's parameters in the model (``ValueError`` if they do
        not all share one)."""
        return self._uniform_params(layer_collection)[0]

    def _uniform_params(self, layer_collection=None):
        lc = layer_collection if layer_collection is not None else self.layer_collection
        modules = lc.get_layerid_module_map(self.model)
        return _check_uniform_params(lc, modules)

    # ================================================================== statistics
    def get_covariance_matrix(self, examples=None, layer_collection=None):
        """``(P, P)``: ``(1/n) Σ_x J(x)ᵀ J(x)``."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        return self.accumulate(examples, layer_collection,
                               consumers.DenseCovariance(layer_collection)).result

    def get_covariance_diag(self, examples=None, layer_collection=None):
        """``(P,)``: diagonal of ``(1/n) Σ_x J(x)ᵀ J(x)``."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        return self.accumulate(examples, layer_collection,
                               consumers.DiagCovariance(layer_collection)).result

    def get_covariance_layer_blocks(self, examples=None, layer_collection=None):
        """``{layer_id: (p_l, p_l)}``: the diagonal blocks of ``(1/n) Σ_x J(x)ᵀ J(x)``."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        return self.accumulate(examples, layer_collection,
                               consumers.LayerBlocks(layer_collection)).result

    def get_covariance_quasidiag(self, examples=None, layer_collection=None):
        """``{layer_id: (diag (p_l,), cross (out, p_w/out) or None)}``: the quasi-diagonal
        (Ollivier 2015) of ``(1/n) Σ_x J(x)ᵀ J(x)``; see ``consumers.QuasiDiagCovariance``."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        return self.accumulate(examples, layer_collection,
                               consumers.QuasiDiagCovariance(layer_collection)).result

    def get_kfac_blocks(self, examples=None, layer_collection=None, approx="expand",
                        sqrt_k_split=False):
        """``{layer_id: (A, G)}`` with ``kron(G, A)`` ≈ the layer's block (both divided by n);
        a layer with several Kronecker blocks gets ``((A_0, G_0), (A_1, G_1), ...)``.
        ``approx``: ``'expand'`` or ``'reduce'`` for layers that share weights over positions.
        ``sqrt_k_split=True`` moves a factor ``√K`` (``K`` the number of output directions)
        from ``G`` to ``A``, as `PMatKFAC` stores them (see `consumers.KFACFactors`)."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        if self.centering:
            raise NotImplementedError(_CENTERED_KFAC)
        return self.accumulate(examples, layer_collection,
                               consumers.KFACFactors(layer_collection, approx, sqrt_k_split)).result

    def get_kfac_or_layer_blocks(self, examples=None, layer_collection=None, approx="expand"):
        """``(factors, blocks)`` in one pass: ``factors`` as
        [`get_kfac_blocks`][nngeometry.backend.TorchHooksJacobianBackend.get_kfac_blocks] for
        the layers whose type computes KFAC factors, ``blocks``, ``{layer_id: (p_l, p_l)}``, the
        dense diagonal block ``(1/n) Σ_x J_l(x)ᵀ J_l(x)`` of each other layer (what
        `PMatEKFACBlockDiag` is built from; see `consumers.KFACOrLayerBlocks`)."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        if self.centering:
            raise NotImplementedError(_CENTERED_KFAC)
        c = self.accumulate(examples, layer_collection,
                            consumers.KFACOrLayerBlocks(layer_collection, approx))
        return c.factors, c.blocks

    def get_kfe_diag(self, kfe=None, examples=None, layer_collection=None):
        """EKFAC's diagonal in Kronecker-factored eigenbases: ``{layer_id: (dG, dA)}`` with entry
        ``(1/n) Σ_x Σ_k ((U_Gᵀ Ĝ_k(x) U_A)_{pq})²``, ``Ĝ_k(x)`` the per-example gradient of output
        ``k`` in the Kronecker layout. ``kfe``: ``{layer_id: (U_A, U_G[, perm])}`` (see
        ``consumers.KFEDiag``); only those layers are hooked."""
        _required(kfe, "kfe", "get_kfe_diag")
        examples, layer_collection = self._resolve(examples, layer_collection)
        lc = layer_collection
        if set(kfe) != set(lc.layer_ids()):
            lc = lc.sub(list(kfe))
        # all directions in one backward pass as far as max_chunk_bytes allows: the layer
        # types project the inputs on U_A once per chunk of directions (a CNN's 2048-input fc: a GEMM
        # with a 2049² U_A), which made 5 chunks 11% slower than one
        return self.accumulate(examples, lc, consumers.KFEDiag(lc, kfe),
                               chunk_bytes=self.max_chunk_bytes).result

    def get_subnetwork_matrix(self, indices, examples=None, layer_collection=None):
        """``(k, k)``: ``(1/n) Σ_x J(x)ᵀ J(x)`` restricted to the flat parameter ``indices``
        (``(k,)``, of the collection's layout), without forming ``P × P``."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        return self.accumulate(examples, layer_collection,
                               consumers.SubnetworkCovariance(layer_collection, indices)).result

    def get_jacobian(self, examples=None, layer_collection=None):
        """``(n_output, n, P)``: the per-example Jacobians (not normalized)."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        consumer = consumers.PerExampleJacobians(layer_collection,
                                                 n_expected=_examples_count(examples))
        return self.accumulate(examples, layer_collection, consumer).result

    def get_gram_matrix(self, examples=None, layer_collection=None):
        """``(n_output, n, n_output, n)``: ``G[k,i,l,j] = <J_k(x_i), J_l(x_j)>`` (not normalized).
        Its ``(K n)²`` entries are checked against the memory available before the product
        (``MemoryError``), as the Jacobian's ``K n P`` are (`nngeometry._memory.check_fits`)."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        J = self.get_jacobian(examples, layer_collection)
        K, n, P = J.shape
        check_fits((K * n) ** 2 * J.dtype.itemsize,
                   f"the Gram matrix ((n_output·n)² = ({K}·{n})² entries)",
                   "use fewer examples, or products with the Jacobian (PFMapImplicit, "
                   "PMatImplicit) instead of the n × n Gram matrix")
        Jf = J.reshape(K * n, P)
        return (Jf @ Jf.t()).reshape(K, n, K, n)

    def accumulate(self, examples, layer_collection, consumer, chunk_bytes=None, finalize=True):
        """Run the model over ``examples`` and feed each batch to ``consumer``.

        The consumer has ``update(ctx: BatchContext)`` and ``finalize(n_examples)``; it is
        returned after ``finalize`` (with ``finalize=False``: with its sums and ``count``, to be
        merged or averaged, see `Consumer`).
        ``chunk_bytes``: the memory for the output gradients of one chunk of output directions
        (default: see ``_chunk_size``; never more than ``max_chunk_bytes``).

        Under data parallelism (see ``distributed``) the consumer's sums are reduced over the
        ranks after the pass (one collective, `Consumer.all_reduce` /
        `Consumer.all_gather`) and normalised by the global example count; a rank whose
        shard is empty takes part with zeros. The consumer must then follow the protocol of
        `Consumer`.
        """
        return self._accumulate(examples, layer_collection, consumer, chunk_bytes, finalize)

    @_outside_inference_mode
    def implicit_mv(self, v=None, examples=None, layer_collection=None):
        """``(P,)``: ``M v = (1/n) Σ_x J(x)ᵀ J(x) v`` without forming ``M``."""
        _required(v, "v", "implicit_mv")
        examples, lc = self._resolve(examples, layer_collection)
        group = self._group()
        out = self._mv(v, examples, lc) if group is None else \
            self._global_mean(lambda: self._mv(v, examples, lc), group)
        if self.centering:
            m = self._mean_jacobian(examples, lc)
            out = out - m.t() @ (m @ _flat(v).to(m.dtype))
        _check_product(out, v, "implicit_mv")
        return out

    @_outside_inference_mode
    def implicit_vTMv(self, v=None, examples=None, layer_collection=None):
        """``vᵀ M v = (1/n) Σ_x ||J(x) v||²`` (a scalar tensor)."""
        _required(v, "v", "implicit_vTMv")
        examples, lc = self._resolve(examples, layer_collection)
        group = self._group()
        out = self._vTMv(v, examples, lc) if group is None else \
            self._global_mean(lambda: self._vTMv(v, examples, lc), group)
        if self.centering:
            mv = self._mean_jacobian(examples, lc) @ _flat(v)
            out = out - (mv * mv).sum()
        _check_product(out, v, "implicit_vTMv")
        return out

    @_outside_inference_mode
    def implicit_Jv(self, v=None, examples=None, layer_collection=None):
        """``(n_output, n)``: ``J(x_i) v`` for every example (not normalized)."""
        _required(v, "v", "implicit_Jv")
        examples, lc = self._resolve(examples, layer_collection)
        group = self._group()
        out = self._Jv(v, examples, lc) if group is None else \
            self._global_rows(lambda: self._Jv(v, examples, lc), group, 1)
        if self.centering:
            out = out - (self._mean_jacobian(examples, lc) @ _flat(v)).unsqueeze(1)
        _check_product(out, v, "implicit_Jv")
        return out

    @_outside_inference_mode
    def implicit_JTv(self, w, examples=None, layer_collection=None):
        """``(P,)``: ``Σ_i J(x_i)ᵀ w[:, i]`` for ``w`` of shape ``(n_output, n)``. Under data
        parallelism ``n`` is the number of examples of all the ranks, in rank order (the order
        of [`implicit_Jv`][nngeometry.backend.TorchHooksJacobianBackend.implicit_Jv]); each rank uses its own columns."""
        examples, lc = self._resolve(examples, layer_collection)
        group = self._group()
        out = self._JTv(w, examples, lc) if group is None else \
            self._global_JTv(w, examples, lc, group)
        if self.centering:
            m = self._mean_jacobian(examples, lc)
            out = out - m.t() @ w.sum(dim=1).to(m.dtype)
        _check_product(out, w, "implicit_JTv")
        return out

    @_outside_inference_mode
    @random_in_vmap_explained
    def implicit_JV(self, V, examples=None, layer_collection=None):
        """``(m, n_output, n)``: ``J(x_i) v_j`` for the ``m`` rows ``v_j`` of ``V``
        (``(m, P)``) and every example (not normalized)."""
        examples, lc = self._resolve(examples, layer_collection)
        group = self._group()
        out = self._JV(V, examples, lc) if group is None else \
            self._global_rows(lambda: self._JV(V, examples, lc), group, 2)
        if self.centering:
            out = out - (V @ self._mean_jacobian(examples, lc).t()).unsqueeze(2)
        _check_product(out, V, "implicit_JV")
        return out

    @_outside_inference_mode
    @random_in_vmap_explained
    def implicit_mm(self, V, examples=None, layer_collection=None):
        """``(m, P)``: ``M v_j`` for the rows of ``V`` (``(m, P)``), without forming ``M``."""
        examples, lc = self._resolve(examples, layer_collection)
        group = self._group()
        out = self._mm(V, examples, lc) if group is None else \
            self._global_mean(lambda: self._mm(V, examples, lc), group)
        if self.centering:
            m = self._mean_jacobian(examples, lc)
            out = out - (V @ m.t()) @ m
        _check_product(out, V, "implicit_mm")
        return out

    def implicit_trace(self, examples=None, layer_collection=None):
        """``tr M = (1/n) Σ_x ||J(x)||_F²`` (a scalar tensor), from the diagonal (never
        ``P × P`` memory); centered with ``centering=True``."""
        return self.get_covariance_diag(examples, layer_collection).sum()

    def accumulate_uncentered(self, examples, layer_collection, consumer):
        """[`accumulate`][nngeometry.backend.TorchHooksJacobianBackend.accumulate] without centering, whatever ``self.centering`` is."""
        saved, self.centering = self.centering, False
        try:
            return self.accumulate(examples, layer_collection, consumer)
        finally:
            self.centering = saved


def _required(value, name, method):
    # the statistic methods take every argument by keyword with a default (upstream's generic
    # (*args, **kwargs) signatures); the ones without a meaningful default are checked here
    if value is None:
        raise TypeError(f"{method}() needs the argument '{name}'")
