"""The contract every layer type follows.

A *layer type* couples two things that always travel together:

* the **spec**: the shapes of the layer's parameters (what `LayerCollection` stores and what fixes
  the flat parameter layout: ``weight.flatten()`` then ``bias.flatten()``);
* the **maths**: how the per-example statistics of that layer are obtained from what a forward
  hook sees (the module's input ``x``) and what the batched backward pass gives (the gradient of
  the outputs w.r.t. the module's output, ``gy`` of shape ``(K, n, *out_shape)``, with ``K`` the
  number of output directions per example).

Adding a layer type means writing one subclass of `AbstractLayer` in one file and
registering it with `register_layer_type`.
"""
from __future__ import annotations

import contextlib
import math
import threading

import torch


class Parameter:
    """Shape of one parameter tensor of a layer (not the tensor itself)."""

    def __init__(self, *size):
        self.size = tuple(int(s) for s in size)

    def numel(self):
        return math.prod(self.size)

    def __eq__(self, other):
        return isinstance(other, Parameter) and self.size == other.size

    def __repr__(self):
        return f"Parameter{self.size}"


class AbstractLayer:
    """Base class of layer specs.

    Subclasses set ``self.weight`` (a `Parameter`) and ``self.bias`` (a `Parameter`
    or ``None``), and list in ``module_types`` the ``torch.nn`` classes they describe.
    """

    #: torch.nn module classes that this layer type handles
    module_types: tuple = ()
    #: whether the KFAC maths (``kfac_factors``) is available for this layer type
    supports_kfac = False

    weight: Parameter
    bias: Parameter | None = None

    # ------------------------------------------------------------------ spec
    @classmethod
    def from_module(cls, module):
        raise NotImplementedError

    def param_specs(self):
        """``[(name, Parameter), ...]`` in layout order; ``name`` is the parameter's qualified
        name relative to the module (``"weight"``, ``"out_proj.bias"``). Default: weight, then
        bias if any. Layer types with other parameters (MultiheadAttention, the generic type)
        override it; every flat layout (PVector, PFMap, PMat*) follows this list."""
        specs = [("weight", self.weight)]
        if self.bias is not None:
            specs.append(("bias", self.bias))
        return specs

    def param_names(self):
        return [name for name, _ in self.param_specs()]

    def numel(self):
        return sum(p.numel() for _, p in self.param_specs())

    def has_bias(self):
        return self.bias is not None

    def parameters_of(self, module):
        """The module's parameter tensors in layout order (see `param_specs`)."""
        return tuple(module.get_parameter(name) for name in self.param_names())

    def constant_entries(self, module):
        """``{param_name: bool mask}`` of parameter entries that autograd's backward treats as
        constants (e.g. an Embedding's ``padding_idx`` row), or ``{}``. The implicit
        (forward-mode) products mask their tangents with it, so that they agree with the
        per-example gradients."""
        return {}

    def internal_recorder(self, module):
        """For layer types whose maths needs the output gradients of tensors computed *inside*
        the module's forward (MultiheadAttention: its input projections, which are not modules):
        a new recorder for one call of ``module``. The generator enters it (a context manager)
        just before the module's forward runs in its pass and exits it right after; the recorder
        then has ``targets``, the tensors the backward pass should also differentiate to, and
        ``record``, what the layer's maths takes back from `inputs_of`'s ``call``
        (``call.record``, and the gradients w.r.t. the targets in ``call.extra_gy``). A recorder
        with a method ``forward(original_forward, *args, **kwargs)`` runs the module's call
        itself: the generator sets the module *instance*'s ``forward`` to one that calls it,
        for the time of its pass only (no global function is replaced). Layer types that
        don't override this record nothing."""
        return None

    def batch_axis(self, module):
        """The axis of the module's output that holds the examples (0; attention with
        ``batch_first=False``: 1). The generator refuses a call whose output does not have the
        batch's ``n`` examples along it (an input looked up once and broadcast over the batch:
        its output gradient is summed over the examples, see ``backend.jacobian``)."""
        return 0

    def inputs_of(self, call):
        """What this layer's maths takes as ``x`` from a recorded forward call
        (`Call`): the module's first positional input by
        default; layer types that need more (all arguments) override it."""
        return call.x

    def _key(self):
        return (type(self).__name__,) + tuple((n, p.size) for n, p in self.param_specs())

    def __eq__(self, other):
        return isinstance(other, AbstractLayer) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def __repr__(self):
        body = ", ".join(f"{n}={p.size}" for n, p in self.param_specs())
        return f"{type(self).__name__}({body})"

    # ------------------------------------------------------------------ maths
    def per_example_grad(self, module, x, gy):
        """Per-example gradients, flat in the layer's layout.

        Args:
            module: the ``torch.nn.Module`` instance.
            x: the module's input as seen by the forward hook, shape ``(n, *in_shape)`` (more
                generally what `inputs_of` takes from the recorded call, e.g.
                ``(args, kwargs)`` for the generic and attention layer types).
            gy: gradients w.r.t. the module's output, shape ``(K, n, *out_shape)``.

        Returns:
            tensor of shape ``(K, n, numel())``: row ``[k, i]`` is ``J_k(x_i)`` restricted to
            this layer's parameters.
        """
        raise NotImplementedError

    def diag(self, module, x, gy):
        """``sum_{k,i} per_example_grad[k, i] ** 2``, shape ``(numel(),)`` (not normalized).

        Subclasses override this where a cheaper formula exists that avoids the per-example
        gradients.
        """
        g = self.per_example_grad(module, x, gy)
        return (g * g).sum(dim=(0, 1))

    def diag_into(self, module, x, gy, out):
        """``out += diag(module, x, gy)``, for ``out`` the layer's slice of a running sum; layer
        types whose diagonal is a GEMM override it to accumulate in place."""
        out += self.diag(module, x, gy)
        return out

    # -------------------------------------------------- per-example gradients by row blocks
    #: whether the layer type writes its per-example weight gradients by blocks of rows
    #: (``grad_rows``, ``rows_prepare``, ``rows_into``, ``rows_rest``): the diagonal of a layer
    #: whose weight is shared over positions or used by several modules is then formed by
    #: chunks of examples and rows (see `row_chunked_diag_into`), never the whole ``(K, n, p)``
    supports_rows = False
    #: whether ``rows_into`` with ``accumulate=False`` writes every entry of the block (a
    #: GEMM) rather than zeroing it and adding a few rows (a scatter): such uses go first
    rows_dense = True

    def grad_rows(self):
        """``(rows, width)``: the weight's flat layout is ``rows`` rows of ``width`` entries
        (row-major), followed by ``numel() - rows · width`` other entries (the bias), or None
        when the layer type has no row-block maths."""
        return None

    def rows_prepare(self, module, x, gy):
        """What `rows_into` and `rows_rest` take for this call (``x``, ``gy`` as in
        `per_example_grad`, reshaped once for all the blocks)."""
        raise NotImplementedError

    def rows_into(self, state, k, i0, i1, r0, r1, out, accumulate):
        """Write (``accumulate=False``) or add (``True``) into ``out`` ``(i1 - i0, r1 - r0,
        width)`` rows ``r0 .. r1 - 1`` of the per-example weight gradients of direction ``k`` and
        examples ``i0 .. i1 - 1``."""
        raise NotImplementedError

    def grad_sum(self, module, x, gy):
        """The gradient of ``Σ_i <gy_i, y_i>`` w.r.t. the module's parameters, for ``gy`` of
        shape ``(n, *out_shape)`` (one direction, no leading ``K``), as a list of tensors shaped
        like the parameters (layout order): what autograd gives for one call, from the layer's
        own maths (no forward re-run). None where the layer type has no such formula."""
        return None

    def rows_rest(self, state):
        """``(K, n, numel() - rows · width)``: the per-example gradients of the entries after
        the weight's rows (the bias), or None when there are none."""
        return None

    def kfac_locations(self, module, x, gy, approx="expand"):
        """The number ``S`` of weight-sharing locations that `kfac_factors` divides
        ``G`` by for this call (sequence positions, output pixels; 1 without weight sharing),
        or None where it is not one number (several Kronecker blocks). A module called several
        times in one forward pass weights each call's ``G`` by its ``S`` (see
        ``BatchContext.kfac_factor_blocks``)."""
        return None

    def kfac_factors(self, module, x, gy, approx="expand"):
        """Unnormalized Kronecker factors ``(A, G)`` summed over the batch.

        ``A`` is built from the inputs (with a trailing 1 when the layer has a bias) and ``G``
        from the output gradients summed over the ``K`` output directions, such that
        ``kron(G / n, A / n)``, re-indexed by `kfac_permutation`, approximates the layer's
        block of ``(1/n) sum_i J_iᵀ J_i``. Either factor may be returned as a 1-D tensor, which
        stands for a diagonal matrix (e.g. the input factor of an Embedding).

        ``approx`` selects how weight-sharing positions (sequences) are handled: ``'expand'`` or
        ``'reduce'`` (Eschenhagen et al. 2023); layers without weight sharing ignore it.

        **Several Kronecker blocks.** A layer type whose parameters form several Kronecker
        blocks (block-diagonal inside the layer, e.g. MultiheadAttention's input and output
        projections) returns a *list* ``[(A_0, G_0), (A_1, G_1), ...]`` instead of one pair.
        The layer's Kronecker layout is then the concatenation of the blocks' layouts (block
        ``b`` a row-major ``(dG_b, dA_b)`` matrix), `kfac_permutation` maps the flat
        layout to that concatenation, and the approximation is
        ``block_diag(kron(G_0, A_0), kron(G_1, A_1), ...)`` re-indexed by it (see
        `kfac_block_indices`). The number of blocks may depend on the call (e.g. self- vs
        cross-attention) but must be the same for every call and batch of one computation.
        """
        raise NotImplementedError(
            f"KFAC is not available for layers of type {type(self).__name__}; use a "
            "representation that needs only per-example gradients (PMatDense, PMatBlockDiag, "
            "PMatDiag, PMatLowRank, PMatImplicit) for this layer"
        )


    def kfac_permutation(self):
        """``perm`` (LongTensor, length ``numel()``) such that the layer's block in the flat
        layout is ``kron(G, A)[perm][:, perm]``: flat coordinate ``i`` is Kronecker coordinate
        ``perm[i]``.

        Default: weight of shape ``(out, ...)`` and optional bias ``(out,)``, Kronecker order the
        row-major ``[W | b]`` of shape ``(out, in + 1)``.
        """
        out = self.weight.size[0]
        n_in = self.weight.numel() // out
        width = n_in + (1 if self.bias is not None else 0)
        rows = torch.arange(out).unsqueeze(1) * width
        perm = (rows + torch.arange(n_in)).reshape(-1)
        if self.bias is not None:
            perm = torch.cat([perm, rows.reshape(-1) + n_in])
        return perm

    def kfe_diag(self, module, x, gy, UA, UG):
        """Squared per-example gradients in a Kronecker-factored eigenbasis (EKFAC), summed.

        With ``Ĝ_{k,i}`` the per-example gradient of output ``k`` on example ``i`` reshaped to the
        Kronecker layout ``(dG, dA)`` (see `kfac_permutation`), returns
        ``Σ_{k,i} (U_Gᵀ Ĝ_{k,i} U_A) ** 2`` (elementwise square), shape ``(dG, dA)``, not
        normalized. ``UA`` / ``UG`` are orthogonal matrices (eigenvectors as columns) or an int
        ``d`` standing for the identity of size ``d`` (a diagonal Kronecker factor).

        Default: through `per_example_grad`, one layer at a time; subclasses override it
        where the projection factors through the inputs and output gradients.
        """
        g = project_to_kfe(self.per_example_grad(module, x, gy), UA, UG, self.kfac_permutation())
        return (g * g).sum(dim=(0, 1))

    def kfe_diag_blocks(self, module, x, gy, bases):
        """`kfe_diag` for a multi-block layer (see `kfac_factors`): ``bases`` is the
        list ``[(U_A_b, U_G_b), ...]``, one per Kronecker block in layout order; returns the list
        of ``Σ_{k,i} (U_G_bᵀ Ĝ_{b,k,i} U_A_b) ** 2`` (shapes ``(dG_b, dA_b)``), not normalized.
        Default: through `per_example_grad`."""
        gs = project_blocks_to_kfe(self.per_example_grad(module, x, gy), bases,
                                   self.kfac_permutation())
        return [(g * g).sum(dim=(0, 1)) for g in gs]

    def kfac_block_indices(self, sizes):
        """Flat coordinates of each Kronecker block: for block sizes ``sizes`` (``[(dG_b, dA_b),
        ...]``, in layout order), the list of LongTensors ``idx_b`` such that block ``b``'s
        Kronecker vector (row-major ``(dG_b, dA_b)``) is ``flat_layer_vector[idx_b]``. A
        single-block layer has ``sizes = [(dG, dA)]``."""
        perm = self.kfac_permutation()
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel())
        out, off = [], 0
        for dG, dA in sizes:
            out.append(inv[off:off + dG * dA])
            off += dG * dA
        if off != perm.numel():
            raise ValueError(f"Kronecker blocks of sizes {list(sizes)} hold {off} coordinates, but "
                             f"the layer has {perm.numel()} parameters")
        return out


#: memory for one block of per-example gradients formed by `row_chunked_diag_into`
ROW_CHUNK_BYTES = 16 * 2 ** 20


def row_chunked_diag_into(uses, K, n, out, chunk_bytes=None):
    """``out += Σ_{k,i} (Σ_u g_{u,k,i})²`` (elementwise square), for ``uses`` a list of
    ``(layer, state)`` (``state`` from ``layer.rows_prepare``) whose per-example gradients
    ``g_u`` have the same flat layout (the calls of one module, or the modules sharing one
    weight: the gradient of a shared parameter is the sum over its uses).

    The weight part is formed by blocks of ``c`` examples and ``r`` rows, ``c · r · width``
    numbers in at most ``chunk_bytes`` (default ``ROW_CHUNK_BYTES``): for one direction,
    ``c`` examples and rows ``r0 .. r0 + r - 1`` each use writes or adds its rows (a GEMM
    ``(r, S) @ (S, width)`` per example for a linear map over ``S`` positions, a scatter of
    ``S`` rows for an embedding), then the block is squared into ``out``. Memory: one block,
    reused; never the ``(K, n, p)`` per-example gradients (``n · V · d`` per use for a tied
    embedding and output layer). The other entries (bias) come from ``rows_rest``, small."""
    layer0 = uses[0][0]
    rows, width = layer0.grad_rows()
    nw = rows * width
    budget = ROW_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    item = out.element_size()
    if nw * item <= budget:
        r, c = rows, max(1, min(n, budget // max(1, nw * item)))
    else:
        r, c = max(1, min(rows, budget // max(1, width * item))), 1
    # the uses that write every entry of a block go first (no zeroing of the buffer)
    uses = sorted(uses, key=lambda u: not u[0].rows_dense)
    if not uses[0][0].rows_dense:
        uses = [(None, None)] + uses
    buf = out.new_empty(c * r * width)
    w_out = out[:nw].view(rows, width)
    for k in range(K):
        for i0 in range(0, n, c):
            i1 = min(n, i0 + c)
            for r0 in range(0, rows, r):
                r1 = min(rows, r0 + r)
                b = buf[:(i1 - i0) * (r1 - r0) * width].view(i1 - i0, r1 - r0, width)
                for j, (layer, state) in enumerate(uses):
                    if layer is None:
                        b.zero_()
                        continue
                    layer.rows_into(state, k, i0, i1, r0, r1, b, accumulate=j > 0)
                if i1 - i0 == 1:
                    w_out[r0:r1].addcmul_(b[0], b[0])
                else:
                    w_out[r0:r1] += b.square_().sum(dim=0)
    if out.numel() > nw:
        rest = None
        for layer, state in uses:
            if layer is None:
                continue
            g = layer.rows_rest(state)
            if g is not None:
                rest = g if rest is None else rest + g
        if rest is not None:
            out[nw:] += rest.square().sum(dim=(0, 1))
    return out


def same_maths(layer, name):
    """Whether the method ``name`` of ``layer`` comes from the class that defines its
    ``per_example_grad`` or from a class derived from it: a subclass that changes the maths
    (its own ``per_example_grad``) does not inherit its parent's shortcut formulas."""
    def owner(attr):
        for k in type(layer).__mro__:
            if attr in vars(k):
                return k
        return None
    mine, grads = owner(name), owner("per_example_grad")
    return mine is not None and grads is not None and issubclass(mine, grads)


def rows_compatible(layers):
    """Whether the per-example gradients of these layer specs (the uses of one weight) can be
    formed together by `row_chunked_diag_into`: every one has the row-block maths (its own,
    see `same_maths`) and the same flat layout ``(rows, width)`` and size."""
    if not all(getattr(layer, "supports_rows", False) and same_maths(layer, "rows_into")
               for layer in layers):
        return False
    shapes = {(layer.grad_rows(), layer.numel()) for layer in layers}
    return len(shapes) == 1 and next(iter(shapes))[0] is not None


def check_kfac_support(layer_collection, representation):
    """Refuse, naming the layer and its type, a collection with a layer whose type computes no
    KFAC factors (``supports_kfac`` False)."""
    for lid, layer in layer_collection.layers.items():
        if not getattr(layer, "supports_kfac", False):
            raise NotImplementedError(
                f"{representation}: layer '{lid}' is of type {type(layer).__name__}, which has no "
                f"KFAC approximation{getattr(layer, 'no_kfac_reason', '')}; use PMatEKFACBlockDiag (EKFAC where KFAC exists, dense blocks "
                "elsewhere), PMatBlockDiag, or a PMatMixed putting this layer in another "
                "representation")


def is_multiblock(entry):
    """Whether a per-layer KFAC/EKFAC entry (a ``kfac_factors`` result, a ``PMatKFAC.data`` or
    ``PMatEKFAC.data`` value, a basis request) describes several Kronecker blocks: it is then a
    list/tuple of per-block tuples, where a single-block entry starts with a factor (a tensor,
    a GramRows) or an int identity basis."""
    return isinstance(entry, (tuple, list)) and len(entry) > 0 and isinstance(entry[0], (tuple, list))


def kfac_block_list(entry):
    """The per-block items of an entry: ``list(entry)`` if multi-block, else ``[entry]``."""
    return list(entry) if is_multiblock(entry) else [entry]


def project_blocks_to_kfe(g, bases, perm):
    """Multi-block `project_to_kfe`: ``g`` ``(..., numel)`` flat, ``bases`` the list of
    ``(U_A_b, U_G_b)`` (int = identity), ``perm`` the layer's flat -> Kronecker map. Returns
    ``[U_G_bᵀ Ĝ_b U_A_b]`` with shapes ``(..., dG_b, dA_b)``."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    kv = g[..., inv.to(g.device)]
    out, off = [], 0
    for UA, UG in bases:
        dG, dA = kfe_dim(UG), kfe_dim(UA)
        V = kv[..., off:off + dG * dA].reshape(*g.shape[:-1], dG, dA)
        off += dG * dA
        if not isinstance(UA, int):
            V = V @ UA
        if not isinstance(UG, int):
            V = UG.t() @ V
        out.append(V)
    if off != perm.numel():
        raise ValueError(f"the eigenbases cover {off} coordinates, the layer has {perm.numel()}")
    return out


def kfe_dim(U):
    """Size of an eigenbasis given as a matrix or as an int (identity)."""
    return int(U) if isinstance(U, int) else U.shape[0]


def project_to_kfe(g, UA, UG, perm):
    """``U_Gᵀ Ĝ U_A`` for flat vectors ``g`` of shape ``(..., numel)``, with ``Ĝ`` the vector
    re-indexed to the Kronecker layout by ``perm`` (flat ``i`` -> Kronecker ``perm[i]``) and
    reshaped to ``(dG, dA)``. Returns ``(..., dG, dA)``; int ``UA``/``UG`` mean identity."""
    dG, dA = kfe_dim(UG), kfe_dim(UA)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    G = g[..., inv.to(g.device)].reshape(*g.shape[:-1], dG, dA)
    if not isinstance(UA, int):
        G = G @ UA
    if not isinstance(UG, int):
        G = UG.t() @ G
    return G


_REGISTRY: list = []

# Layer maths that re-runs a module's forward (the generic layer type, MultiheadAttention) must
# not be recorded by the generator's forward hooks: they check this flag.
_recording = threading.local()


@contextlib.contextmanager
def recording_paused():
    """Within this context the generator's forward hooks record nothing."""
    prev = getattr(_recording, "paused", False)
    _recording.paused = True
    try:
        yield
    finally:
        _recording.paused = prev


def is_recording_paused():
    return getattr(_recording, "paused", False)


def register_layer_type(cls):
    """Class decorator: make ``LayerCollection.from_model`` recognise ``cls.module_types``."""
    _REGISTRY.append(cls)
    return cls


def layer_type_for(module):
    """The registered layer type handling ``module``, or ``None``.

    The most specific match wins (a subclass of ``nn.Linear`` registered on its own takes
    precedence over ``LinearLayer``).
    """
    best, best_distance = None, None
    mro = type(module).__mro__
    for cls in _REGISTRY:
        # classes of optional packages, matched by qualified name (not imported here)
        for qual in getattr(cls, "module_class_names", ()):
            for depth, k in enumerate(mro):
                if f"{k.__module__}.{k.__qualname__}" == qual:
                    if best is None or depth < best_distance:
                        best, best_distance = cls, depth
                    break
        for mt in cls.module_types:
            if isinstance(module, mt):
                # how many inheritance steps separate the module's class from the match
                distance = len(type(module).__mro__) - len(mt.__mro__)
                if best is None or distance < best_distance:
                    best, best_distance = cls, distance
    return best
