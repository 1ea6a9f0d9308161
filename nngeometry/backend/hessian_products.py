"""The Hessian generator: the exact Hessian of a loss summed over the batches.

For a loss ``ℓ_b(θ) = loss_function(function(*batch_b), *batch_b)`` per batch ``b`` (a scalar,
e.g. the *summed* cross-entropy of the batch), this generator computes

    H = Σ_b ∇²_θ ℓ_b(θ)          (a sum over batches, NOT divided by the number of examples)

with respect to the parameters of a ``LayerCollection``, and offers it through the methods
that the parameter-space representations call on a generator, so that ``PMatDense``,
``PMatBlockDiag``, ``PMatDiag``, ``PMatImplicit`` (and ``PMatMixed`` groups of those) build
the Hessian unchanged.

How: every quantity is made of Hessian-vector products (HVPs), computed forward-over-reverse
with ``torch.func``: ``H v = d/dε ∇ℓ(θ + ε v)|₀ = jvp(grad(ℓ), θ, v)``, about the cost of 2-3
forward-backward passes. Products with many vectors are ``vmap``-ped over the vectors (chunks
of ``rows_per_pass`` vectors at once), never a Python loop over vectors.

Unlike a Fisher or Gauss-Newton matrix, the Hessian has no ``Jᵀ J`` structure: it is not a
sum of outer products of per-example gradients and may be indefinite. The representations
whose maths rely on that structure (KFAC, EKFAC, LowRank, QuasiDiag, and the Jacobian /
Gram-matrix products) are refused with ``NotImplementedError``.
"""
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..curvature import cross_entropy_losses
from ..layercollection import LayerCollection
from .distributed import all_reduce_tree, resolve_group
from .jacobian import TorchHooksJacobianBackend
from .model_and_data import (_check_uniform_params, _no_fused_attention, _rng_state, _same_rng,
                             constant_uses, constants_detached, default_function, model_state_kept,
                             prepare_batch, probe_functional, random_in_vmap_explained,
                             tensors_in_model, unwrap_model)


def hvp(func, primals, tangents):
    """The Hessian-vector product ``∇²func(primals) · tangents``, forward-over-reverse:
    ``d/dε ∇func(primals + ε tangents)|₀`` (``torch.func.jvp`` of ``torch.func.grad``).

    ``func`` maps ``primals`` (a tensor or a dict / tuple of tensors) to a scalar; ``tangents``
    has the structure of ``primals``; the result too."""
    return torch.func.jvp(torch.func.grad(func), (primals,), (tangents,))[1]


def batched_hvp(func, primals, batched_tangents):
    """`hvp` for ``m`` tangents at once: every leaf of ``batched_tangents`` has a leading
    axis of size ``m`` (vmapped, no Python loop); the result has the same leading axis."""
    return torch.func.vmap(lambda t: hvp(func, primals, t))(batched_tangents)


def summed_cross_entropy(outputs, *batch):
    """The default loss of `HessianBackend`: ``Σ_i -log softmax(outputs_i)[y_i]`` over
    the examples of a batch ``(inputs, targets, ...)``, summed (``reduction='sum'``) so that the
    Hessian summed over batches is the Hessian of the total loss over the data set.

    Outputs with positions (``(n, T, C)``: classes last; ``(n, C, H, W)``: classes along
    dimension 1) sum the per-position cross-entropies; a dict batch (Hugging Face style) takes
    its targets from the key ``'labels'``."""
    if len(batch) == 1 and isinstance(batch[0], Mapping) and "labels" in batch[0]:
        batch = (batch[0], batch[0]["labels"])
    if outputs.dim() == 3:
        return cross_entropy_losses(outputs, batch[1], -1).sum() if len(batch) >= 2 else \
            summed_cross_entropy(outputs.reshape(outputs.shape[0], -1))
    if len(batch) < 2:
        raise ValueError(
            "the default loss of the Hessian (summed cross-entropy) needs batches (inputs, "
            "targets, ...); for other data pass loss_function=lambda outputs, *batch: ...")
    return F.cross_entropy(outputs, batch[1], reduction="sum")


_GN_ONLY = (
    "{what} needs the Gauss-Newton structure M = Σ_x J(x)ᵀ J(x) (per-example Jacobians / "
    "gradients), which the Hessian of a loss does not have: {family} cannot represent a "
    "Hessian. Use PMatDense, PMatBlockDiag, PMatDiag or PMatImplicit with Hessian(...), or "
    "FIM(...) for the Gauss-Newton / Fisher matrix that {family} approximates")


class HessianBackend:
    """Computes the Hessian ``H = Σ_b ∇²_θ ℓ_b`` of a loss summed over batches, and products
    with it (see the module docstring).

    Args:
        model: the ``torch.nn.Module``.
        loss_function: ``loss_function(outputs, *batch) -> scalar``, the loss of one batch
            (``outputs = function(*batch)``). Default `summed_cross_entropy`: the
            cross-entropy of ``outputs`` against ``batch[1]`` summed over the batch, so that
            ``H`` is the Hessian of the total (not mean) loss. With a mean-reduced loss, ``H``
            is the sum over batches of the per-batch mean Hessians.
        function: ``function(*batch) -> outputs``, passed to ``loss_function`` as is (no
            reshaping). Defaults to ``model(batch[0])``.
        verbose: show a progress bar over the batches.
        rows_per_pass: how many Hessian-vector products are vmapped at once when building
            the dense matrix, the layer blocks or the diagonal (memory ≈ that many copies of a
            batch's activations; time is unchanged).
        distributed: data parallelism over ``torch.distributed`` (see
            [`TorchHooksJacobianBackend`][nngeometry.backend.TorchHooksJacobianBackend]): each rank passes its shard
            and every result is the Hessian of the loss summed over all the ranks' batches
            (one all_reduce per result).
        process_group: the group to reduce over (default: the world).
        layer_collection: the collection used by the methods called without one (nngeometry
            0.4 builds the generator with it); default: every layer of the model.

    Only the parameters of the ``LayerCollection`` given to each method are differentiated;
    the model's other parameters are constants. The model's buffers and ``requires_grad``
    flags are left as they were.
    """

    def __init__(self, model, loss_function=None, function=None, verbose=False, rows_per_pass=64,
                 distributed=None, process_group=None, layer_collection=None):
        if loss_function is not None and not callable(loss_function):
            raise TypeError(f"loss_function must be callable (outputs, *batch) -> scalar, got "
                            f"{type(loss_function).__name__}")
        if int(rows_per_pass) < 1:
            raise ValueError(f"rows_per_pass must be ≥ 1, got {rows_per_pass}")
        model = unwrap_model(model)
        self.model = model
        self.function = function if function is not None else default_function(model)
        self.loss_function = loss_function if loss_function is not None else summed_cross_entropy
        self.verbose = verbose
        self.rows_per_pass = int(rows_per_pass)
        # the collection used by the methods called without one (nngeometry 0.4 builds the
        # generator with it: TorchFuncHessianBackend(model, function, layer_collection))
        self.layer_collection = layer_collection
        # reuse the Jacobian generator's model-state keeping and batch iteration
        self._helper = TorchHooksJacobianBackend(model, self.function, verbose=verbose,
                                                 distributed=distributed,
                                                 process_group=process_group)
        resolve_group(distributed, process_group)
        self.distributed = distributed
        self.process_group = process_group

    def _reduce(self, local, what):
        """``local`` (a sum over this rank's batches: a tensor, a dict of tensors, or None
        without batches) summed over the ranks when data-parallel (one all_reduce)."""
        group = resolve_group(getattr(self, "distributed", None),
                              getattr(self, "process_group", None))
        if group is None:
            return local
        (out,), _ = all_reduce_tree([local], 0 if local is None else 1, group, what,
                                    self._helper._device())
        return out

    # ================================================================== dtype, device
    def _collection(self, layer_collection):
        """``layer_collection``, else the generator's, else every layer of the model."""
        if layer_collection is not None:
            return layer_collection
        if self.layer_collection is not None:
            return self.layer_collection
        return LayerCollection.from_model(self.model)

    def get_device(self, layer_collection=None):
        """The device of the collection's parameters (``ValueError`` if they differ)."""
        layer_collection = self._collection(layer_collection)
        return _check_uniform_params(layer_collection,
                                     layer_collection.get_layerid_module_map(self.model))[1]

    def get_dtype(self, layer_collection=None):
        """The dtype of the collection's parameters (``ValueError`` if they differ)."""
        layer_collection = self._collection(layer_collection)
        return _check_uniform_params(layer_collection,
                                     layer_collection.get_layerid_module_map(self.model))[0]

    # ================================================================== dense statistics
    @random_in_vmap_explained
    def get_covariance_matrix(self, examples, layer_collection=None):
        """``(P, P)``: the Hessian ``H = Σ_b ∇²ℓ_b`` w.r.t. the collection's parameters, in its
        layout. Costs ``P`` HVPs per batch (vmapped by ``rows_per_pass``); symmetrized
        (``(H + Hᵀ)/2``) to remove round-off asymmetry."""
        layer_collection = self._collection(layer_collection)
        P = layer_collection.numel()
        H = None
        for params, loss, keys in self._functional_batches(examples, layer_collection):
            Hb = torch.cat([self._hvp_rows(loss, params, keys, self._basis(i0, i1, P, params))
                            for i0, i1 in self._chunks(P)], dim=0)
            H = Hb if H is None else H + Hb
        H = self._summed_checked(H, "the Hessian")
        return (H + H.t()) / 2

    @random_in_vmap_explained
    def get_covariance_layer_blocks(self, examples, layer_collection=None):
        """``{layer_id: (p_l, p_l)}``: the diagonal blocks ``∂²ℓ/∂θ_l²`` of ``H``, each built
        from HVPs in that layer's parameters only (``p_l`` HVPs per layer and batch; no
        cross-layer block is formed); symmetrized."""
        layer_collection = self._collection(layer_collection)
        blocks = None
        for params, loss, keys in self._functional_batches(examples, layer_collection):
            new = {}
            for lid, lkeys in self._layer_keys(layer_collection, keys).items():
                p_l = layer_collection[lid].numel()
                new[lid] = torch.cat(
                    [self._hvp_rows(loss, params, lkeys, self._basis(i0, i1, p_l, params, lkeys))
                     for i0, i1 in self._chunks(p_l)], dim=0)
            blocks = new if blocks is None else {k: blocks[k] + new[k] for k in blocks}
        blocks = self._reduce(blocks, "the Hessian's blocks")
        self._check_nonempty(blocks)
        for b in blocks.values():
            self._check_finite(b)
        return {lid: (b + b.t()) / 2 for lid, b in blocks.items()}

    @random_in_vmap_explained
    def get_covariance_diag(self, examples, layer_collection=None):
        """``(P,)``: the exact diagonal of ``H``. Costs ``P`` HVPs per batch (each restricted
        to one layer's parameters, vmapped by ``rows_per_pass``) and ``rows_per_pass × p_l``
        memory at a time: as expensive in time as the dense matrix, but never ``P²`` memory.
        (A stochastic estimate, e.g. Hutchinson's, would be cheaper but not exact.)"""
        layer_collection = self._collection(layer_collection)
        diag = None
        for params, loss, keys in self._functional_batches(examples, layer_collection):
            parts = []
            for lid, lkeys in self._layer_keys(layer_collection, keys).items():
                p_l = layer_collection[lid].numel()
                for i0, i1 in self._chunks(p_l):
                    rows = self._hvp_rows(loss, params, lkeys, self._basis(i0, i1, p_l, params, lkeys))
                    idx = torch.arange(i1 - i0, device=rows.device)
                    parts.append(rows[idx, i0 + idx])
            d = torch.cat(parts)
            diag = d if diag is None else diag + d
        diag = self._summed_checked(diag, "the Hessian's diagonal")
        return diag

    # ================================================================== implicit products
    def implicit_mv(self, v, examples, layer_collection=None):
        """``(P,)``: ``H v = Σ_b ∇²ℓ_b v``, one forward-over-reverse HVP per batch."""
        layer_collection = self._collection(layer_collection)
        out = None
        for params, loss, keys in self._functional_batches(examples, layer_collection):
            flat = v.get_flat_representation() if hasattr(v, "get_flat_representation") else v
            tangents = self._split(flat.unsqueeze(0), params, keys)
            tangents = {k: t[0] for k, t in tangents.items()}
            hv = hvp(loss, params, tangents)
            flat_hv = torch.cat([hv[k].reshape(-1) for k in keys])
            out = flat_hv if out is None else out + flat_hv
        out = self._summed_checked(out, "a Hessian-vector product")
        return out

    def implicit_vTMv(self, v, examples, layer_collection=None):
        """``vᵀ H v`` (a scalar tensor; may be negative: ``H`` is not PSD in general)."""
        layer_collection = self._collection(layer_collection)
        flat = v.get_flat_representation() if hasattr(v, "get_flat_representation") else v
        return flat @ self.implicit_mv(flat, examples, layer_collection)

    @random_in_vmap_explained
    def implicit_mm(self, V, examples, layer_collection=None):
        """``(m, P)``: ``H v_j`` for the rows of ``V`` ``(m, P)``, HVPs vmapped over the rows
        (all ``m`` at once: the caller chunks, e.g. ``PMatImplicit(rows_per_pass=...)``)."""
        layer_collection = self._collection(layer_collection)
        out = None
        for params, loss, keys in self._functional_batches(examples, layer_collection):
            rows = self._hvp_rows(loss, params, keys, self._split(V, params, keys))
            out = rows if out is None else out + rows
        out = self._summed_checked(out, "Hessian-vector products")
        return out

    # ================================================================== refused (need J)
    def get_kfac_blocks(self, examples, layer_collection, approx="expand", sqrt_k_split=False):
        raise NotImplementedError(_GN_ONLY.format(what="KFAC factors", family="PMatKFAC / PMatEKFAC"))

    def get_kfac_or_layer_blocks(self, examples, layer_collection, approx="expand"):
        raise NotImplementedError(_GN_ONLY.format(
            what="per-example statistics (KFAC factors or per-layer blocks)",
            family="a representation built from per-example statistics (e.g. PMatEKFACBlockDiag)"))

    def get_kfe_diag(self, kfe, examples, layer_collection):
        raise NotImplementedError(_GN_ONLY.format(what="EKFAC's diagonal", family="PMatEKFAC"))

    def accumulate(self, examples, layer_collection, consumer):
        raise NotImplementedError(_GN_ONLY.format(
            what=f"per-example statistics ({type(consumer).__name__})",
            family="a representation built from per-example statistics (e.g. PMatEKFACBlockDiag)"))

    def get_covariance_quasidiag(self, examples, layer_collection=None):
        raise NotImplementedError(_GN_ONLY.format(what="the quasi-diagonal", family="PMatQuasiDiag"))

    def get_jacobian(self, examples, layer_collection=None):
        raise NotImplementedError(_GN_ONLY.format(what="the per-example Jacobian factor",
                                                  family="PMatLowRank"))

    def get_gram_matrix(self, examples, layer_collection=None):
        raise NotImplementedError(_GN_ONLY.format(what="the Gram matrix", family="FMatDense"))

    def implicit_Jv(self, v, examples, layer_collection):
        raise NotImplementedError(_GN_ONLY.format(what="Jacobian-vector products",
                                                  family="PFMapImplicit"))

    def implicit_JTv(self, w, examples, layer_collection):
        raise NotImplementedError(_GN_ONLY.format(what="vector-Jacobian products",
                                                  family="PFMapImplicit"))

    def implicit_JV(self, V, examples, layer_collection):
        raise NotImplementedError(
            "PMatImplicit.mapTMmap factors M = JᵀJ through Jacobian-vector products, which the "
            "Hessian does not have; for a Hessian compute Q = pfmap.to_torch() and "
            "H.mmap(pfmap).to_torch() and contract them (einsum('kip,kjp->ij', Q, HQ)), or use "
            "PMatDense")

    # ================================================================== internals
    def _chunks(self, p):
        return [(i0, min(p, i0 + self.rows_per_pass)) for i0 in range(0, p, self.rows_per_pass)]

    @staticmethod
    def _basis(i0, i1, p, params, keys=None):
        """Rows ``i0:i1`` of the ``p × p`` identity, split into tangents of ``keys``."""
        keys = list(params) if keys is None else keys
        ref = params[keys[0]]
        E = torch.zeros(i1 - i0, p, dtype=ref.dtype, device=ref.device)
        E[torch.arange(i1 - i0), torch.arange(i0, i1)] = 1
        return HessianBackend._split(E, params, keys)

    @staticmethod
    def _split(V, params, keys):
        """Rows of ``V`` ``(m, p)`` (``p`` the size of ``keys``) as ``{key: (m, *shape)}``."""
        out, start = {}, 0
        for k in keys:
            n = params[k].numel()
            out[k] = V[:, start:start + n].reshape(V.shape[0], *params[k].shape)
            start += n
        if start != V.shape[1]:
            raise ValueError(f"vectors of size {V.shape[1]} do not match the {start} parameters "
                             "of the LayerCollection")
        return out

    @staticmethod
    def _hvp_rows(loss, params, keys, tangents):
        """``(m, p_keys)``: the rows ``∇²_{keys} ℓ · t_j`` for the ``m`` tangents (a dict over
        ``keys``), the other parameters held constant; HVPs vmapped over the tangents."""
        fixed = {k: t for k, t in params.items() if k not in tangents}
        sub = {k: params[k] for k in keys}

        def loss_of_sub(s):
            return loss({**fixed, **s})

        out = batched_hvp(loss_of_sub, sub, tangents)
        m = next(iter(tangents.values())).shape[0]
        return torch.cat([out[k].reshape(m, -1) for k in keys], dim=1)

    @staticmethod
    def _layer_keys(layer_collection, keys):
        """``{layer_id: [param keys of that layer]}`` in layout order."""
        out = {}
        for lid in layer_collection.layer_ids():
            prefix = f"{lid}." if lid else ""
            out[lid] = [prefix + n for n in layer_collection[lid].param_names()]
        assert [k for ks in out.values() for k in ks] == keys
        return out

    def _functional_batches(self, examples, layer_collection):
        """Yield ``(params, loss, keys)`` per batch: ``loss(p) -> scalar`` the batch's loss as a
        pure function of the collection's parameters (a dict ``key -> tensor``; ``keys`` in
        layout order), the model's state kept as it was."""
        helper = self._helper
        with model_state_kept(helper.model, layer_collection) as (modules, _):
            named = {}
            for lid, m in modules.items():
                layer = layer_collection[lid]
                prefix = f"{lid}." if lid else ""
                for pname, p in zip(layer.param_names(), layer.parameters_of(m)):
                    named[prefix + pname] = p
            # entries that backward treats as constants (Embedding padding row), in the uses
            # that declare them, as in the Jacobian generator
            constant = constant_uses(self.model, named)
            params = {k: p.detach() for k, p in named.items()}
            keys = list(params)
            # the model's other parameters are constants: passed detached, so that no autograd
            # graph is built through them and no result requires grad
            others = {k: p.detach() for k, p in self.model.named_parameters() if k not in params}
            device = helper._device()
            # randomness outside the modules (F.dropout(x, training=True)): a forward that
            # drew from the global RNG is run twice more and compared (see the Jacobian
            # generator's check_deterministic)
            watch = helper.check_deterministic
            for batch in helper._batches(examples):
                batch = prepare_batch(batch, device)
                drew = []

                def loss(p, batch=batch, drew=drew):
                    # buffers are cloned inside the transform: torch.func refuses in-place
                    # updates of captured tensors (training-mode BatchNorm), and the model's
                    # own buffers must stay untouched
                    bufs = {k: b.clone() for k, b in self.model.named_buffers()}
                    rng = _rng_state(device) if watch else None
                    with _no_fused_attention(), tensors_in_model(self.model,
                                                                 {**others, **p, **bufs}), \
                            constants_detached(constant, p):
                        out = self.function(*batch)
                    if watch:
                        drew.append(not _same_rng(rng, _rng_state(device)))
                    value = self.loss_function(out, *batch)
                    if not isinstance(value, torch.Tensor) or value.numel() != 1:
                        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                        raise ValueError(
                            f"loss_function must return a scalar tensor (the loss of the whole "
                            f"batch, e.g. reduction='sum'), got {shape}")
                    return value.reshape(())

                yield params, loss, keys
                if watch and any(drew):
                    watch = False
                    probe_functional(self.model, lambda q: loss(q).reshape(1, 1), params, device)

    def _summed_checked(self, local, what):
        """``local`` summed over the ranks (`_reduce`), refused when no batch was seen or when
        it holds NaN or Inf."""
        total = self._reduce(local, what)
        self._check_nonempty(total)
        self._check_finite(total)
        return total

    @staticmethod
    def _check_nonempty(result):
        if result is None:
            raise ValueError("the examples yielded no data (empty loader): nothing to compute from")

    @staticmethod
    def _check_finite(t):
        if not torch.isfinite(t).all():
            raise ValueError(
                "the Hessian contains NaN or Inf; check the inputs (NaN/Inf in the data?), the "
                "model's parameters and the loss_function")
