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
"""
import contextlib
import functools
import math
import threading
import time
import warnings
import weakref

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.data import DataLoader

from .batches import (all_finite, batch_size_of, check_finite, check_outputs, default_function,
                      deferred_finite_checks, iterate_batches, prepare_batch)
from .context import (BatchContext, Call, check_parameter_uses, mark_uses_verified,
                      uses_key, uses_verified)
from ..layer_types.base import AbstractLayer, is_recording_paused, recording_paused
from ..layer_types.parametrized import parametrizations_prepared
from ..layercollection import LayerCollection, run_eagerly
from . import consumers as C
from .distributed import (all_gather_rows, all_reduce_tree, global_batch_index, resolve_group,
                          unwrap_model)


def _outside_inference_mode(method):
    """Run an implicit product with autograd available, also when called inside
    ``torch.inference_mode()``: the products are Jacobian-vector and vector-Jacobian products,
    which inference mode turns into zeros (no tangents, no graph) without an error. Leaving it
    locally is sound: the values are the same, the tensor arguments that are inference tensors
    are cloned into normal ones first (inference tensors can't be saved for backward), and the
    results are normal tensors, usable inside or outside inference mode. (The batches are
    cloned the same way in ``_functional_batches``.)"""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return method(self, *args, **kwargs)
        with torch.inference_mode(False):
            args = [_normal_tensor(a) for a in args]
            kwargs = {k: _normal_tensor(a) for k, a in kwargs.items()}
            return method(self, *args, **kwargs)
    return wrapper


def random_in_vmap_explained(method):
    """Products vmapped over many vectors (``torch.func.vmap``) refuse a forward that draws
    random numbers with torch's own message about vmap's randomness flags; say what it means
    for the user's model instead."""
    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except RuntimeError as e:
            if "randomness error mode" not in str(e):
                raise
            raise RuntimeError(
                "the function is not deterministic: its forward draws random numbers (a "
                "dropout module in training mode, F.dropout(x, p, training=True), or torch.rand "
                "/ torch.randn noise in forward), which makes every matrix random. Call "
                "model.eval(), make that randomness follow the module's mode "
                "(F.dropout(x, p, training=self.training), or nn.Dropout)") from e
    return wrapper


def _normal_tensor(x):
    """A normal tensor with the values of ``x`` if ``x`` (or a PVector's flat tensor) is an
    inference tensor; ``x`` itself otherwise. Call outside inference mode."""
    t = _flat(x) if hasattr(x, "get_flat_representation") else x
    if isinstance(t, torch.Tensor) and torch.is_inference(t):
        return t.clone()
    return x


def _refuse_inference_parameters(tensors):
    """Parameters created inside ``torch.inference_mode()`` can't take part in autograd."""
    for name, t in tensors.items():
        if torch.is_inference(t):
            raise RuntimeError(
                f"the model's parameter '{name}' is an inference tensor (the model was created "
                "or loaded inside torch.inference_mode()): autograd, which the implicit products "
                "need, can't use it. Create or load the model outside inference mode, or clone "
                "its parameters outside it")



class TorchHooksJacobianBackend:
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
        resolve_group(distributed, process_group)  # checks the value (and a required group)
        self.distributed = distributed
        self.process_group = process_group
        # one dict per implicit product in progress: batch index -> examples (see _counting)
        self._counters = []
        # the number of examples the hooks expand shared outputs to (see _broadcast_outputs)
        self._broadcast = _Broadcast()

    def _group(self):
        """The process group the statistics are reduced over, or None (one process)."""
        return resolve_group(getattr(self, "distributed", None),
                             getattr(self, "process_group", None))

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
        return self.accumulate(examples, layer_collection, C.DenseCovariance(layer_collection)).result

    def get_covariance_diag(self, examples=None, layer_collection=None):
        """``(P,)``: diagonal of ``(1/n) Σ_x J(x)ᵀ J(x)``."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        return self.accumulate(examples, layer_collection, C.DiagCovariance(layer_collection)).result

    def get_covariance_layer_blocks(self, examples=None, layer_collection=None):
        """``{layer_id: (p_l, p_l)}``: the diagonal blocks of ``(1/n) Σ_x J(x)ᵀ J(x)``."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        return self.accumulate(examples, layer_collection, C.LayerBlocks(layer_collection)).result

    def get_covariance_quasidiag(self, examples=None, layer_collection=None):
        """``{layer_id: (diag (p_l,), cross (out, p_w/out) or None)}``: the quasi-diagonal
        (Ollivier 2015) of ``(1/n) Σ_x J(x)ᵀ J(x)``; see ``consumers.QuasiDiagCovariance``."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        return self.accumulate(examples, layer_collection,
                               C.QuasiDiagCovariance(layer_collection)).result

    def get_kfac_blocks(self, examples=None, layer_collection=None, approx="expand"):
        """``{layer_id: (A, G)}`` with ``kron(G, A)`` ≈ the layer's block (both divided by n)."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        if self.centering:
            raise NotImplementedError("KFAC with centering=True is not implemented: build the "
                                      "generator with centering=False, or use PMatDense / "
                                      "PMatBlockDiag / PMatDiag for the centered matrix")
        return self.accumulate(examples, layer_collection,
                               C.KFACFactors(layer_collection, approx)).result

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
        return self.accumulate(examples, lc, C.KFEDiag(lc, kfe),
                               chunk_bytes=self.max_chunk_bytes).result

    def get_subnetwork_matrix(self, indices, examples=None, layer_collection=None):
        """``(k, k)``: ``(1/n) Σ_x J(x)ᵀ J(x)`` restricted to the flat parameter ``indices``
        (``(k,)``, of the collection's layout), without forming ``P × P``."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        return self.accumulate(examples, layer_collection,
                               C.SubnetworkCovariance(layer_collection, indices)).result

    def get_jacobian(self, examples=None, layer_collection=None):
        """``(n_output, n, P)``: the per-example Jacobians (not normalized)."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        consumer = C.Jacobian(layer_collection, n_expected=_examples_count(examples))
        return self.accumulate(examples, layer_collection, consumer).result

    def get_gram_matrix(self, examples=None, layer_collection=None):
        """``(n_output, n, n_output, n)``: ``G[k,i,l,j] = <J_k(x_i), J_l(x_j)>`` (not normalized).
        Its ``(K n)²`` entries are checked against the memory available before the product
        (``MemoryError``), as the Jacobian's ``K n P`` are (`consumers.check_fits`)."""
        examples, layer_collection = self._resolve(examples, layer_collection)
        J = self.get_jacobian(examples, layer_collection)
        K, n, P = J.shape
        C.check_fits((K * n) ** 2 * J.dtype.itemsize,
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
        group = self._group()
        if group is not None and getattr(consumer, "_reduced", False):
            raise RuntimeError(
                f"this {type(consumer).__name__} already holds the statistic of all the ranks: "
                "another pass into it would count the earlier examples once per rank; "
                "accumulate into a new statistic and merge() the two")
        # inference_mode(False): inside a user's `with torch.inference_mode():` autograd would
        # record nothing (the backward pass fails); the batches' inference tensors are copied
        # in _batches. Leaving the block restores the user's mode.
        with torch.inference_mode(False):
            mean = self._mean_jacobian(examples, layer_collection) if self.centering else None
            n_total = 0
            # the probe costs one more forward of the first batch (+8% to +29% for one-batch
            # builds of an MLP): only where a module is in training mode, the mode in which
            # modules are random, or where the first forward drew from the global RNG
            # (randomness outside the modules: F.dropout(x, training=True), torch.rand); a
            # model in eval mode whose forward leaves the RNG alone is deterministic
            probe = self.check_deterministic
            with self._prepared(layer_collection) as (modules, calls), deferred_finite_checks():
                for i, batch in enumerate(self._batches(examples)):
                    n_total += self._run_batch(batch, layer_collection, modules, calls, consumer,
                                               chunk_bytes, mean, probe=probe and i == 0,
                                               index=global_batch_index(i, group))
        # a statistic may already hold the examples of an earlier pass (accumulated into again)
        consumer.count = getattr(consumer, "count", 0) + n_total
        n_total = consumer.count
        if group is not None:
            if not hasattr(consumer, "all_reduce"):
                raise TypeError(
                    f"{type(consumer).__name__} can't be reduced across ranks: under "
                    "torch.distributed a consumer must follow the protocol of "
                    "nngeometry.backend.consumers.Consumer (subclass it), or pass "
                    "distributed=False to the generator")
            # once per statistic, after the pass (never per batch)
            consumer.all_reduce(group, self._device())
            n_total = consumer.count
        if n_total == 0:
            raise ValueError("the examples yielded no data (empty loader): nothing to compute from")
        if finalize:
            consumer.finalize(n_total)
            check_statistic(getattr(consumer, "result", None), layer_collection)
        return consumer

    # ================================================================== implicit products
    # Each public product resolves its arguments, runs the uncentered product (the ``_``
    # methods below) and, with centering, corrects it exactly with the mean Jacobian
    # ``m = J̄`` (``(K, P)``): for ``J_c(x) = J(x) - m``,
    #   (1/n) Σ J_cᵀ J_c v = M v - mᵀ (m v),     vᵀ M_c v = vᵀ M v - ||m v||²,
    #   J_c(x) v = J(x) v - m v,                 Σ_i J_c(x_i)ᵀ w_i = Σ_i J(x_i)ᵀ w_i - mᵀ Σ_i w_i.
    #
    # Under data parallelism (see ``distributed``) each product runs on the rank's shard and is
    # then reduced: means are summed over the ranks weighted by their example counts (one
    # all_reduce), per-example rows (``J v``) are gathered in rank order (one all_gather).
    @contextlib.contextmanager
    def _counting(self):
        """Count the examples the functional passes inside the block see: ``{batch index:
        examples}`` (filled by ``_functional_batches``; a dict, so that a function called
        several times per batch, as in the vmapped products, is counted once)."""
        counts = {}
        if not hasattr(self, "_counters"):
            self._counters = []
        self._counters.append(counts)
        try:
            yield counts
        finally:
            self._counters.pop()

    def _local_product(self, product):
        """``(product(), n)`` on this rank's shard, ``n`` its examples; ``(None, 0)`` for an
        empty shard (the rank still joins the collective)."""
        with self._counting() as counts:
            try:
                local = product()
            except C.EmptyExamplesError:
                return None, 0
        return local, sum(counts.values())

    def _global_mean(self, product, group):
        """The mean over every rank's examples of a product that ``product()`` computes as a
        mean over this rank's: ``Σ_r n_r · mean_r / Σ_r n_r``, with one all_reduce (a rank
        without examples adds zeros)."""
        local, n = self._local_product(product)
        (summed,), total = all_reduce_tree([local * n if n else None], n, group,
                                           "implicit product", self._device())
        self._check_nonempty(total)
        return summed / total

    def _global_rows(self, product, group, dim):
        """Per-example rows of every rank, concatenated along ``dim`` in rank order."""
        local, n = self._local_product(product)
        rows, counts = all_gather_rows(local, n, group, dim, "implicit product", self._device())
        self._check_nonempty(sum(counts))
        return rows

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

    def _global_JTv(self, w, examples, lc, group):
        import torch.distributed as dist

        from .batches import batch_size_of

        # this rank's columns of w: its offset is the example count of the ranks before it
        n_local = sum(int(batch_size_of(b)) for b in iterate_batches(examples))
        counts = [None] * dist.get_world_size(group)
        dist.all_gather_object(counts, n_local, group=group)
        if w.shape[1] != sum(counts):
            raise ValueError(
                f"implicit_JTv under torch.distributed: w has {w.shape[1]} columns but the "
                f"ranks hold {sum(counts)} examples ({counts}): pass one column per example of "
                "all the ranks, in rank order (the layout implicit_Jv returns)")
        start = sum(counts[:dist.get_rank(group)])
        mine = w[:, start:start + n_local]
        try:
            local = self._JTv(mine, examples, lc) if n_local else None
        except C.EmptyExamplesError:
            local = None
        (out,), total = all_reduce_tree([local], n_local if local is not None else 0, group,
                                        "implicit_JTv", self._device())
        self._check_nonempty(total)
        return out

    def implicit_trace(self, examples=None, layer_collection=None):
        """``tr M = (1/n) Σ_x ||J(x)||_F²`` (a scalar tensor), from the diagonal (never
        ``P × P`` memory); centered with ``centering=True``."""
        return self.get_covariance_diag(examples, layer_collection).sum()

    def _mean_jacobian(self, examples, layer_collection):
        """``(n_output, P)``: ``J̄ = (1/n) Σ_x J(x)`` over all the examples, by the same
        per-example gradients as the statistics (one pass, uncentered)."""
        return self.accumulate_uncentered(examples, layer_collection,
                                          _MeanJacobian(layer_collection)).result

    def accumulate_uncentered(self, examples, layer_collection, consumer):
        """[`accumulate`][nngeometry.backend.TorchHooksJacobianBackend.accumulate] without centering, whatever ``self.centering`` is."""
        saved, self.centering = self.centering, False
        try:
            return self.accumulate(examples, layer_collection, consumer)
        finally:
            self.centering = saved

    def _mv(self, v, examples, layer_collection):
        """``M v = (1/n) Σ_x J(x)ᵀ J(x) v`` without forming ``M``: a Jacobian-vector product
        then a vector-Jacobian product per batch. Returns the flat ``(P,)`` tensor.

        One forward pass per batch: the parameters are forward-mode duals (tangent ``v``) that
        also require grad, so the same pass gives the outputs' graph and ``J v``; the backward
        pass from the primal outputs with cotangent ``J v`` gives ``Jᵀ J v``. (A separate
        ``vjp`` and ``jvp`` ran the forward twice: 1.3x slower on an MLP and a transformer.)"""
        import torch.autograd.forward_ad as fwAD

        out = None
        n_total = 0
        raw = self._uses_metric()
        for batch, params, f, *metric in self._functional_batches(examples, layer_collection,
                                                                   raw):
            tangents = self._split_flat(v, params, layer_collection)
            leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
            with fwAD.dual_level(), torch.enable_grad():
                outputs = f({k: fwAD.make_dual(p, tangents[k]) for k, p in leaves.items()})
                outputs, jv = fwAD.unpack_dual(outputs)
            self._check_finite(outputs)
            if jv is None or not outputs.requires_grad:
                # the outputs do not depend on the collection's parameters: M v = 0 here
                g = [None] * len(leaves)
            else:
                w = jv.detach()
                if metric:  # J_fᵀ H J_f v: the output metric between the JVP and the VJP
                    w = metric[0](outputs.detach(), w)
                g = torch.autograd.grad(outputs, list(leaves.values()), w,
                                        allow_unused=True)
            flat = torch.cat([torch.zeros_like(p).reshape(-1) if gk is None else gk.reshape(-1)
                              for gk, p in zip(g, leaves.values())])
            out = flat if out is None else out + flat
            n_total += outputs.shape[0]
        self._check_nonempty(n_total)
        return out / n_total

    def _vTMv(self, v, examples, layer_collection):
        """``vᵀ M v = (1/n) Σ_x ||J(x) v||²`` with one Jacobian-vector product per batch."""
        total, n_total = 0.0, 0
        raw = self._uses_metric()
        for batch, params, f, *metric in self._functional_batches(examples, layer_collection,
                                                                   raw):
            tangents = self._split_flat(v, params, layer_collection)
            outputs, jv = torch.func.jvp(f, (params,), (tangents,))
            self._check_finite(outputs)
            total = total + (jv * (metric[0](outputs, jv) if metric else jv)).sum()
            n_total += outputs.shape[0]
        self._check_nonempty(n_total)
        return total / n_total

    def _Jv(self, v, examples, layer_collection):
        """``(n_output, n)``: ``J(x_i) v`` for every example (not normalized)."""
        parts = []
        for batch, params, f in self._functional_batches(examples, layer_collection):
            tangents = self._split_flat(v, params, layer_collection)
            outputs, jv = torch.func.jvp(f, (params,), (tangents,))
            parts.append(jv.t())
        self._check_nonempty(len(parts))
        return torch.cat(parts, dim=1)

    def _JTv(self, w, examples, layer_collection):
        """``(P,)``: ``Σ_i J(x_i)ᵀ w[:, i]`` for ``w`` of shape ``(n_output, n)``."""
        out, start = None, 0
        for batch, params, f in self._functional_batches(examples, layer_collection):
            outputs, vjp_fn = torch.func.vjp(f, params)
            nb = outputs.shape[0]
            (g,) = vjp_fn(w[:, start:start + nb].t().to(outputs.dtype))
            start += nb
            flat = torch.cat([g[k].reshape(-1) for k in params])
            out = flat if out is None else out + flat
        self._check_nonempty(start)
        return out

    def _JV(self, V, examples, layer_collection):
        """``(m, n_output, n)``: ``J(x_i) v_j`` for the ``m`` rows ``v_j`` of ``V`` (``(m, P)``)
        and every example (not normalized); Jacobian-vector products vmapped over the rows."""
        # the vectors go through in chunks whose tangent activations stay small: a vmapped
        # JVP of m vectors holds m copies of every activation, and past a few MB the
        # elementwise ops run at memory speed (a small CNN: 2.2x faster in chunks of 4 than all
        # 100)
        chunk = _vector_chunk(self, V.shape[0], examples, layer_collection)
        parts = []
        for batch, params, f in self._functional_batches(examples, layer_collection):
            jvs = []
            for j0 in range(0, V.shape[0], chunk):
                tangents = self._split_flat_rows(V[j0:j0 + chunk], params)
                jvs.append(torch.func.vmap(
                    lambda t: torch.func.jvp(f, (params,), (t,))[1])(tangents))
            jv = jvs[0] if len(jvs) == 1 else torch.cat(jvs, dim=0)
            parts.append(jv.transpose(1, 2))  # (m, n_output, nb)
        self._check_nonempty(len(parts))
        return torch.cat(parts, dim=2)

    def _mm(self, V, examples, layer_collection):
        """``(m, P)``: ``M v_j = (1/n) Σ_x J(x)ᵀ J(x) v_j`` for the rows of ``V`` (``(m, P)``),
        without forming ``M``: per batch, vmapped JVPs then vmapped VJPs."""
        if V.shape[0] == 1:
            # one vector (e.g. a CG iteration): the single-forward path of implicit_mv
            return self._mv(V[0], examples, layer_collection).unsqueeze(0)
        # chunks of vectors whose tangent activations and gradients stay small (see _JV): an MLP
        # 3x faster in chunks of ~20 than all 100 at once; a model whose activations alone
        # exceed the budget takes the single-forward path vector by vector
        chunk = _vector_chunk(self, V.shape[0], examples, layer_collection)
        if chunk == 1:
            return torch.stack([self._mv(v, examples, layer_collection) for v in V])
        out, n_total = None, 0
        raw = self._uses_metric()
        for batch, params, f, *metric in self._functional_batches(examples, layer_collection,
                                                                   raw):
            outputs, vjp_fn = torch.func.vjp(f, params)
            self._check_finite(outputs)
            if out is None:
                out = V.new_zeros(V.shape[0], sum(p.numel() for p in params.values()),
                                  dtype=outputs.dtype)
            for j0 in range(0, V.shape[0], chunk):
                Vc = V[j0:j0 + chunk]
                tangents = self._split_flat_rows(Vc, params)
                jv = torch.func.vmap(lambda t: torch.func.jvp(f, (params,), (t,))[1])(tangents)
                if metric:
                    jv = torch.func.vmap(
                        lambda u, o=outputs.detach(), m=metric[0]: m(o, u))(jv)
                (g,) = torch.func.vmap(vjp_fn)(jv)
                # accumulated in place, layer by layer (no (m, P) concatenation per batch)
                start = 0
                for k in params:
                    gk = g[k].reshape(Vc.shape[0], -1)
                    out[j0:j0 + Vc.shape[0], start:start + gk.shape[1]] += gk
                    start += gk.shape[1]
            n_total += outputs.shape[0]
        self._check_nonempty(n_total)
        return out.div_(n_total)

    @staticmethod
    def _split_flat_rows(V, params):
        out, start = {}, 0
        for k, p in params.items():
            out[k] = V[:, start:start + p.numel()].reshape(V.shape[0], *p.shape)
            start += p.numel()
        return out

    # ================================================================== internals
    def _batches(self, examples):
        """The batches of ``examples`` as tuples, on the model's device, floating-point tensors
        in the model's dtype (see `to_device`). First refuses
        random modules (``check_deterministic``)."""
        if self.check_deterministic:
            refuse_random_modules(self.model)
        device, dtype = self._device(), self._dtype()
        it = (prepare_batch(batch, device, dtype) for batch in iterate_batches(examples))
        if self.verbose:
            from tqdm.auto import tqdm
            total = len(examples) if isinstance(examples, DataLoader) else None
            it = tqdm(it, total=total, desc="nngeometry", unit="batch")
        return it

    def _device(self):
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _dtype(self):
        """The dtype of the model's first floating-point parameter (None without one): the
        dtype floating-point inputs are cast to."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return None

    @contextlib.contextmanager
    def _model_state_kept(self, layer_collection):
        """Make the collection's parameters require grad and keep the model's buffers (e.g.
        BatchNorm running statistics) as they were: building a matrix must not change the model."""
        modules = layer_collection.get_layerid_module_map(self.model)
        _check_uniform_params(layer_collection, modules)
        params = layer_collection.parameters(modules)
        # the other parameters are constants for the time of the pass: autograd then records
        # no graph below the collection's first layer (a last-layer matrix runs no backward
        # pass through the rest of the network)
        mine = {id(p) for p in params}
        others = [p for p in self.model.parameters() if id(p) not in mine]
        flags = [p.requires_grad for p in params]
        other_flags = [p.requires_grad for p in others]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        # torch.nn.utils.parametrize: one function for the whole computation (spectral_norm
        # in training mode would advance its power iteration at every forward pass)
        restore_parametrizations = parametrizations_prepared(self.model)
        try:
            for p in params:
                p.requires_grad_(True)
            for p in others:
                p.requires_grad_(False)
            yield modules, params
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            for p, f in zip(others, other_flags):
                p.requires_grad_(f)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            restore_parametrizations()

    @contextlib.contextmanager
    def _prepared(self, layer_collection):
        _refuse_batch_statistics(self.model)
        # compiled code would not run the hooks: the compiled parts run their Python code
        with _model_lock(self.model), run_eagerly(self.model), \
                self._model_state_kept(layer_collection) as (modules, params), \
                self._hooks(layer_collection, modules) as calls:
            yield modules, calls

    @contextlib.contextmanager
    def _hooks(self, layer_collection, modules):
        """``{layer_id: [Call, ...]}``, filled by the forward passes run inside the block: the
        hooks that record each call of the collection's modules (and of modules tied to them).
        Nothing else about the model is changed (see `capture`, which records a user's
        own training step with them)."""
        calls = {lid: [] for lid in modules}
        handles, recorders = [], []
        broadcast = getattr(self, "_broadcast", None)
        try:
            for lid, module in modules.items():
                layer = layer_collection[lid]
                # recorders of tensors inside the module's forward (see
                # AbstractLayer.internal_recorder), one per call in progress
                active = [] if type(layer).internal_recorder is not \
                    AbstractLayer.internal_recorder else None
                if active is not None:
                    recorders.append(active)
                    handles.append(module.register_forward_pre_hook(
                        self._make_pre_hook(layer, active)))
                    # the recorder's own forward, on this instance only (removed with the
                    # hooks)
                    handles.append(_InstanceForward(module, active))
                handles.append(module.register_forward_hook(
                    self._make_hook(calls[lid], active, layer=layer, broadcast=broadcast),
                    with_kwargs=True))
                # other modules using this layer's parameters (tied weights): their calls
                # are calls of the layer, with their own spec and module
                for tname, tspec in getattr(layer_collection, "tied", {}).get(lid, ()):
                    tmod = self.model.get_submodule(tname)
                    handles.append(tmod.register_forward_hook(
                        self._make_hook(calls[lid], None, tspec, tmod, layer=tspec,
                                        broadcast=broadcast), with_kwargs=True))
            yield calls
        finally:
            for h in reversed(handles):
                h.remove()
            self._close_recorders(recorders)

    @staticmethod
    def _close_recorders(recorders):
        """Exit the recorders of module calls that did not return (an exception in the forward
        pass): they must not stay active."""
        for active in recorders:
            while active:
                active.pop().__exit__(None, None, None)

    @staticmethod
    def _make_pre_hook(layer, active):
        def pre_hook(module, args):
            if is_recording_paused():
                return
            rec = layer.internal_recorder(module)
            rec.__enter__()
            active.append(rec)
        return pre_hook

    @staticmethod
    def _make_hook(store, active=None, spec=None, tied_module=None, layer=None, broadcast=None):
        def hook(module, args, kwargs, output):
            if is_recording_paused():
                # a layer type re-running this module's forward to compute its statistics
                return
            rec = None
            if active:
                rec = active.pop()
                rec.__exit__(None, None, None)
            if isinstance(output, torch.Tensor):
                out = output
            elif isinstance(output, (tuple, list)) and isinstance(output[0], torch.Tensor):
                out = output[0]
            else:
                raise TypeError(f"cannot differentiate through the output of {type(module).__name__}")
            replaced = shared = None
            n = broadcast.n if broadcast is not None else None
            if n is not None and n > 1 and layer is not None and rec is None:
                axis = layer.batch_axis(module)
                if out.dim() > axis and out.shape[axis] == 1 and not broadcast.keep_ones:
                    # one output shared by the n examples (positions (1, T), a learned table):
                    # the model would broadcast it; broadcasting it here instead makes the
                    # gradient w.r.t. the copy per-example (the gradient w.r.t. the shared
                    # output is their sum, from which they cannot be recovered)
                    out = _expand_axis(out, axis, n)
                    args = tuple(_expand_axis(a, axis, n) for a in args)
                    kwargs = {k: _expand_axis(v, axis, n) for k, v in kwargs.items()}
                    replaced = out if isinstance(output, torch.Tensor) else \
                        type(output)([out, *output[1:]]) if isinstance(output, list) else \
                        _rebuild_tuple(output, out)
                    broadcast.expanded = broadcast.widened = True
                elif out.dim() > axis and out.shape[axis] != n:
                    # an output with no batch axis (T5's relative position bias, looked up on
                    # a (T, T) table): its per-example gradients take a backward pass of
                    # their own (see _direction_chunks)
                    shared = (n, axis)
                    broadcast.expanded = True
            call = Call(tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args),
                        {k: v.detach() if isinstance(v, torch.Tensor) else v
                         for k, v in kwargs.items()}, out, rec, spec, tied_module)
            call.shared = shared
            store.append(call)
            return replaced
        return hook

    @staticmethod
    def _check_finite(outputs):
        # on an accelerator, within a pass, read once at the end of the pass (no host
        # synchronisation per batch; see deferred_finite_checks)
        check_finite(outputs, "the model's outputs contain NaN or Inf; check the inputs (NaN/Inf "
                              "in the data?) and the model's parameters")

    @staticmethod
    def _check_nonempty(n):
        if n == 0:
            raise C.EmptyExamplesError(
                "the examples yielded no data (empty loader): nothing to compute from")

    def _outputs(self, batch, index=None, watch_rng=False):
        """``(model_outputs, out, columns)``: what the model part of ``function`` returns (for
        the determinism probe), the outputs to differentiate, flattened to ``(n, n_output)``,
        and ``columns(k0, k1)``, the graph of ``out[:, k0:k1]`` alone (or None). For a
        likelihood's transform (``OutputTransform``, see `nngeometry.curvature`) the model
        part is its ``function``; otherwise the whole ``function``."""
        fn = self.function
        transform = hasattr(fn, "model_outputs") and hasattr(fn, "split")
        rng = _rng_state(self._device()) if watch_rng else None
        raw = fn.model_outputs(*batch) if transform else check_outputs(fn(*batch))
        self._rng_consumed = watch_rng and not _same_rng(rng, _rng_state(self._device()))
        if not transform:
            return raw, *self._flat_outputs(raw, None)
        info = fn.batch_info(batch, index) if getattr(fn, "needs_batch", False) else None
        out, columns = self._transformed(raw, info)
        return raw, out, columns

    def _transformed(self, raw, info=None):
        """``(out, columns)`` of an output transform applied to the model's outputs ``raw``
        (``info``: the batch's, for transforms that read it)."""
        fn = self.function
        # losses of the observed targets, seeded draws: the transform reads the batch
        out, columns = fn.split(raw, info) if info is not None else fn.split(raw)
        return self._flat_outputs(check_outputs(out), columns)

    def _flat_outputs(self, out, columns):
        n = out.shape[0] if out.dim() > 0 else 0
        if columns is not None and out.dim() != 2:
            columns = None
        out = out.reshape(n, -1)
        self._check_finite(out)
        return out, columns

    def _probe_deterministic(self, batch, raw, rng_consumed=False):
        """``RuntimeError`` if the model part of ``function`` gives other outputs than ``raw``
        on ``batch`` when run again (without gradients, hooks paused). The probe runs on a
        forked RNG (the CPU's and the model's CUDA device's): the global RNG state is as if it
        had not run, and a random model draws other numbers than in the first run."""
        fn = self.function
        fn = fn.function if hasattr(fn, "model_outputs") and hasattr(fn, "split") else fn
        device = self._device()
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), recording_paused(), \
                _no_fused_attention():
            again = fn(*batch)
        if not isinstance(again, torch.Tensor) or again.shape != raw.shape:
            shape = tuple(again.shape) if isinstance(again, torch.Tensor) else type(again).__name__
            raise RuntimeError(
                f"the function is not deterministic: run twice on the same batch it returned "
                f"outputs of shape {tuple(raw.shape)}, then {shape}. Call model.eval(), or pass "
                "check_deterministic=False if this is intended")
        ref = raw.detach()
        if not ref.is_floating_point() or ref.numel() == 0:
            return
        # the second run differs by round-off only where kernels differ between grad and
        # no-grad modes: a tolerance of a few dozen ulps of the largest output
        tol = 64 * torch.finfo(ref.dtype).eps
        diff = (again - ref).abs().max().item()
        scale = ref.abs().max().item()
        if not diff <= tol * max(scale, torch.finfo(ref.dtype).tiny):
            if rng_consumed and not any(m.training for m in self.model.modules()):
                raise RuntimeError(_random_outside_modules(diff, scale))
            raise RuntimeError(
                f"the function is not deterministic: run twice on the same batch its outputs "
                f"differ by up to {diff:.3g} (largest output {scale:.3g}); a random layer "
                "(dropout or another stochastic module in training mode?) makes every matrix "
                "random. Call model.eval() before computing the matrix, or pass "
                "check_deterministic=False if the randomness is intended")

    def _run_batch(self, batch, layer_collection, modules, calls, consumer, chunk_bytes=None,
                   mean_jacobian=None, probe=False, index=None):
        # (the batch comes from _batches: on the model's device and dtype, checked finite)
        raw, out, columns = self._broadcast_outputs(batch, index, calls, watch_rng=probe)
        if probe and (self._rng_consumed or any(m.training for m in self.model.modules())):
            self._probe_deterministic(batch, raw, self._rng_consumed)
        n, n_output = out.shape
        if n == 0:
            return 0
        self._check_calls(out, layer_collection, modules, calls)
        layer_calls = [c for store in calls.values() for c in store]
        for c in layer_calls:
            if c.shared is not None:
                c.expand_shared()
        for k0, k1, grads in self._direction_chunks(out, columns, calls, layer_collection,
                                                    chunk_bytes):
            i = 0
            for c in layer_calls:
                c.set_gradients(grads[i:i + len(c.targets)], k1 - k0)
                i += len(c.targets)
            ctx = BatchContext(layer_collection, modules, calls, n, k1 - k0, k0, n_output,
                               mean_jacobian, out.detach())
            consumer.update(ctx)
        for store in calls.values():
            store.clear()
        return n

    def _broadcast_outputs(self, batch, index, calls, watch_rng=False):
        """`_outputs` run with the hooks told the batch's number of examples, so that a
        layer whose output is shared by the batch's examples (e.g. a position embedding looked
        up with positions of shape ``(1, T)``) gets that output expanded to the ``n`` examples
        (see ``_make_hook``): its per-example quantities are then exact. The number is read
        from the batch (the first dimension of its first tensor); if the outputs show another
        one and a layer's output does not have it, the forward pass is run again with the
        outputs' own."""
        try:
            guess = int(batch_size_of(batch))
        except Exception:  # a batch whose first element is not a batched tensor
            guess = None
        keep_ones = False
        try:
            raw, out, columns, expanded = self._forward_expanding(batch, index, calls, guess,
                                                                  watch_rng)
        except Exception as first:
            if not self._broadcast.last_widened:
                raise
            # the model does not take the expanded copy of an output of batch dimension 1
            # (it repeats or tiles it along the batch itself): such outputs are then left as
            # they are, with the backward pass of their own of shared outputs (exact too)
            keep_ones = True
            try:
                raw, out, columns, expanded = self._forward_expanding(
                    batch, index, calls, guess, watch_rng, keep_ones=True)
            except Exception:
                raise first from None
        n = out.shape[0]
        if not keep_ones and guess is not None and n != guess and \
                self._broadcast.last_widened:
            # expanding changed the number of outputs (the model concatenates the output of
            # batch dimension 1 along the batch): run again with it left as it is
            keep_ones = True
            raw, out, columns, expanded = self._forward_expanding(
                batch, index, calls, guess, watch_rng, keep_ones=True)
            n = out.shape[0]
        if n != guess and n > 1 and (expanded or any(
                len(c.targets[0].shape) and c.targets[0].shape[0] != n
                for store in calls.values() for c in store)):
            raw, out, columns, _ = self._forward_expanding(batch, index, calls, n, watch_rng,
                                                           keep_ones)
            if out.shape[0] != n:
                raise RuntimeError(
                    f"the function's outputs had {n} examples, and {out.shape[0]} once the "
                    f"layers' outputs shared by the examples were expanded to {n}: a layer's "
                    "output of batch dimension 1 is not broadcast over the examples by the model "
                    "(e.g. it is concatenated along the batch). Pass the batch with its examples "
                    "along the first dimension of its first tensor, or leave that layer out of "
                    "the LayerCollection")
        return raw, out, columns

    def _forward_expanding(self, batch, index, calls, n, watch_rng=False, keep_ones=False):
        """``(raw, out, columns, expanded)``: `_outputs` with the hooks expanding shared
        outputs to ``n`` examples (with ``keep_ones``, those of batch dimension 1 are left as
        they are), and whether one was."""
        for store in calls.values():
            store.clear()
        broadcast = self._broadcast
        broadcast.n, broadcast.expanded, broadcast.keep_ones = n, False, keep_ones
        broadcast.widened = False
        try:
            with torch.enable_grad():
                raw, out, columns = self._outputs(batch, index, watch_rng=watch_rng)
            return raw, out, columns, broadcast.expanded
        finally:
            broadcast.last_widened = broadcast.widened
            broadcast.n, broadcast.expanded, broadcast.keep_ones = None, False, False
            broadcast.widened = False

    def _check_calls(self, out, layer_collection, modules, calls, who="the function"):
        """Refuse a forward pass whose recorded calls can't give the statistics: a layer not
        called, a layer called on an unbatched input, a parameter used outside its module."""
        n = out.shape[0]
        for lid, store in calls.items():
            if not store:
                raise RuntimeError(
                    f"layer '{lid}' was not called during the forward pass of {who}; "
                    "remove it from the LayerCollection or check the function")
        if n > 1:
            _refuse_unbatched_calls(layer_collection, modules, calls, n)
            _mark_coincident_shared(out, self.model, self.function, layer_collection, modules,
                                    calls)
        key = uses_key(self.model, self.function, layer_collection)
        if not uses_verified(self.model, key):
            # once per model, function and collection in a process (entry points build a new
            # generator per call: the check must not cost a pass each time): a parameter used
            # outside its module's forward would give a plausible wrong matrix
            check_parameter_uses(out, layer_collection, modules, calls)
            mark_uses_verified(self.model, key)

    def _direction_chunks(self, out, columns, calls, layer_collection, chunk_bytes=None,
                          keep_graph=False):
        """``(k0, k1, grads)`` per chunk of output directions: the gradients of directions
        ``k0 .. k1 - 1`` of ``out`` (``(n, n_output)``; ``columns(k0, k1)``: the chunk's own
        graph, or None) w.r.t. every target of the recorded calls, in call order. The graph is
        freed after the last chunk unless ``keep_graph`` (a training step's backward pass goes
        on through it)."""
        n, n_output = out.shape
        layer_calls = [c for store in calls.values() for c in store]
        chunk = self._chunk_size(layer_calls, n, n_output, layer_collection.numel(),
                                 chunk_bytes, columns is not None)
        targets = [t.edge for c in layer_calls for t in c.targets]
        # calls whose output has no batch axis: index of their output among the targets
        shared, j = [], 0
        for c in layer_calls:
            if getattr(c, "shared", None) is not None:
                shared.append((j, c))
            j += len(c.targets)
        for k0 in range(0, n_output, chunk):
            k1 = min(n_output, k0 + chunk)
            retain = keep_graph or k1 < n_output
            own = self._shared_gradients(out, shared, k0, k1) if shared else None
            if columns is None or chunk == n_output:
                grads = self._batched_backward(out, targets, k0, k1, retain=retain)
            else:
                # the chunk's own columns: (K, n, K) cotangents instead of (K, n, n_output)
                grads = self._batched_backward(columns(k0, k1), targets, 0, k1 - k0,
                                               retain=retain)
            if own is not None:
                grads = list(grads)
                for (j, _), g in zip(shared, own):
                    grads[j] = g
            yield k0, k1, grads

    def _shared_gradients(self, out, shared, k0, k1):
        """``(K, n, *shape)`` per shared call: the gradient of output direction ``k`` of
        example ``i`` alone w.r.t. an output that the examples share (no batch axis), for
        directions ``k0 .. k1 - 1``. The backward pass of all the examples together gives only
        their sum; here each (direction, example) pair is a cotangent of its own: ``K · n``
        directions, one backward pass (the graph is kept for the main one)."""
        n, n_output = out.shape
        K = k1 - k0
        cot = torch.zeros(K, n, n, n_output, dtype=out.dtype, device=out.device)
        ks = torch.arange(K, device=out.device).unsqueeze(1)
        idx = torch.arange(n, device=out.device).unsqueeze(0)
        cot[ks, idx, idx, k0 + ks] = 1
        edges = [c.targets[0].edge for _, c in shared]
        grads = self._backward_directions(out, edges, cot.reshape(K * n, n, n_output), True)
        return [g.reshape(K, n, *c.targets[0].shape) if g is not None
                else c.targets[0].zeros(K * n).reshape(K, n, *c.targets[0].shape)
                for g, (_, c) in zip(grads, shared)]

    def _chunk_size(self, layer_calls, n, n_output, n_params, chunk_bytes=None,
                    columns=False):
        """Output directions per backward pass: their gradients w.r.t. all the layers' outputs
        (held together until the consumer is done with the chunk) fit in ``max_chunk_bytes``
        and in the larger of `DIRECTION_CHUNK_BYTES` and one direction's per-example
        Jacobian of the whole model for the batch (``n P`` numbers). Where the layers' outputs
        are small next to the parameters (MLPs, transformers) that is every direction at once;
        for a CNN, whose activations outweigh its parameters, all ``K`` directions' gradients
        would exceed the batch's whole Jacobian (a small CNN: 54 MiB for K = 9, vs 6 MiB per direction
        for the Jacobian): they are taken a few directions at a time.

        The gradients at the ``(n, n_output)`` outputs themselves fit in the budget too: ``K``
        one-hot cotangents of the whole output take ``K · n · n_output``; with ``columns`` (the
        outputs of a chunk have a graph of their own, e.g. Monte-Carlo trials) ``K · n · K``."""
        # a call whose output the examples share holds one gradient per example and direction
        # (see _shared_gradients)
        per_direction = sum(c.out_nbytes * (n if getattr(c, "shared", None) else 1)
                            for c in layer_calls)
        itemsize = layer_calls[0].out_dtype.itemsize if layer_calls else 4
        budget = max(DIRECTION_CHUNK_BYTES, n * n_params * itemsize) if chunk_bytes is None \
            else chunk_bytes
        budget = min(self.max_chunk_bytes, budget)
        # each direction's unit cotangent on the (n, n_output) outputs, and the gradients
        # autograd forms at them, are (n, n_output) each too: with many outputs (Monte-Carlo
        # trials) all K directions at once would take K · n · n_output, quadratic in the number
        # of outputs (2.2 GiB for 2000 trials and 64 examples). They fit in the budget as well.
        if columns:
            fit_out = math.isqrt(budget // max(1, 2 * n * itemsize))
        else:
            fit_out = budget // max(1, 2 * n * n_output * itemsize)
        fit = max(1, min(n_output, budget // max(1, per_direction), fit_out))
        # as few chunks as fit, of about equal sizes (e.g. 3 + 3 + 3 rather than 4 + 4 + 1):
        # the layers' work on the inputs only (e.g. patches) is redone per chunk
        n_chunks = -(-n_output // fit)
        return -(-n_output // n_chunks)

    def _batched_backward(self, out, targets, k0, k1, retain):
        K = k1 - k0
        n = out.shape[0]
        if K == 1:
            # one direction (e.g. Monte-Carlo with one trial): a plain backward, and the unit
            # cotangent built without index tensors (this runs once per batch)
            if out.shape[1] == 1:
                cot = torch.ones_like(out)
            else:
                cot = torch.zeros_like(out)
                cot[:, k0] = 1
            grads = torch.autograd.grad(out, targets, cot, retain_graph=retain, allow_unused=True)
            grads = [g.unsqueeze(0) if g is not None else None for g in grads]
        else:
            cot = torch.zeros(K, n, out.shape[1], dtype=out.dtype, device=out.device)
            cot[torch.arange(K), :, torch.arange(k0, k1)] = 1
            grads = self._backward_directions(out, targets, cot, retain)
        return grads

    def _backward_directions(self, out, targets, cot, retain):
        """Gradients of the ``K`` output directions ``cot[k]`` w.r.t. ``targets``.

        Two strategies give the same numbers: one vmapped backward (``is_grads_batched``), fast
        through matrix products, or one backward per direction, faster through ops whose batching
        rule just loops (max-pooling, ReLU's backward on some builds). With ``backward='auto'``
        the choice costs no extra backward pass: while it is open, the directions of a batch are
        split, the first ones through the vmapped backward and the last ones (at most
        ``LOOPED_TIMING_DIRECTIONS``) through the loop, and each strategy's time per direction
        is recorded; both strategies cost about the same per direction at any count, so after
        ``BACKWARD_TIMING_ROUNDS`` such batches (the order of the two swapped each time, the best
        time of each kept: one sample each picked the slower strategy on a busy machine) the
        faster one is used for all directions. An op without a batching rule decides at once for
        the loop. The choice is kept per model *structure* (see ``_backward_key``), not per model
        object: a new model of the same architecture reuses it, and a freed model's id reused by
        another one cannot hand it a choice made for a different graph.
        """
        mode = self.backward
        key = None
        if mode == "auto":
            key = self._backward_key(out, targets, cot)
            mode = _BACKWARD_CHOICE.get(key)
        if mode == "batched":
            grads = _backward_batched(out, targets, cot, retain)
            if grads is None:  # an op without a batching rule
                grads = _backward_looped(out, targets, cot, retain)
            return grads
        if mode == "looped":
            return _backward_looped(out, targets, cot, retain)
        return _backward_sampled(key, out, targets, cot, retain)

    def _backward_key(self, out, targets, cot):
        """What the faster backward strategy depends on: the model's structure (per module its
        type, training flag and its own parameters' shapes), the shapes of the targets' gradients
        and of the outputs without the batch dimension (a smaller last batch reuses the choice),
        the number of directions, the dtype and the device type."""
        struct = getattr(self, "_structure_cache", None)
        if struct is None or struct[0] is not self.model:
            sig = tuple((type(m).__name__, m.training,
                         tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
                        for m in self.model.modules())
            struct = (self.model, sig)
            self._structure_cache = struct
        shapes = []
        for t in targets:
            node = getattr(t, "node", None)
            try:
                meta = node._input_metadata[t.output_nr] if node is not None else None
                shapes.append(tuple(meta.shape[1:]) if meta is not None else None)
            except (AttributeError, IndexError, RuntimeError):
                shapes.append(None)
        return (struct[1], tuple(shapes), cot.shape[0], tuple(cot.shape[2:]), cot.dtype,
                out.device.type)

    # ---------------------------------------------------------------- functional (implicit) path
    def _uses_metric(self):
        """Whether the implicit products run through the output transform's closed-form
        output metric (``J_fᵀ H J_f`` as JVP, ``H u``, VJP on the model's outputs: no square
        root of ``H``, ``O(outputs)`` memory) rather than through ``J_gᵀ J_g``."""
        return getattr(self.function, "has_metric", False) and not self.centering

    def _functional_batches(self, examples, layer_collection, raw=False):
        """Yield ``(batch, params, f)`` with ``f(params) -> (n, n_output)`` a pure function of the
        collection's parameters (a dict name -> tensor) for that batch. With ``raw`` (an output
        transform with a metric, see `_uses_metric`), yield ``(batch, params, f,
        metric)`` with ``f(params)`` the model's outputs and ``metric(f, u) = H u``."""
        _refuse_batch_statistics(self.model)
        _refuse_inference_parameters(dict(self.model.named_parameters()))
        # forward-mode AD levels are process-wide in torch ("Nested forward mode AD is not
        # supported" when two threads open one each): the functional passes of all threads run
        # one at a time (taken before the model's lock, always in that order)
        with _FORWARD_AD_LOCK, _model_lock(self.model), run_eagerly(self.model), \
                self._model_state_kept(layer_collection) as (modules, plist):
            names, constant = {}, {}
            for lid, m in modules.items():
                layer = layer_collection[lid]
                for pname, p in zip(layer.param_names(), layer.parameters_of(m)):
                    names[f"{lid}.{pname}" if lid else pname] = p
                # entries that backward treats as constants (Embedding padding row): forward
                # mode must not see their tangents either
                for pname, mask in layer.constant_entries(m).items():
                    constant[f"{lid}.{pname}" if lid else pname] = mask
            params = {k: p.detach() for k, p in names.items()}
            device = self._device()
            fn = self.function
            needs_batch = getattr(fn, "needs_batch", False) and hasattr(fn, "model_outputs")
            group = self._group()
            # the examples of each batch, for the reduction over ranks (see _counting)
            counts = self._counters[-1] if getattr(self, "_counters", None) else None
            with deferred_finite_checks():
                yield from self._functional_batch_fns(examples, fn, needs_batch, group, counts,
                                                      device, params, constant, raw)

    def _functional_batch_fns(self, examples, fn, needs_batch, group, counts, device, params,
                              constant, raw=False):
        """The loop of `_functional_batches` (inside its model state and checks)."""
        # reading the RNG state around the model's forward costs a copy of a few KB; only a
        # forward that drew from it is run again to see whether its outputs are random
        watch = self.check_deterministic
        for index, batch in enumerate(self._batches(examples)):
            batch = prepare_batch(batch, device)
            # read outside the torch.func transforms (a seed's key hashes the batch's bytes)
            info = fn.batch_info(batch, global_batch_index(index, group)) \
                if needs_batch else None
            # inference tensors (data made inside torch.inference_mode()) can't be saved
            # for backward: normal copies with the same values (see _outside_inference_mode)
            batch = tree_map(_normal_tensor, batch)

            drew = []  # whether a call of f drew from the global RNG (see below)

            def f(p, batch=batch, info=info, drew=drew):
                # buffers (e.g. BatchNorm running statistics, updated in place in training
                # mode) are copied inside the transform: torch.func refuses in-place updates
                # of captured tensors, and the model's own buffers must stay untouched
                bufs = {k: b.clone() for k, b in self.model.named_buffers()}
                p = {k: torch.where(constant[k], t.detach(), t) if k in constant else t
                     for k, t in p.items()}
                rng = _rng_state(device) if watch else None
                with _no_fused_attention(), tensors_in_model(self.model, {**p, **bufs}):
                    if raw or info is not None:
                        model_out = fn.model_outputs(*batch)
                        if watch:
                            drew.append(not _same_rng(rng, _rng_state(device)))
                        out = model_out if raw else fn.transform(model_out, info)
                    else:
                        out = self.function(*batch)
                        if watch:
                            drew.append(not _same_rng(rng, _rng_state(device)))
                if counts is not None:
                    counts[index] = out.shape[0]
                return out if raw else out.reshape(out.shape[0], -1)

            if raw:
                yield batch, params, f, (lambda out, u, info=info: fn.metric(out, u, info))
            else:
                yield batch, params, f
            if watch and any(drew):
                # the products' forward drew from the global RNG: checked once, here,
                # outside the torch.func transforms, by running it twice more
                watch = False
                self._probe_functional(f, params, device)

    def _probe_functional(self, f, params, device):
        """``RuntimeError`` if ``f(params)`` (the forward of an implicit product) gives other
        outputs when run twice (on a forked RNG: the global state is left as it was)."""
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _no_fused_attention():
            a, b = f(params), f(params)
        if not torch.is_floating_point(a) or a.numel() == 0:
            return
        diff = (a - b).abs().max().item()
        scale = a.abs().max().item()
        if not diff <= 64 * torch.finfo(a.dtype).eps * max(scale, torch.finfo(a.dtype).tiny):
            if any(m.training for m in self.model.modules()):
                raise RuntimeError(
                    f"the function is not deterministic: run twice on the same batch its "
                    f"outputs differ by up to {diff:.3g} (largest output {scale:.3g}); a random "
                    "layer in training mode makes every product random. Call model.eval(), or "
                    "pass check_deterministic=False if the randomness is intended")
            raise RuntimeError(_random_outside_modules(diff, scale))

    @staticmethod
    def _split_flat(v, params, layer_collection):
        out, start = {}, 0
        flat = v.get_flat_representation() if hasattr(v, "get_flat_representation") else v
        for k, p in params.items():
            out[k] = flat[start:start + p.numel()].view_as(p)
            start += p.numel()
        return out


_BACKWARD_NONFINITE = (
    "although the model's outputs are finite: a gradient became NaN or Inf in the backward "
    "pass, at an operation that is not differentiable where it is evaluated (e.g. "
    "torch.sqrt(h * h) or h.abs() ** 0.5 at h = 0, torch.where whose unused branch has an "
    "infinite gradient) or that overflows. Find it with "
    "torch.autograd.set_detect_anomaly(True) on a backward pass of the model, and make it "
    "differentiable there (e.g. torch.sqrt(h * h + eps))")


def _nonfinite_layers(result, layer_collection):
    """The ids of the layers whose part of ``result`` (a tensor whose last dimension is the
    collection's ``P``, or a dict keyed by layer id) holds a NaN or an Inf."""
    if isinstance(result, dict):
        bad = []
        for lid, part in result.items():
            if any(not bool(torch.isfinite(t).all()) for t in _tensor_leaves(part)):
                bad.append(lid)
        return bad
    if torch.is_tensor(result) and result.dim() and \
            result.shape[-1] == layer_collection.numel():
        P = result.shape[-1]
        # a dense (P, P) matrix: a layer's bad gradients also spoil its rows in the other
        # layers' columns; its diagonal says whose they are
        part = torch.diagonal(result) if result.shape == (P, P) else result
        ok = torch.isfinite(part).reshape(-1, P).all(dim=0)
        return [lid for lid in layer_collection.layer_ids()
                if not bool(ok[layer_collection.slice(lid)].all())]
    return []


def _tensor_leaves(obj):
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensor_leaves(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensor_leaves(v)]
    return []


def check_statistic(result, layer_collection):
    """``ValueError`` naming the layers if the statistic ``result`` of a pass (whose outputs
    were checked finite) holds a NaN or an Inf: checked once per pass, one host
    synchronisation on an accelerator."""
    leaves = [t for t in _tensor_leaves(result) if t.is_floating_point() and t.numel()]
    if not leaves:
        return
    if leaves[0].device.type == "cpu":
        ok = all(all_finite(t) for t in leaves)
    else:
        ok = bool(torch.stack([torch.isfinite(t).all() for t in leaves]).all())
    if ok:
        return
    lids = _nonfinite_layers(result, layer_collection)
    where = f" of layer(s) {', '.join(repr(lid) for lid in lids)}" if lids else ""
    raise ValueError(f"the statistics{where} contain NaN or Inf " + _BACKWARD_NONFINITE)


def _check_product(out, inp, what):
    """``ValueError`` if an implicit product ``out`` holds a NaN or an Inf (one check per
    product, i.e. per pass over the examples)."""
    if not torch.is_tensor(out) or not out.is_floating_point() or all_finite(out):
        return
    t = _flat(inp) if hasattr(inp, "get_flat_representation") else inp
    if torch.is_tensor(t) and t.is_floating_point() and not all_finite(t):
        raise ValueError(f"{what}: the vector multiplied contains NaN or Inf")
    raise ValueError(f"{what}: the product contains NaN or Inf " + _BACKWARD_NONFINITE)


def _rng_state(device):
    """The global RNG state that a forward on ``device`` draws from: the CPU generator's, and
    the device's generator's for an accelerator."""
    state = [torch.get_rng_state()]
    if device.type == "cuda":
        state.append(torch.cuda.get_rng_state(device))
    return state


def _same_rng(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _random_outside_modules(diff, scale):
    return (
        f"the function is not deterministic: run twice on the same batch its outputs differ by "
        f"up to {diff:.3g} (largest output {scale:.3g}), and every module is in eval mode: the "
        "forward draws from the global random number generator outside a module's training "
        "mode (e.g. F.dropout(x, p, training=True), or noise from torch.rand / torch.randn in "
        "forward), which makes every matrix random. Make that randomness follow the module's "
        "mode (F.dropout(x, p, training=self.training), or nn.Dropout), or pass "
        "check_deterministic=False if the randomness is intended")


class _InstanceForward:
    """While the generator's hooks are on ``module``, its calls run through the forward of the
    call's recorder (``active[-1]``, pushed by the pre-hook; see
    ``AbstractLayer.internal_recorder``) when it has one. Set on the module *instance* (its
    ``__dict__``), never on the class or on a function of torch, so that other modules, other
    models and other threads are not affected; `remove` puts back what was there."""

    def __init__(self, module, active):
        self.module = module
        self.saved = module.__dict__.get("forward", _InstanceForward)
        original = module.forward

        def forward(*args, **kwargs):
            rec = active[-1] if active and not is_recording_paused() else None
            if rec is None or not hasattr(rec, "forward"):
                return original(*args, **kwargs)
            return rec.forward(original, *args, **kwargs)

        module.__dict__["forward"] = forward

    def remove(self):
        if self.saved is _InstanceForward:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.__dict__["forward"] = self.saved


class _Broadcast:
    """What the forward hooks of a generator expand shared outputs to: ``n``, the number of
    examples of the batch being run (None: expand nothing), whether an output was expanded or
    marked shared in the current forward pass, whether one of batch dimension 1 was expanded
    (``widened``; ``last_widened``: in the last pass, read after it ended), and
    ``keep_ones``: outputs of batch dimension 1 are left as they are and get the backward pass
    of their own of outputs with no batch axis (for a model that repeats such an output along
    the batch itself, which the expanded copy would break)."""

    __slots__ = ("n", "expanded", "widened", "last_widened", "keep_ones")

    def __init__(self):
        self.n, self.expanded, self.keep_ones = None, False, False
        self.widened = self.last_widened = False


def _expand_axis(t, axis, n):
    """``t`` with its size-1 axis ``axis`` repeated ``n`` times (a copy: the model may write to
    it in place); other values as they are."""
    if not isinstance(t, torch.Tensor) or t.dim() <= axis or t.shape[axis] != 1:
        return t
    shape = list(t.shape)
    shape[axis] = n
    return t.expand(shape).clone()


def _rebuild_tuple(output, first):
    """``output`` (a tuple, possibly a named tuple) with its first element replaced."""
    if hasattr(output, "_fields"):
        return output._replace(**{output._fields[0]: first})
    return (first, *output[1:])


#: model -> {(function/collection key, n, candidate shapes): the calls found shared}
_COINCIDENT_SHARED = weakref.WeakKeyDictionary()


def _mark_coincident_shared(out, model, function, layer_collection, modules, calls):
    """Mark as shared (see ``Call.expand_shared``) the calls whose output has the batch's ``n``
    along its batch axis without holding the examples there: a ``(T, d)`` table looked up on
    positions of shape ``(T,)``, or returned as is, when ``T == n`` (e.g. the last batch of a
    loader). Its shape cannot tell it from a batched output; its gradients can. Row ``j`` of a
    batched output reaches example ``j``'s outputs only, so the gradient of a combination of
    example 0's outputs w.r.t. it is exactly zero off row 0; a shared output's rows reach every
    example. The shared treatment is exact for such a call (each example gets the gradient
    w.r.t. the whole output), as it is for any output that couples the examples.

    One backward pass of one direction, once per model, function, collection, ``n`` and shapes
    of the outputs in a process (a loader's batches have one or two sizes)."""
    n = out.shape[0]
    cands = []
    for lid, store in calls.items():
        for i, c in enumerate(store):
            if c.shared is not None:
                continue
            axis = (c.spec or layer_collection[lid]).batch_axis(c.module or modules[lid])
            t = c.targets[0]
            if len(t.shape) > axis and t.shape[axis] == n and \
                    not isinstance(t.edge, torch.Tensor):
                cands.append((lid, i, c, axis))
    if not cands or not out.requires_grad:
        return
    key = (uses_key(model, function, layer_collection), n,
           tuple((lid, i, tuple(c.targets[0].shape)) for lid, i, c, _ in cands))
    try:
        known = _COINCIDENT_SHARED.get(model, {}).get(key)
    except TypeError:
        known = None
    if known is None:
        # a fixed pseudo-random combination (no cancellation between directions; the global
        # RNG is left alone)
        gen = torch.Generator().manual_seed(0)
        w = torch.rand(out.shape[1], generator=gen, dtype=torch.float64) + 0.5
        cot = torch.zeros_like(out)
        cot[0] = w.to(dtype=out.dtype, device=out.device)
        grads = torch.autograd.grad(out, [c.targets[0].edge for _, _, c, _ in cands], cot,
                                    retain_graph=True, allow_unused=True)
        known = set()
        for (lid, i, c, axis), g in zip(cands, grads):
            if g is not None and g.narrow(axis, 1, n - 1).count_nonzero().item():
                known.add((lid, i))
        try:
            _COINCIDENT_SHARED.setdefault(model, {})[key] = known
        except TypeError:
            pass
    for lid, i, c, axis in cands:
        if (lid, i) in known:
            c.shared = (n, axis)


def _refuse_unbatched_calls(layer_collection, modules, calls, n):
    """``RuntimeError`` for a call of a layer's module whose output does not hold the ``n``
    examples of the batch along its batch axis, nor one shared example that the hooks expanded
    (see ``_make_hook``): e.g. T5's relative position bias, an Embedding looked up on a
    ``(T, T)`` table. The gradient w.r.t. such an output is already summed over the examples,
    so per-example gradients (and every matrix built from them) cannot be recovered from it."""
    for lid, store in calls.items():
        for c in store:
            if getattr(c, "shared", None) is not None:
                continue
            layer, module = c.spec or layer_collection[lid], c.module or modules[lid]
            axis = layer.batch_axis(module)
            shape = c.targets[0].shape
            if len(shape) > axis and shape[axis] != n:
                raise RuntimeError(
                    f"layer '{lid}' ({type(module).__name__}) returned an output of shape "
                    f"{tuple(shape)} for a batch of {n} examples: its output has no batch axis "
                    f"(dimension {axis} is not the examples; e.g. T5's relative position bias, "
                    "looked up on a (T, T) table, then broadcast over the batch), so its "
                    "gradients are summed over the examples and per-example quantities cannot "
                    "be computed (outputs with batch dimension 1 are expanded to the batch "
                    "automatically). Fixes: use PMatImplicit (exact through torch.func), or "
                    "leave the layer out of the LayerCollection")


def _examples_count(examples):
    """The number of examples a DataLoader will yield if it can be known without iterating
    (a sized sampler); None otherwise (iterables, single mini-batches: the size is then checked
    batch by batch)."""
    if not isinstance(examples, DataLoader):
        return None
    try:
        n = len(examples.sampler) if examples.batch_sampler is not None else len(examples)
    except TypeError:
        return None
    bs = examples.batch_size
    if bs and examples.drop_last:
        n = (n // bs) * bs
    return n


def _required(value, name, method):
    # the statistic methods take every argument by keyword with a default (upstream's generic
    # (*args, **kwargs) signatures); the ones without a meaningful default are checked here
    if value is None:
        raise TypeError(f"{method}() needs the argument '{name}'")


def _flat(v):
    """The flat ``(P,)`` tensor of a PVector or a tensor."""
    return v.get_flat_representation() if hasattr(v, "get_flat_representation") else v


class _MeanJacobian(C.Consumer):
    """Consumer of [`TorchHooksJacobianBackend.accumulate`][nngeometry.backend.TorchHooksJacobianBackend.accumulate]: ``(1/n) Σ_x J(x)``, shape
    ``(n_output, P)`` in the collection's layout. State: ``_sum``."""

    state_attrs = ("_sum",)

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self._sum = None
        self.result = None

    def update(self, ctx):
        if self._sum is None:
            ref = ctx.calls[ctx.layer_ids()[0]][0].gy
            self._sum = torch.zeros(ctx.n_output, self.lc.numel(), dtype=ref.dtype,
                                    device=ref.device)
        rows = self._sum[ctx.k_start:ctx.k_start + ctx.K]
        for lid in ctx.layer_ids():
            rows[:, self.lc.slice(lid)] += ctx.per_example_grad(lid).sum(dim=1)
            ctx.release(lid)

    def finalize(self, n):
        self.result = self._sum.div_(n)


def _check_uniform_params(layer_collection, modules):
    """``(dtype, device)`` shared by all the collection's parameters; ``ValueError`` naming the
    first layer that differs otherwise (the statistics are accumulated in one dtype)."""
    first = None
    for lid, module in modules.items():
        for p in layer_collection[lid].parameters_of(module):
            if first is None:
                first = (lid, p.dtype, p.device)
            elif (p.dtype, p.device) != first[1:]:
                raise ValueError(
                    f"the layers of the LayerCollection do not share one dtype and device: "
                    f"'{first[0]}' has {first[1]} on {first[2]}, '{lid}' has {p.dtype} on "
                    f"{p.device}. Convert the model with model.to(dtype) / model.to(device), or "
                    "leave the differing layers out of the LayerCollection")
    if first is None:
        return None, torch.device("cpu")
    return first[1], first[2]


def _refuse_batch_statistics(model):
    """``RuntimeError`` if a BatchNorm module of ``model`` normalizes with the batch's own
    statistics (training mode, or no running statistics): each example's output then depends on
    the other examples of the batch, and per-example Jacobians are not defined."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                module.training or not module.track_running_stats):
            why = ("is in training mode" if module.track_running_stats else
                   "has track_running_stats=False")
            raise RuntimeError(
                f"BatchNorm layer '{name or type(module).__name__}' ({type(module).__name__}) "
                f"{why}: it normalizes with the statistics of the batch, which couple the "
                "examples, so per-example Jacobians are not defined. Call model.eval() before "
                "computing the matrix (its running statistics are then used)")


#: the process-wide attention flags changed by _no_fused_attention: how many blocks are inside
#: it (all threads) and the flags to put back when the last one leaves
_FUSED_LOCK = threading.Lock()
_FUSED_STATE = {"depth": 0, "saved": None}


@contextlib.contextmanager
def _no_fused_attention():
    """Turn off the fused kernels of attention: inside torch.func transforms the parameters don't
    require grad, so eval-mode nn.MultiheadAttention / TransformerEncoderLayer would take their
    fused inference path, and scaled_dot_product_attention its flash kernel: neither has
    forward-mode AD. The math implementation is used instead (same values).

    Those switches are process-wide (torch has no thread-local version), so they are counted:
    the first block to enter (in any thread) saves and sets them, the last to leave restores
    them. (Saving and restoring per block let two threads' blocks restore each other's settings
    and leave the fast path off after both had finished.) Meanwhile other threads' attention
    takes the same math path: same values, only slower."""
    from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, _sdpa_kernel

    with _FUSED_LOCK:
        if _FUSED_STATE["depth"] == 0:
            _FUSED_STATE["saved"] = (torch.backends.mha.get_fastpath_enabled(),
                                     _cur_sdpa_kernel_backends())
            torch.backends.mha.set_fastpath_enabled(False)
            _sdpa_kernel([SDPBackend.MATH])
        _FUSED_STATE["depth"] += 1
    try:
        yield
    finally:
        with _FUSED_LOCK:
            _FUSED_STATE["depth"] -= 1
            if _FUSED_STATE["depth"] == 0:
                fastpath, backends = _FUSED_STATE["saved"]
                _sdpa_kernel(backends)
                torch.backends.mha.set_fastpath_enabled(fastpath)
                _FUSED_STATE["saved"] = None


#: see _functional_batches
_FORWARD_AD_LOCK = threading.RLock()

#: one lock per model (weakly held): see _model_lock
_MODEL_LOCKS = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()
#: per thread, ``{id(model): depth}`` of the computations in progress (see in_engine_pass)
_ENGINE_PASSES = threading.local()


@contextlib.contextmanager
def _model_lock(model):
    """Computations on one model run one at a time, across threads: a build installs hooks (and
    an attention module's instance forward) on the model's modules, and the implicit products
    swap its parameters for functional tensors (``tensors_in_model``); two at once would record
    each other's calls or see each other's tensors (wrong numbers, not an error). A second
    thread waits for the first to finish; the same thread may nest (a preconditioner's product
    inside a CG solve). Different models run in parallel."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
    with lock:
        depth = _ENGINE_PASSES.__dict__.setdefault("depth", {})
        depth[id(model)] = depth.get(id(model), 0) + 1
        try:
            yield
        finally:
            depth[id(model)] -= 1
            if not depth[id(model)]:
                del depth[id(model)]


def in_engine_pass(model):
    """Whether this thread is inside one of the library's own computations on ``model`` (a
    build or an implicit product): its forward passes are not the user's (a recorder of
    training steps, `.capture`, ignores them)."""
    return id(model) in getattr(_ENGINE_PASSES, "depth", {})


@contextlib.contextmanager
def tensors_in_model(model, tensors):
    """Within the block, ``model``'s parameters and buffers named in ``tensors`` (qualified
    name -> tensor) are these tensors; the original objects are put back on exit, also on an
    exception. This is what ``torch.func`` transforms differentiate through.

    Every place holding the same original tensor (a module reached under two names, a weight
    shared by two modules) sees the new one, as ``torch.func.functional_call``'s
    ``tie_weights`` does. ``functional_call`` is not used: with a module reached under two
    names it leaves plain tensors in place of the module's Parameters (torch 2.13), which
    breaks every later use of the model."""
    owners = {}  # id(original tensor) -> [(module's _parameters or _buffers dict, name)]
    for mod in model.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None:
                    owners.setdefault(id(t), []).append((store, name))
    swapped = []
    try:
        for qualified, new in tensors.items():
            path, _, name = qualified.rpartition(".")
            mod = model.get_submodule(path)
            store = mod._parameters if name in mod._parameters else mod._buffers
            if name not in store:
                raise KeyError(f"'{qualified}' is neither a parameter nor a buffer of the model")
            for holder, key in owners.get(id(store[name]), [(store, name)]):
                swapped.append((holder, key, holder[key]))
                holder[key] = new
        yield
    finally:
        for holder, key, original in reversed(swapped):
            holder[key] = original


#: output gradients of one chunk of directions may take this much even when one direction's
#: per-example Jacobian of the whole model is smaller (see ``_chunk_size``)
DIRECTION_CHUNK_BYTES = 16 * 2 ** 20

#: 'auto': the loop takes at most this many directions of a batch while the choice is open
#: (see ``_backward_directions``)
LOOPED_TIMING_DIRECTIONS = 16
#: 'auto': batches split between the two strategies before the choice is made
BACKWARD_TIMING_ROUNDS = 2
#: structure key (``_backward_key``) -> 'batched' | 'looped', filled by 'auto'
_BACKWARD_CHOICE = {}
#: structure key -> {'batched': best seconds per direction, 'looped': ..., 'rounds': n} while
#: the choice is open
_BACKWARD_SAMPLES = {}


def _backward_batched(out, targets, cot, retain):
    """One vmapped backward for all directions; None if an op has no batching rule."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return list(torch.autograd.grad(out, targets, cot, retain_graph=retain,
                                            allow_unused=True, is_grads_batched=True))
    except RuntimeError:
        return None


def _backward_looped(out, targets, cot, retain):
    """One backward per direction, written into preallocated ``(K, ...)`` tensors."""
    K = cot.shape[0]
    grads = [None] * len(targets)
    for k in range(K):
        gk = torch.autograd.grad(out, targets, cot[k], retain_graph=retain or k < K - 1,
                                 allow_unused=True)
        for j, g in enumerate(gk):
            if g is None:
                continue
            if grads[j] is None:
                grads[j] = g.new_empty((K,) + g.shape)
            grads[j][k] = g
    return grads


def _timed(fn, device):
    """``(seconds, fn())``, synchronizing an accelerator so that the time is the work's."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - t0, result


def first_random_module(model):
    """``(name, module, p)`` of the first module of ``model`` that draws random numbers in its
    forward (a dropout module, ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout``, or an ``nn.MultiheadAttention`` with ``dropout > 0``, in training
    mode), or None. ``name`` is its qualified name (its class name for the model itself)."""
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd):
            p = module.p
        elif isinstance(module, nn.MultiheadAttention):
            p = module.dropout
        else:
            continue
        if p > 0:
            return name or type(module).__name__, module, p
    return None


def refuse_random_modules(model):
    """``RuntimeError`` naming the first module of ``model`` that draws random numbers in its
    forward (see `first_random_module`). Such a model gives a random matrix at each call,
    whose mean is not the matrix of the model used for prediction (in eval mode)."""
    found = first_random_module(model)
    if found is not None:
        name, module, p = found
        raise RuntimeError(
            f"module '{name}' ({type(module).__name__}, p={p}) is "
            "in training mode: its forward is random, so the matrix would be a random one "
            "(per-example quantities need a deterministic forward). Call model.eval() before "
            "computing the matrix, or pass check_deterministic=False if this is intended")


#: numbers (activations and parameters) one chunk of vmapped vector products may hold per
#: batch: about 32 MB in float32, measured best on an MLP (chunks of 16-25) and a
#: CNN (2-4)
_VECTOR_CHUNK_NUMBERS = 2 ** 23


def _vector_chunk(backend, m, examples, layer_collection):
    """How many of ``m`` vectors the batched products (``_mm``, ``_JV``) push through one
    vmapped pass: ``_VECTOR_CHUNK_NUMBERS // (A + P)``, with ``A`` the numbers in the outputs of
    the model's modules for the first batch (one forward without graph, measured by forward
    hooks on the model's modules) and ``P`` the collection's parameters; between 1 and ``m``.
    A few vectors (``m ≤ 4``) go through at once without measuring."""
    if m <= 4:
        return m
    counted = [0]

    def count(module, inputs, output):
        for t in (output if isinstance(output, (tuple, list)) else (output,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                counted[0] += t.numel()

    handles = []
    try:
        for module in backend.model.modules():
            if not list(module.children()):  # leaf modules: every activation once
                handles.append(module.register_forward_hook(count))
        # (the model's outputs only when the products use the output metric: the transform
        # would form the square roots the metric avoids)
        raw = getattr(backend, "_uses_metric", lambda: False)()
        for batch, params, f, *_ in backend._functional_batches(examples, layer_collection,
                                                                raw):
            with torch.no_grad():
                f(params)
            break
    finally:
        for h in handles:
            h.remove()
    per_vector = counted[0] + layer_collection.numel()
    return max(1, min(m, _VECTOR_CHUNK_NUMBERS // max(per_vector, 1)))


def _backward_sampled(key, out, targets, cot, retain):
    """The gradients of all ``K`` directions, the first ones by the vmapped backward and the
    last ones (at most ``LOOPED_TIMING_DIRECTIONS``, at least one) by the loop, each timed per
    direction and recorded under ``key``; the choice is made once ``BACKWARD_TIMING_ROUNDS``
    batches are recorded (see ``_backward_directions``). With one direction both are the same
    backward: no sample."""
    K = cot.shape[0]
    if K < 2:
        return _backward_looped(out, targets, cot, retain)
    samples = _BACKWARD_SAMPLES.setdefault(key, {"batched": math.inf, "looped": math.inf,
                                                 "rounds": 0})
    k_loop = min(LOOPED_TIMING_DIRECTIONS, K // 2)
    k_vmap = K - k_loop
    parts = {}
    order = ("batched", "looped") if samples["rounds"] % 2 == 0 else ("looped", "batched")
    for i, which in enumerate(order):
        keep = retain or i == 0
        if which == "batched":
            # the graph kept: a vmapped backward that fails may have freed part of it
            t, g = _timed(lambda: _backward_batched(out, targets, cot[:k_vmap], True), out.device)
            if g is None:  # an op without a batching rule: the loop, no more timing
                _BACKWARD_CHOICE[key] = "looped"
                _BACKWARD_SAMPLES.pop(key, None)
                if i == 0:
                    return _backward_looped(out, targets, cot, retain)
                g = _backward_looped(out, targets, cot[:k_vmap], keep)
                t = math.inf
            samples["batched"] = min(samples["batched"], t / k_vmap)
        else:
            t, g = _timed(lambda: _backward_looped(out, targets, cot[k_vmap:], keep), out.device)
            samples["looped"] = min(samples["looped"], t / k_loop)
        parts[which] = g
    samples["rounds"] += 1
    if samples["rounds"] >= BACKWARD_TIMING_ROUNDS and key not in _BACKWARD_CHOICE:
        _BACKWARD_CHOICE[key] = "batched" if samples["batched"] <= samples["looped"] \
            else "looped"
        _BACKWARD_SAMPLES.pop(key, None)
    # a target unused by the outputs is unused by every direction: None in both parts
    return [None if a is None or b is None else torch.cat([a, b])
            for a, b in zip(parts["batched"], parts["looped"])]
