"""What one mini-batch gives to the consumers of the Jacobian generator.

For every layer of the collection and every call of its module during the forward pass, a
`Call` records the module's input ``x`` and, after the batched backward pass, ``gy``: the
gradients of ``K`` output directions w.r.t. the module's output, shape ``(K, n, *out_shape)``.
`BatchContext` turns those into the statistics that representations need, with caching,
so that two consumers asking for the same per-example gradients share the work.
"""
import copy
import weakref

import torch
from torch.func import functional_call

from ..layer_types.base import (is_multiblock, kfac_block_list, project_blocks_to_kfe,
                                project_to_kfe, recording_paused, row_chunked_diag_into,
                                rows_compatible, same_maths)
from ..maths.gram_accumulator import GramRows
from .strategy import _grad

#: model -> keys of (function, collection) whose parameter uses were verified in this process
_USES_VERIFIED = weakref.WeakKeyDictionary()


def _function_key(function):
    """What identifies the computation of ``function`` for `check_parameter_uses`: the
    user's function under any output transform (a variant changes the outputs' directions, not
    which parameters the forward uses); the default ``model(inputs)`` is one key per model; a
    user function is its code and the identities of what its closure holds (a lambda written
    once in a loop over models gets a key per model)."""
    while hasattr(function, "function") and callable(function.function):
        function = function.function
    if getattr(function, "nngeometry_default_of", None) is not None:
        return "default"
    code = getattr(function, "__code__", None)
    if code is None:
        return ("object", id(function))
    cells = tuple(id(c.cell_contents) for c in (function.__closure__ or ()))
    return (code, cells, id(getattr(function, "__self__", None)))


def uses_key(model, function, layer_collection):
    """The key under which the parameter-use check of ``(model, function, collection)`` is
    remembered, or None when it cannot be remembered (a model that cannot be weakly referenced).
    The parameters' identities are part of it: a module given a new parameter is checked again."""
    params = tuple(id(p) for p in model.parameters()) if hasattr(model, "parameters") else ()
    tied = tuple((lid, tuple(name for name, _ in uses))
                 for lid, uses in getattr(layer_collection, "tied", {}).items())
    return (_function_key(function), tuple(layer_collection.layer_ids()), params, tied)


def uses_verified(model, key):
    try:
        return key in _USES_VERIFIED.get(model, ())
    except TypeError:
        return False


def mark_uses_verified(model, key):
    try:
        _USES_VERIFIED.setdefault(model, set()).add(key)
    except TypeError:
        pass


class GradTarget:
    """A tensor of the forward pass that the backward pass differentiates to: its gradient edge
    (the autograd node that made it, and which of its outputs), with its shape, dtype and device
    (for zero gradients and memory budgets). A tensor with no graph (nothing it depends on
    requires grad) is kept as is: the backward pass then reports it."""

    __slots__ = ("edge", "shape", "dtype", "device")

    def __init__(self, t):
        self.shape, self.dtype, self.device = t.shape, t.dtype, t.device
        self.edge = torch.autograd.graph.get_gradient_edge(t) if t.requires_grad else t

    @property
    def nbytes(self):
        return self.shape.numel() * self.dtype.itemsize

    def zeros(self, K):
        """The gradient of ``K`` directions that do not depend on this tensor."""
        return torch.zeros((K,) + tuple(self.shape), dtype=self.dtype, device=self.device)


class Call:
    """One call of a module: its inputs, what the backward pass differentiates to and, once it
    has run, ``gy`` (the gradients w.r.t. the module's output).

    ``targets[0]`` is the module's output as a `GradTarget`, not the output tensor:
    holding the tensor kept e.g. every convolution's output alive through the backward pass
    (6 MiB for a small CNN in a build whose other transients are 16), and an in-place op applied to the
    output afterwards (``ReLU(inplace=True)``) made the tensor stand for that op's result, so
    that ``gy`` was the gradient w.r.t. the wrong quantity. The edge is the output as the module
    returned it.

    A layer type that records tensors inside the module's forward (see
    ``AbstractLayer.internal_recorder``) gets ``record`` (what its recorder kept) and the
    gradients w.r.t. its recorder's ``targets`` in ``extra_gy`` (same order, each
    ``(K, *shape)``)."""

    __slots__ = ("args", "kwargs", "targets", "record", "gy", "extra_gy", "spec", "module",
                 "shared")

    def __init__(self, args, kwargs, output, recorder=None, spec=None, module=None):
        self.args = args
        self.kwargs = kwargs
        # a call of another module that uses the layer's parameters (tied weights): its own
        # layer spec and module; None for the layer's own module
        self.spec = spec
        self.module = module
        self.targets = [GradTarget(output)]
        self.record = None
        if recorder is not None:
            self.record = recorder.record
            self.targets += [GradTarget(t) for t in recorder.targets]
        self.gy = None
        self.extra_gy = []
        # (n, axis) for an output with no batch axis, shared by the n examples (see
        # expand_shared); None otherwise
        self.shared = None

    def expand_shared(self):
        """Give every tensor argument of a call whose output has no batch axis a batch axis
        of ``n`` copies: each example's per-example quantities are then those of the whole
        call with that example's own output gradient (``gy``: ``(K, n, *out_shape)``)."""
        n, axis = self.shared

        def rep(t):
            if not isinstance(t, torch.Tensor):
                return t
            t = t.unsqueeze(axis)
            shape = list(t.shape)
            shape[axis] = n
            return t.expand(shape)
        self.args = tuple(rep(a) for a in self.args)
        self.kwargs = {k: rep(v) for k, v in self.kwargs.items()}

    @property
    def target(self):
        return self.targets[0].edge

    @property
    def out_dtype(self):
        return self.targets[0].dtype

    @property
    def out_nbytes(self):
        """Bytes of one direction's gradients w.r.t. everything this call differentiates to."""
        return sum(t.nbytes for t in self.targets)

    def set_gradients(self, grads, K):
        """Store the backward pass's gradients (one per target, None: independent of it)."""
        grads = [g if g is not None else t.zeros(K) for g, t in zip(grads, self.targets)]
        self.gy, self.extra_gy = grads[0], grads[1:]

    @property
    def x(self):
        return self.args[0]


class BatchContext:
    """Statistics of one mini-batch, for output directions ``k_start .. k_start + K - 1``.

    Attributes:
        n: number of examples in the batch.
        centering: whether the per-example gradients are centered; ``mean_jacobian`` then holds
            the mean Jacobian over the whole data set, ``(n_output, P)`` in the collection's
            layout, subtracted from every example's gradients.
        K: number of output directions in this context.
        k_start: index of the first of them among all the function's outputs.
        first_chunk: True for the first chunk of output directions of a batch (statistics that
            depend on the inputs only, like KFAC's ``A``, are taken there once).
        outputs: the function's outputs for the batch, shape ``(n, n_output)`` (detached).
    """

    def __init__(self, layer_collection, modules, calls, n, K, k_start, n_output, centering, outputs):
        # centering: None / False (no centering) or the (n_output, P) mean Jacobian over the
        # whole data set (computed by a first pass of the generator)
        self.layer_collection = layer_collection
        self.modules = modules
        self.calls = calls
        self.n = n
        self.K = K
        self.k_start = k_start
        self.n_output = n_output
        self.first_chunk = k_start == 0
        self.mean_jacobian = centering if isinstance(centering, torch.Tensor) else None
        if centering is True:
            raise ValueError("centering needs the mean Jacobian over the whole data set (a "
                             "(n_output, P) tensor), not True: the generator computes it")
        self.centering = self.mean_jacobian is not None
        self.outputs = outputs
        self._grads = {}
        self._jacobian = None

    def layer_ids(self):
        return self.layer_collection.layer_ids()

    def restricted(self, layer_collection):
        """This batch seen by a statistic of a sub-collection (``layer_collection``: some of
        this context's layers, see ``LayerCollection.sub``): the same calls and cached
        per-example gradients, its layers only."""
        if self.centering:
            raise NotImplementedError("a restricted batch context with centering (the mean "
                                      "Jacobian is in the whole collection's layout)")
        missing = [lid for lid in layer_collection.layer_ids() if lid not in self.calls]
        if missing:
            raise ValueError(f"layers {missing} are not in this batch's collection")
        view = copy.copy(self)
        view.layer_collection = layer_collection
        view._jacobian = None
        return view

    def per_example_grad(self, layer_id):
        """``(K, n, p_layer)``: per-example gradients of the layer (summed over its calls)."""
        g = self._grads.get(layer_id)
        if g is None:
            layer, module = self.layer_collection[layer_id], self.modules[layer_id]
            parts = [(c.spec or layer).per_example_grad(c.module or module,
                                                        (c.spec or layer).inputs_of(c), c.gy)
                     for c in self.calls[layer_id]]
            g = parts[0] if len(parts) == 1 else torch.stack(parts).sum(0)
            if self.centering:
                # the data set's mean Jacobian, not the batch's: centering per mini-batch would
                # make the result depend on how the data is batched
                mean = self.mean_jacobian[self.k_start:self.k_start + self.K,
                                          self.layer_collection.slice(layer_id)]
                g = g - mean.unsqueeze(1)
            self._grads[layer_id] = g
        return g

    def release(self, layer_id):
        """Forget the layer's cached per-example gradients: consumers that go layer by layer call
        it once done with a layer, so that a batch's whole-model Jacobian is never held."""
        self._grads.pop(layer_id, None)

    def jacobian(self):
        """``(K, n, P)``: per-example Jacobian rows in the collection's layout."""
        if self._jacobian is None:
            ids = self.layer_ids()
            if len(ids) == 1:
                self._jacobian = self.per_example_grad(ids[0])
            else:
                self._jacobian = torch.cat([self.per_example_grad(lid) for lid in ids], dim=2)
                # the per-layer pieces are no longer needed: keep the peak memory down
                self._grads.clear()
        return self._jacobian

    def _row_uses(self, layer_id, prepare=True):
        """``[(layer spec, rows state), ...]`` for a layer called several times or sharing its
        weight with other modules, when every use has the row-block maths with one layout (see
        ``layer_types.base.row_chunked_diag_into``); None otherwise."""
        calls = self.calls[layer_id]
        if self.centering or layer_id in self._grads or \
                (len(calls) == 1 and calls[0].spec is None):
            return None
        layer, module = self.layer_collection[layer_id], self.modules[layer_id]
        specs = [c.spec or layer for c in calls]
        if not rows_compatible(specs):
            return None
        if not prepare:
            return True
        return [(spec, spec.rows_prepare(c.module or module, spec.inputs_of(c), c.gy))
                for spec, c in zip(specs, calls)]

    def layer_diag(self, layer_id):
        """``sum_{k,i} g_{k,i}²`` over the layer's coordinates, without per-example grads where
        the layer type allows it."""
        calls = self.calls[layer_id]
        if self._row_uses(layer_id, prepare=False) is not None:
            out = calls[0].gy.new_zeros(self.layer_collection[layer_id].numel())
            return self.layer_diag_into(layer_id, out)
        if len(calls) == 1 and calls[0].spec is None and not self.centering and \
                layer_id not in self._grads:
            layer = self.layer_collection[layer_id]
            return layer.diag(self.modules[layer_id], layer.inputs_of(calls[0]), calls[0].gy)
        g = self.per_example_grad(layer_id)
        return (g * g).sum(dim=(0, 1))

    def layer_diag_into(self, layer_id, out):
        """``out += layer_diag(layer_id)`` for ``out`` the layer's slice of a running sum: in
        place where the layer type has ``diag_into`` (no per-batch diagonal allocated)."""
        calls = self.calls[layer_id]
        layer = self.layer_collection[layer_id]
        if len(calls) == 1 and calls[0].spec is None and not self.centering and \
                layer_id not in self._grads:
            return layer.diag_into(self.modules[layer_id], layer.inputs_of(calls[0]),
                                   calls[0].gy, out)
        uses = self._row_uses(layer_id)
        if uses is not None:
            # tied weights or a module called several times: the summed per-example gradients
            # by blocks of examples and rows, never the (K, n, p) gradients of each use
            return row_chunked_diag_into(uses, calls[0].gy.shape[0], self.n, out)
        out += self.layer_diag(layer_id)
        return out

    def kfac_factors(self, layer_id, approx="expand", lazy=False):
        """Unnormalized ``(A, G)`` of the layer for this batch; ``A`` is None past the first chunk
        of output directions (it depends on the inputs only).

        With ``lazy=True`` each factor is a list of pieces, dense tensors or
        `GramRows` (left for the consumer to accumulate with
        symmetric, batched GEMMs); otherwise dense tensors (or 1-D for diagonal factors).
        """
        blocks, multi = self.kfac_factor_blocks(layer_id, approx=approx, lazy=lazy)
        return blocks if multi else blocks[0]

    def kfac_factor_blocks(self, layer_id, approx="expand", lazy=False):
        """``(blocks, multi)``: ``blocks`` the list of ``(A, G)`` (as `kfac_factors`) of
        each Kronecker block of the layer (one for most layer types), ``multi`` whether the
        layer type returned several blocks (see ``AbstractLayer.kfac_factors``)."""
        if self.centering:
            raise NotImplementedError("KFAC with centering=True is not implemented")
        if any(c.spec is not None for c in self.calls[layer_id]):
            raise NotImplementedError(
                f"layer '{layer_id}' has tied weights (another module uses its parameters): its "
                "block is a sum of two Kronecker products, which KFAC/EKFAC cannot hold. Use "
                "PMatMixed with PMatDiag or PMatBlockDiag for this layer, or leave the tied pair "
                "out of the LayerCollection")
        layer, module = self.layer_collection[layer_id], self.modules[layer_id]
        A, G, multi, locations = None, None, None, []
        # past the first chunk of directions A is dropped: layer types whose A is costly to
        # form (convolutions: a GEMM on the unfolded patches) are told not to form it
        skip_a = ({"input_factor": False}
                  if not self.first_chunk and getattr(layer, "kfac_input_factor_optional", False)
                  else {})
        for c in self.calls[layer_id]:
            x = layer.inputs_of(c)
            res = layer.kfac_factors(module, x, c.gy, approx=approx, **skip_a)
            locations.append(layer.kfac_locations(module, x, c.gy, approx=approx))
            pairs = kfac_block_list(res)
            if A is None:
                A, G = [[] for _ in pairs], [[] for _ in pairs]
                multi = is_multiblock(res)
            elif len(pairs) != len(A) or is_multiblock(res) != multi:
                raise NotImplementedError(
                    f"layer '{layer_id}' gives a different number of Kronecker blocks in two of "
                    f"its calls ({len(A)} and {len(pairs)}; e.g. an attention module used both "
                    "as self- and cross-attention): its KFAC factors cannot be summed; use "
                    "PMatBlockDiag or a PMatMixed with another representation for this layer")
            for b, (a, g) in enumerate(pairs):
                A[b].append(a)
                G[b].append(g)
        uses = len(self.calls[layer_id])
        if uses > 1:
            # a module called R times in one forward (nn.Sequential(lin, act, lin)): each use
            # brings its locations of the shared weight, as positions do in 'expand' (see
            # docs/layers.md): A = Σ_r A_r, G = Σ_r S_r G_r / Σ_r S_r with G_r = Σ g gᵀ / S_r
            # as the layer type gives it, i.e. Σ g gᵀ over all the calls' locations divided by
            # their number: the same factors as one call on the locations put together. A
            # layer type that cannot say S_r: each call counts alike, (1/R) Σ_r G_r
            if None in locations:
                weights = [1.0 / uses] * uses
            else:
                weights = [s / sum(locations) for s in locations]
            G = [[_sum_pieces([_scaled(p, w) for p, w in zip(pg, weights)])] for pg in G]
        if lazy:
            return [((pa if self.first_chunk else None), pg) for pa, pg in zip(A, G)], multi
        return [((_sum_pieces(pa) if self.first_chunk else None), _sum_pieces(pg))
                for pa, pg in zip(A, G)], multi

    def kfe_diag(self, layer_id, UA, UG, perm=None):
        """``Σ_{k,i} (U_Gᵀ Ĝ_{k,i} U_A)²`` for this batch (EKFAC), shape ``(dG, dA)``; ``perm``
        (flat -> Kronecker index) defaults to the layer's ``kfac_permutation()``, and then the
        layer type's formula from inputs and output gradients is used where it applies."""
        layer, module = self.layer_collection[layer_id], self.modules[layer_id]
        calls = self.calls[layer_id]
        if perm is None and len(calls) == 1 and calls[0].spec is None and not self.centering \
                and layer_id not in self._grads:
            return layer.kfe_diag(module, layer.inputs_of(calls[0]), calls[0].gy, UA, UG)
        if perm is None:
            perm = layer.kfac_permutation()
        g = project_to_kfe(self.per_example_grad(layer_id), UA, UG, perm)
        return (g * g).sum(dim=(0, 1))

    def kfe_diag_blocks(self, layer_id, bases):
        """`kfe_diag` for a multi-block layer: ``bases`` ``[(U_A_b, U_G_b), ...]`` in the
        layer's Kronecker layout order; returns the list of ``(dG_b, dA_b)`` sums."""
        layer, module = self.layer_collection[layer_id], self.modules[layer_id]
        calls = self.calls[layer_id]
        if len(calls) == 1 and calls[0].spec is None and not self.centering and \
                layer_id not in self._grads:
            return layer.kfe_diag_blocks(module, layer.inputs_of(calls[0]), calls[0].gy, bases)
        gs = project_blocks_to_kfe(self.per_example_grad(layer_id), bases,
                                   layer.kfac_permutation())
        return [(g * g).sum(dim=(0, 1)) for g in gs]


def _scaled(piece, w):
    """``w`` times a factor piece (a dense tensor or GramRows)."""
    if isinstance(piece, GramRows):
        return GramRows(piece.rows, piece.scale * w, piece.ones_column)
    return piece * w


def _sum_pieces(pieces):
    """Sum of factor pieces (dense tensors or GramRows) as one tensor."""
    total = None
    for p in pieces:
        d = p.dense() if isinstance(p, GramRows) else p
        total = d if total is None else total + d
    return total


class ParameterUseError(RuntimeError):
    """A parameter of the collection is used outside the forward of the module that holds it
    (e.g. ``F.linear(h, self.emb.weight)`` in the parent's forward): the per-layer hooks do not
    see that use, and the statistics built from them would miss part of the gradient."""


def check_parameter_uses(out, layer_collection, modules, calls):
    """Check, on one batch, that the per-layer hooks see every use of the collection's
    parameters; raise `ParameterUseError` naming the layers where they do not.

    With ``u`` a fixed pseudo-random cotangent of the outputs ``out`` (``(n, K)``) and ``gy_c``
    the resulting gradient w.r.t. the output of each recorded call ``c`` of a layer's module,
    what the hooks can account for is ``Σ_c vjp(module(args_c; θ), gy_c)``: the module's forward
    re-run on its recorded (detached) arguments, differentiated w.r.t. its own parameters (for
    a layer type with ``grad_sum``, e.g. Linear, Embedding and the direct convolutions, that
    formula on the recorded input instead: no re-run, and the layer's maths checked along). It
    must equal autograd's gradient of ``Σ u ⊙ f`` w.r.t. ``θ``; it differs exactly when the
    parameter is also used elsewhere: outside the module's forward (a tied head written
    ``F.linear(h, emb.weight)``), or by another module (tied weights with one module left out of
    the collection). Cost: one backward pass with one direction, and one forward and backward of
    each layer's module (one GEMM for those with ``grad_sum``), on one batch; no per-example
    quantity is formed.

    ``out`` must still have its graph (the caller's backward passes retain it)."""
    if out.shape[0] == 0 or not out.requires_grad:
        return

    gen = torch.Generator(device="cpu").manual_seed(0)  # no global RNG state touched
    u = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    lids = list(layer_collection.layer_ids())
    params = {lid: layer_collection[lid].parameters_of(modules[lid]) for lid in lids}
    flat_params = [p for lid in lids for p in params[lid]]
    layer_calls = [(lid, c) for lid in lids for c in calls[lid]]
    targets = [c.targets[0].edge for _, c in layer_calls]
    grads = _grad(out, targets + flat_params, u, retain_graph=True, allow_unused=True)
    gys, true = grads[:len(targets)], grads[len(targets):]
    hooked = {lid: [torch.zeros_like(p) for p in params[lid]] for lid in lids}
    # a random forward (dropout in training mode) re-run here must not move the RNG
    devices = [out.device] if out.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), recording_paused(), torch.enable_grad():
        for (lid, c), gy in zip(layer_calls, gys):
            if gy is None:
                continue
            spec = c.spec or layer_collection[lid]
            g = None
            if c.shared is None and not c.extra_gy and same_maths(spec, "grad_sum"):
                x = spec.inputs_of(c)
                if isinstance(x, torch.Tensor) and x.shape[:1] == gy.shape[:1]:
                    # the layer type's own formula: no forward re-run (for a language
                    # model's output layer, a product as large as the model's forward)
                    g = spec.grad_sum(c.module or modules[lid], x, gy)
            if g is not None:
                for acc, gk in zip(hooked[lid], g):
                    acc += gk
                continue
            names = spec.param_names()
            leaves = {nm: p.detach().requires_grad_(True) for nm, p in zip(names, params[lid])}
            y = functional_call(c.module or modules[lid], leaves, c.args, c.kwargs)
            if not isinstance(y, torch.Tensor):
                y = y[0]  # the hooks differentiate through the first output (see Call)
            if y.shape != gy.shape:
                # an output shared by the examples, expanded to the batch by the hooks
                y = y.expand(gy.shape)
            g = _grad(y, list(leaves.values()), gy, allow_unused=True)
            for acc, gk in zip(hooked[lid], g):
                if gk is not None:
                    acc += gk
    eps = torch.finfo(out.dtype).eps
    bad, j = [], 0
    for lid in lids:
        ref = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                         for g, p in zip(true[j:j + len(params[lid])], params[lid])])
        j += len(params[lid])
        mine = torch.cat([g.reshape(-1) for g in hooked[lid]])
        err = (mine - ref).norm()
        # rounding: the same products in another order
        if err > 1e3 * eps * (ref.norm() + mine.norm()) + torch.finfo(out.dtype).tiny:
            bad.append((lid, float(err / ref.norm().clamp_min(torch.finfo(out.dtype).tiny))))
    # a module whose forward is random differs from itself: not this check's business (the
    # layer types and the determinism checks report it with their own messages)
    bad = [(lid, r) for lid, r in bad if not _is_random(modules[lid], calls[lid], devices)]
    if bad:
        names = ", ".join(f"'{lid}' (relative difference {rel:.2g})" for lid, rel in bad)
        raise ParameterUseError(
            f"the gradients of layer(s) {names} seen by the per-layer hooks differ from "
            "autograd's: a parameter of these layers is used outside its module's forward (e.g. "
            "a tied head written F.linear(h, self.emb.weight) in the parent's forward, or a "
            "weight shared with a module left out of the LayerCollection), and the matrix would "
            "miss that part of the gradient. Fixes: use PMatImplicit (its products go through "
            "torch.func and see every use of the parameters), or leave these layers out of the "
            "LayerCollection (their parameters are then constants)")


def _is_random(module, layer_calls, devices):
    """Whether re-running ``module`` on its recorded arguments gives another output (dropout in
    training mode); the RNG state is restored."""
    with torch.random.fork_rng(devices=devices), recording_paused(), torch.no_grad():
        for c in layer_calls:
            ys = []
            for _ in range(2):
                y = functional_call(c.module or module, {}, c.args, c.kwargs)
                ys.append(y if isinstance(y, torch.Tensor) else y[0])
            if not torch.equal(ys[0], ys[1]):
                return True
    return False
