"""The matrix-free products with ``M = (1/n) Σ_x J(x)ᵀ J(x)`` and with the per-example
Jacobians, through ``torch.func``: ``M v``, ``vᵀ M v``, ``M V``, ``J v``, ``Jᵀ w``, ``J V``,
without forming ``M`` or ``J``.

`MatrixFreeProducts` runs one functional pass per product: per batch a pure function
``f(params)`` of the collection's parameters (`MatrixFreeProducts._functional_batches`, the
model's tensors swapped in with `model_and_data.tensors_in_model`), then forward- and reverse-mode
products of ``f``; under data parallelism the local products are reduced over the ranks.
The public products (`TorchHooksJacobianBackend.implicit_mv`, ...) add the centering
correction and the checks.
"""
import contextlib
import functools

import torch
import torch.autograd.forward_ad as fwAD
import torch.distributed as dist
from torch.utils._pytree import tree_map

from .distributed import all_gather_rows, all_reduce_tree, global_batch_index
from .model_and_data import (_FORWARD_AD_LOCK, _flat, _no_fused_attention,
                             _refuse_batch_statistics, _refuse_inference_parameters, _rng_state,
                             _same_rng, batch_size_of, constant_uses, constants_detached,
                             deferred_finite_checks, iterate_batches, model_lock, model_state_kept,
                             prepare_batch, probe_functional, tensors_in_model)
from .strategy import _grad, _vector_chunk
from ..layercollection import run_eagerly
from . import consumers


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


def _normal_tensor(x):
    """A normal tensor with the values of ``x`` if ``x`` (or a PVector's flat tensor) is an
    inference tensor; ``x`` itself otherwise. Call outside inference mode."""
    t = _flat(x) if hasattr(x, "get_flat_representation") else x
    if isinstance(t, torch.Tensor) and torch.is_inference(t):
        return t.clone()
    return x


class MatrixFreeProducts:
    """The uncentered products on this process's examples and their reduction over ranks.
    Mixed into `TorchHooksJacobianBackend` (uses its ``model``, ``function``, ``centering``,
    ``check_deterministic``, ``_counters``, ``_group``, ``_batches`` and the checks of the pass driver)."""

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
            except consumers.EmptyExamplesError:
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

    def _global_JTv(self, w, examples, lc, group):
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
        except consumers.EmptyExamplesError:
            local = None
        (out,), total = all_reduce_tree([local], n_local if local is not None else 0, group,
                                        "implicit_JTv", self._device())
        self._check_nonempty(total)
        return out

    def _mv(self, v, examples, layer_collection):
        """``M v = (1/n) Σ_x J(x)ᵀ J(x) v`` without forming ``M``: a Jacobian-vector product
        then a vector-Jacobian product per batch. Returns the flat ``(P,)`` tensor.

        One forward pass per batch: the parameters are forward-mode duals (tangent ``v``) that
        also require grad, so the same pass gives the outputs' graph and ``J v``; the backward
        pass from the primal outputs with cotangent ``J v`` gives ``Jᵀ J v``. (A separate
        ``vjp`` and ``jvp`` ran the forward twice: 1.3x slower on an MLP and a transformer.)

        That pass also keeps the tangents' activations for the backward pass (the forward-mode
        formulas are recorded too): about twice a training step's activations. With the
        closed-form output metric (the model's outputs are deterministic), a model whose
        activations exceed ``MV_ONE_PASS_BYTES`` per batch (measured on the first batch, which
        goes the two-pass way) gets the JVP without a graph, then a plain forward and backward
        for the VJP: the peak of a training step, for one more forward."""
        out = None
        n_total = 0
        raw = self._uses_metric()
        for batch, params, f, *metric in self._functional_batches(examples, layer_collection,
                                                                   raw):
            tangents = self._split_flat(v, params, layer_collection)
            leaves = {k: p.detach().requires_grad_(True) for k, p in params.items()}
            two_pass = raw and getattr(self, "_mv_two_pass", None) is not False
            if two_pass:
                # primals that do not require grad: forward mode only, no graph recorded
                with fwAD.dual_level(), _activation_counter(self.model) as seen:
                    jv = fwAD.unpack_dual(f({k: fwAD.make_dual(p.detach(), tangents[k])
                                             for k, p in leaves.items()}))[1]
                if getattr(self, "_mv_two_pass", None) is None:
                    self._mv_two_pass = seen[0] > MV_ONE_PASS_BYTES
                with torch.enable_grad():
                    outputs = f(leaves)
            else:
                with fwAD.dual_level(), torch.enable_grad():
                    outputs = f({k: fwAD.make_dual(p, tangents[k]) for k, p in leaves.items()})
                    outputs, jv = fwAD.unpack_dual(outputs)
            self._check_finite(outputs)
            if out is None:
                first = next(iter(leaves.values()))
                out = torch.zeros(sum(p.numel() for p in leaves.values()),
                                  dtype=first.dtype, device=first.device)
            n_total += outputs.shape[0]
            if jv is None or not outputs.requires_grad:
                # the outputs do not depend on the collection's parameters: M v = 0 here
                continue
            w = jv.detach()
            # the tangents' part of the graph (forward-mode activations) is freed before the
            # backward pass, which needs the primal part only
            del jv
            if metric:  # J_fᵀ H J_f v: the output metric between the JVP and the VJP
                w = metric[0](outputs.detach(), w)
            g = _grad(outputs, list(leaves.values()), w, allow_unused=True)
            del outputs, w
            # added in place into each parameter's slice of one (P,) sum: no concatenated copy
            start = 0
            for gk, p in zip(g, leaves.values()):
                if gk is not None:
                    out[start:start + p.numel()] += gk.reshape(-1)
                start += p.numel()
            del g
        self._check_nonempty(n_total)
        return out.div_(n_total)

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
        with _FORWARD_AD_LOCK, model_lock(self.model), run_eagerly(self.model), \
                model_state_kept(self.model, layer_collection) as (modules, plist):
            names = {}
            for lid, m in modules.items():
                layer = layer_collection[lid]
                for pname, p in zip(layer.param_names(), layer.parameters_of(m)):
                    names[f"{lid}.{pname}" if lid else pname] = p
            # entries that backward treats as constants (Embedding padding row): forward
            # mode must not see their tangents either, in the uses that declare them
            constant = constant_uses(self.model, names)
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
                rng = _rng_state(device) if watch else None
                with _no_fused_attention(), tensors_in_model(self.model, {**p, **bufs}), \
                        constants_detached(constant, p):
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
                probe_functional(self.model, f, params, device)

    @staticmethod
    def _split_flat(v, params, layer_collection):
        out, start = {}, 0
        flat = v.get_flat_representation() if hasattr(v, "get_flat_representation") else v
        for k, p in params.items():
            out[k] = flat[start:start + p.numel()].view_as(p)
            start += p.numel()
        return out


#: activations (bytes, summed over the outputs of the model's leaf modules for one batch) from
#: which the closed-form ``mv`` runs its JVP and VJP as two passes (see ``_mv``)
MV_ONE_PASS_BYTES = 256 * 2 ** 20


@contextlib.contextmanager
def _activation_counter(model):
    """Within the block, ``seen[0]`` sums the bytes of the floating-point outputs of the
    model's leaf modules (forward hooks, removed on exit)."""
    seen = [0]

    def count(module, inputs, output):
        for t in (output if isinstance(output, (tuple, list)) else (output,)):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                seen[0] += t.numel() * t.element_size()

    handles = [m.register_forward_hook(count) for m in model.modules()
               if not list(m.children())]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
