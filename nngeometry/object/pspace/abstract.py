"""The contract shared by every parameter-space matrix representation, and the operations
written once for the representations that are containers of blocks.

A container (PMatDense, PMatDiag, PMatBlockDiag, PMatEye, ...) says what its blocks are
(``_blocks()``: one `blocks` block per layer, or one for the whole matrix) and how a flat
``(..., P)`` tensor splits into the blocks' layouts (``_split`` / ``_join``; by default the
layers' slices, or the whole vector for a single block). Every operation below (``mv``, ``vTMv``,
``mmap``, ``mapTMmap``, ``solve``, ``inverse``, ``pow``, ``logdet``, ``get_diag``, ``trace``,
``norm``, ``to_torch``, ``eigenvalues``, ``diag_of_inverse``, scaling and ``+ PMatEye``) is then
written once, from the blocks' primitives, on batches: a PVector is a batch of one row, a PFMap
the ``K·n`` rows of its tensor.
"""
import functools
import inspect
import warnings

import torch

from ...layercollection import resolve_layer_collection
from ..map import PFMap, PFMapDense
from ..vector import PVector
from ...serialization import SharedGeneratorCopy, StateDictMixin
from ._prior import scalar_or_prior


# upstream's older names: they keep working, with a DeprecationWarning naming the replacement
_RENAMED = {"inverse": ("inv", "same arguments, same result"),
            "frobenius_norm": ("norm", "its default ord=None is the Frobenius norm")}


def _renamed(old, impl):
    new, same = _RENAMED[old]

    @functools.wraps(impl)
    def shim(self, *args, **kwargs):
        warnings.warn(f"{type(self).__name__}.{old}() is deprecated: use {new}() ({same})",
                      DeprecationWarning, stacklevel=2)
        return getattr(self, f"_{old}_impl")(*args, **kwargs)

    shim._renamed = True
    shim.__doc__ = (f"Deprecated (`DeprecationWarning`): use `{new}()` ({same}).\n\n"
                    + inspect.cleandoc(impl.__doc__ or ""))
    return shim


def _install_renamed(cls):
    """The implementation a class gives under an old name moves to ``_<old>_impl`` (what
    the package calls, silently) and the old name becomes the warning shim."""
    for old in _RENAMED:
        impl = cls.__dict__.get(old)
        if impl is not None and not getattr(impl, "_renamed", False):
            setattr(cls, f"_{old}_impl", impl)
            setattr(cls, old, _renamed(old, impl))


# nngeometry 0.4 named the right-hand side of the solves b / v / vs / J (upstream main: x) and
# the method impl (upstream main: solve); both spellings are accepted, and one argument given
# under two names is an error rather than a silent choice
_RHS_ALIASES = {"solve": ("b",), "solvePVec": ("v", "vs", "b"), "solvePFMap": ("J", "b")}


def _solve_or_impl(rep, method, solve, impl, explicit):
    if explicit and solve != impl:
        raise TypeError(f"{type(rep).__name__}.{method}() got solve={solve!r} and impl={impl!r}: "
                        "impl is nngeometry 0.4's name of solve, give only one of them")
    return impl


def _with_04_keywords(name, impl):
    params = inspect.signature(impl).parameters
    names = list(params)[1:]
    rhs = names[0]
    aliases = tuple(a for a in ("x",) + _RHS_ALIASES[name] if a != rhs)
    takes_impl = "impl" in params
    solve_at = names.index("solve") if "solve" in names else None

    @functools.wraps(impl)
    def wrapper(self, *args, **kwargs):
        given = [a for a in aliases if a in kwargs]
        if given:
            named = ([rhs] if rhs in kwargs else []) + given
            if args or len(named) > 1:
                how = " and ".join((["positionally"] if args else []) + [f"as {a}=" for a in named])
                raise TypeError(f"{type(self).__name__}.{name}() got its right-hand side {how}: "
                                f"give it once ({rhs}=, or nngeometry 0.4's "
                                f"{'/'.join(_RHS_ALIASES[name])}=)")
            kwargs[rhs] = kwargs.pop(given[0])
        if not takes_impl and "impl" in kwargs and solve_at is not None:
            how = kwargs.pop("impl")
            if len(args) > solve_at:
                _solve_or_impl(self, name, args[solve_at], how, True)
            else:
                kwargs["solve"] = _solve_or_impl(self, name, kwargs.get("solve"), how,
                                                 "solve" in kwargs)
        return impl(self, *args, **kwargs)

    wrapper._aliased = True
    return wrapper


def _install_keyword_aliases(cls):
    for name in _RHS_ALIASES:
        impl = cls.__dict__.get(name)
        if impl is not None and not getattr(impl, "_aliased", False):
            setattr(cls, name, _with_04_keywords(name, impl))


class PMatAbstract(StateDictMixin, SharedGeneratorCopy):
    """A ``P × P`` matrix in the parameter space of a ``LayerCollection``.

    Built either from ``examples`` (a DataLoader or a single mini-batch) through ``generator``,
    which then computes ``M = (1/n) Σ_x J(x)ᵀ J(x)`` (or the representation's approximation of
    it), or directly from ``data`` (the representation's own storage).

    Constructor: ``(layer_collection=None, generator=None, data=None, examples=None, **kwargs)``.
    Positional calls follow that order; the keyword style of nngeometry 0.4,
    ``PMatDense(generator=g, examples=loader)``, leaves out the collection, which is then the
    generator's ``layer_collection`` (or, when it has none, every layer of ``generator.model``).

    Subclasses implement ``_build(examples, **kwargs)`` (returning ``data``) and the operations
    their structure allows; an operation that has no sensible meaning for a structure raises
    ``NotImplementedError`` naming what to use instead.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _install_renamed(cls)
        _install_keyword_aliases(cls)

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None, **kwargs):
        self.layer_collection = resolve_layer_collection(layer_collection, generator, type(self).__name__)
        self.generator = generator
        if data is not None and examples is not None:
            raise ValueError("give either data or examples, not both")
        if data is None:
            if examples is None:
                raise ValueError("give either data or examples")
            if generator is None:
                raise ValueError("building from examples needs a generator")
            data = self._build(examples, **kwargs)
        self.data = data

    #: the name of the engine's method (on the generator) that computes the statistic this
    #: representation is built from (`from_statistics`); None for a representation that is the
    #: result of an operation on another one
    statistic = None

    @classmethod
    def from_statistics(cls, layer_collection, statistics, **options):
        """The representation built from the engine's statistic, already computed: what
        ``cls(generator=g, examples=x)`` builds from ``g.<cls.statistic>(x, layer_collection)``
        (the same code path, without a generator).

        Args:
            layer_collection: the `LayerCollection` the statistic was computed on.
            statistics: the output of the generator's method named by
                the class attribute `statistic`; each
                representation's docstring of ``_data_from_statistics`` gives its shapes.
            **options: the representation's options that act on the statistic (e.g.
                ``separate_weight_and_bias`` of PMatKFAC).

        Raises:
            ValueError: the statistic does not match ``layer_collection`` (layers or shapes).
        """
        cls._check_statistics(layer_collection, statistics, **options)
        data = cls._data_from_statistics(layer_collection, statistics, **options)
        return cls(layer_collection, None, data=data)

    @classmethod
    def _check_statistics(cls, layer_collection, statistics, **options):
        """Refuse a statistic of another layer collection or shape (the engine's own, in the
        generator constructor, have the right ones by construction and are not checked)."""

    @classmethod
    def _data_from_statistics(cls, layer_collection, statistics, **options):
        raise NotImplementedError(
            f"{cls.__name__} is not built from a statistic of the engine (it is the result of "
            "an operation on another representation, or takes its data directly); build one of "
            "the representations listed in docs/representations.md instead")

    def _build(self, examples, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} cannot be built from examples (it is the result of an "
            "operation on another representation, or takes its data directly); build one of the "
            "representations listed in docs/representations.md instead")

    def _unsupported(self, what):
        """Default for an operation a representation does not implement."""
        raise NotImplementedError(
            f"{type(self).__name__}.{what} is not implemented for this representation; see "
            "docs/representations.md for which representations have it, or use to_torch() and "
            "dense torch operations on small models")

    # ------------------------------------------------------------------ checks
    def _check_pvector(self, v):
        if not isinstance(v, PVector):
            raise TypeError(f"expected a PVector, got {type(v).__name__}")
        if v.layer_collection is not self.layer_collection and \
                v.layer_collection != self.layer_collection:
            raise ValueError(
                f"the PVector's layout does not match the matrix: it has "
                f"{v.layer_collection.numel()} parameters over layers {v.layer_collection.layer_ids()}, "
                f"the matrix {self.layer_collection.numel()} over {self.layer_collection.layer_ids()}; "
                "build the vector on the matrix's LayerCollection")

    def _check_pfmap(self, m):
        if not isinstance(m, PFMap):
            raise TypeError(f"expected a PFMap, got {type(m).__name__}")
        if m.layer_collection != self.layer_collection:
            raise ValueError(
                "the PFMap's layout does not match the matrix's LayerCollection; build both from "
                "the same LayerCollection")

    def _check_same_kind(self, other):
        if type(other) is not type(self):
            raise NotImplementedError(
                f"operation between {type(self).__name__} and {type(other).__name__} is not "
                "implemented; convert both to dense with to_torch() or use matching representations")
        if other.layer_collection != self.layer_collection:
            raise ValueError("the two matrices are built on different LayerCollections")

    # ------------------------------------------------------------------ shapes
    def size(self, dim=None):
        """``(P, P)``, whatever the storage."""
        p = self.layer_collection.numel()
        return (p, p) if dim is None else (p, p)[dim]

    @property
    def dtype(self):
        return self.get_diag().dtype

    # ------------------------------------------------------------------ container of blocks
    # A representation that is a container of blocks implements ``_blocks`` (and ``_from_blocks``
    # for the operations that return a matrix); ``_split``/``_join`` default to the layers'
    # slices of the flat layout (one block per layer, 1-D layouts) or the whole vector (one
    # block). Kronecker-structured containers override them with their layout.
    _DAMPINGS = ("exact",)
    # whether each block's layout is its slice of the flat layout (else ``_split``/``_join``
    # re-index, and ``to_torch`` goes through products with the identity)
    _flat_layouts = True
    # whether the blocks take a per-entry damping exactly (not the Kronecker ones: refused with
    # the message naming the representations where it is exact)
    _per_entry_exact = True

    def _blocks(self):
        """The blocks, in the order of the flat layout; None for a representation that is not a
        container of blocks (it implements the operations itself)."""
        return None

    def _blocks_or_unsupported(self, what):
        blocks = self._blocks()
        if blocks is None:
            self._unsupported(what)
        return blocks

    def _block_keys(self):
        """The layer id of each block, or None when one block holds the whole matrix."""
        return None

    def _split(self, X):
        """``X`` of shape ``(..., P)`` as one tensor per block, in the blocks' layouts."""
        keys = self._block_keys()
        if keys is None:
            return [X]
        return [X[..., s] for s in self._slices(keys)]

    def _slices(self, keys):
        """The flat-layout slices of the layers ``keys``, computed once per collection."""
        cached = self.__dict__.get("_slices_cache")
        if cached is None or cached[0] is not self.layer_collection or cached[1] != keys:
            lc = self.layer_collection
            cached = self._slices_cache = (lc, list(keys), [lc.slice(k) for k in keys])
        return cached[2]

    def _join(self, parts):
        """The inverse of `_split`: one ``(..., P)`` tensor."""
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _from_blocks(self, blocks):
        """The representation holding ``blocks`` (results of ``matpower``, ``scaled``, ``add``):
        by default the same class, on the same collection."""
        self._unsupported("a matrix built from its blocks")

    def _rows(self, X, fn, blocks):
        """``fn(block, V)`` for each block on its part of the rows of ``X``, joined back."""
        return self._join([fn(b, V) for b, V in zip(blocks, self._split(X))])

    def _check_damping(self, damping, what):
        if damping not in self._DAMPINGS:
            raise ValueError(
                f"{type(self).__name__}.{what}: damping={damping!r} is not available; "
                f"this representation offers damping={' or '.join(map(repr, self._DAMPINGS))} "
                "('exact': functions of M + Λ itself; 'pi': π-damped Kronecker factors, "
                "PMatKFAC only)")

    # keywords of the damped operations that say how a block takes its damping (PMatKFAC's
    # use_pi), passed to `_block_damping`
    _DAMPING_OPTIONS = ()

    def _block_layers(self):
        """The layer id of each block (`_block_keys` when blocks are per layer), or None."""
        return self._block_keys()

    # the damping a block takes for a scalar ``value`` under a ``damping`` other than 'exact',
    # ``_block_damping(value, **options)`` (PMatKFAC's `PiDamping`); None: there is none
    _block_damping = None

    def _dampings(self, regul, what, damping="exact", **options):
        """``(regul for the messages, the blocks, [the damping of each block])``: a scalar ``λ`` as given;
        a per-layer ``Λ`` as each layer's scalar when blocks are per layer; otherwise each
        block's part of the diagonal of ``Λ`` (a per-entry damping in the block's layout).
        A ``damping`` other than ``'exact'`` turns each scalar into the block's damping
        (`_block_damping`, with ``options``)."""
        if damping not in self._DAMPINGS:
            self._check_damping(damping, what)
        if options and not set(options) <= set(self._DAMPING_OPTIONS):
            raise TypeError(f"{type(self).__name__}.{what} got unexpected keyword(s) "
                            f"{', '.join(sorted(set(options) - set(self._DAMPING_OPTIONS)))}")
        if damping != "exact" and self._block_damping is None:
            raise ValueError(f"{type(self).__name__}.{what}: damping={damping!r} is not "
                             "available for this operation; use damping='exact'")
        blocks = self._blocks_or_unsupported(what)
        if isinstance(regul, (int, float)) and not isinstance(regul, bool):
            scalar, prior = regul, None  # a plain number: Λ = λI
        else:
            scalar, prior = scalar_or_prior(regul, self.layer_collection, type(self).__name__,
                                            what)
        if prior is None:
            regul, values = scalar, [scalar] * len(blocks)
        elif prior.kind == "layer" and self._block_layers() is not None:
            # every block of a layer with several (attention) takes its layer's λ
            regul, values = prior, [prior.layer_value(lid) for lid in self._block_layers()]
        else:
            if not self._per_entry_exact:
                from ._prior import per_parameter_refused
                raise per_parameter_refused(type(self).__name__, what)
            return prior, blocks, self._split(prior.flat(self._like()))
        if damping != "exact":
            values = [self._block_damping(v, **options) for v in values]
        return regul, blocks, values

    def _like(self):
        """A tensor of the matrix's dtype and device."""
        return self.get_diag()

    # ------------------------------------------------------------------ products
    def mv(self, v):
        """``M v``."""
        blocks = self._blocks_or_unsupported("mv")
        self._check_pvector(v)
        return PVector(self.layer_collection,
                       vector_repr=self._rows(v.get_flat_representation(), _apply, blocks))

    def vTMv(self, v):
        """``vᵀ M v``."""
        blocks = self._blocks_or_unsupported("vTMv")
        self._check_pvector(v)
        parts = self._split(v.get_flat_representation())
        return _total(b.quadratic(V) for b, V in zip(blocks, parts))

    def mmap(self, pfmap):
        """``M`` applied to every row of the PFMap (shape ``(K, n, P)``)."""
        blocks = self._blocks_or_unsupported("mmap")
        self._check_pfmap(pfmap)
        return PFMapDense(self.layer_collection,
                          data=self._rows(pfmap.to_torch(), _apply, blocks))

    def mapTMmap(self, pfmap, reduction="sum"):
        """Quadratic forms of the rows of a PFMap ``J`` (shape ``(K, n, P)``):
        ``q[k, i] = J[k, i] M J[k, i]ᵀ``.

        ``reduction='diag'``: the ``(K, n)`` tensor ``q``; ``reduction='sum'``: its sum over the
        outputs ``k``, shape ``(n,)``. (Cross terms between examples are never formed.)
        """
        self._check_pfmap(pfmap)
        check_reduction(reduction)
        J = pfmap.to_torch()
        blocks = self._blocks()
        if blocks is not None:
            q = _total(b.quadratic(V) for b, V in zip(blocks, self._split(J)))
            return reduce_forms(q, reduction)
        MJ = self.mmap(pfmap).to_torch()
        return reduce_forms((J * MJ).sum(dim=-1), reduction)

    def __matmul__(self, other):
        if isinstance(other, PVector):
            return self.mv(other)
        if isinstance(other, PFMap):
            return self.mmap(other)
        if isinstance(other, PMatAbstract):
            return self.mm(other)
        return NotImplemented

    def mm(self, other):
        self._unsupported("mm")

    # ------------------------------------------------------------------ solves and functions
    def solve(self, x, regul=1e-8, solve="default", impl=None, **kwargs):
        """Solve ``(M + regul·I) y = x`` for a PVector or PFMap ``x`` (``regul`` is a damping
        whose exact meaning is the representation's: see its ``solvePVec``). ``impl`` is
        nngeometry 0.4's name of ``solve`` (the method), accepted for its callers, as are its
        names of ``x``: ``b`` here, ``v`` / ``vs`` / ``b`` in ``solvePVec``, ``J`` / ``b`` in
        ``solvePFMap`` (one argument given under two names raises ``TypeError``)."""
        if impl is not None:
            solve = _solve_or_impl(self, "solve", solve, impl, solve != "default")
        if isinstance(x, PVector):
            return self.solvePVec(x, regul=regul, solve=solve, **kwargs)
        if isinstance(x, PFMap):
            return self.solvePFMap(x, regul=regul, solve=solve, **kwargs)
        raise TypeError(f"solve takes a PVector or a PFMap, got {type(x).__name__}")

    # the ``solve`` methods a representation takes: each name maps to ``(damping, method)``,
    # the damping it stands for (None: the ``damping`` given) and the blocks' ``solve`` method
    # (None: their default)
    _SOLVE_METHODS = {"default": (None, None), "solve": (None, None)}

    def _solve_damping(self, solve, damping):
        """``(damping, block method)`` for the ``solve`` name (see ``_SOLVE_METHODS``)."""
        entry = self._SOLVE_METHODS.get(solve)
        if entry is None:
            raise ValueError(f"unknown solve '{solve}' for {type(self).__name__}: use "
                             + " or ".join(map(repr, self._SOLVE_METHODS)))
        return damping if entry[0] is None else entry[0], entry[1]

    def _block_solve_rows(self, X, regul, damping, what="solve", method=None, **options):
        regul, blocks, dampings = self._dampings(regul, what, damping, **options)
        caller = (type(self).__name__, regul)
        if method is None:
            return self._join([b.solve(V, d, caller) for b, V, d in
                               zip(blocks, self._split(X), dampings)])
        return self._join([b.solve(V, d, caller, method) for b, V, d in
                           zip(blocks, self._split(X), dampings)])

    def solvePVec(self, x, regul=1e-8, solve="default", damping="exact", **options):
        """``(M + Λ)⁻¹ x`` block by block, exact (``regul``: see `_prior`)."""
        self._check_pvector(x)
        damping, method = self._solve_damping(solve, damping)
        return PVector(self.layer_collection, vector_repr=self._block_solve_rows(
            x.get_flat_representation(), regul, damping, method=method, **options))

    def solvePFMap(self, x, regul=1e-8, solve="default", damping="exact", **options):
        """``(M + Λ)⁻¹`` applied to every row of the PFMap, block by block."""
        self._check_pfmap(x)
        damping, method = self._solve_damping(solve, damping)
        return PFMapDense(self.layer_collection, data=self._block_solve_rows(
            x.to_torch(), regul, damping, method=method, **options))

    def _power_blocks(self, p, regul, damping, what, **options):
        """``[(B + Λ_B)^p]`` for every block."""
        regul, blocks, dampings = self._dampings(regul, what, damping, **options)
        caller = (type(self).__name__, regul)
        return [b.matpower(p, d, caller) for b, d in zip(blocks, dampings)]

    def _matpower(self, p, regul, damping, what, **options):
        return self._from_blocks(self._power_blocks(p, regul, damping, what, **options))

    def inverse(self, regul=1e-8, damping="exact", **options):
        """``(M + Λ)⁻¹`` block by block, exact (singular: the shared error)."""
        return self._matpower(-1.0, regul, damping, "inverse", **options)

    def inv(self, regul=1e-8, **kwargs):
        """``(M + Λ)⁻¹`` (see the representation's ``inverse`` for ``regul`` and damping)."""
        return self._inverse_impl(regul=regul, **kwargs)

    def pow(self, x, regul=0.0, damping="exact", **options):
        """``(M + Λ)^x`` block by block, exact: negative powers need ``M + Λ`` invertible,
        fractional ones positive semi-definite (the shared errors; round-off below 0 is
        clipped)."""
        return self._matpower(x, regul, damping, f"pow({x})", **options)

    def __pow__(self, x):
        return self.pow(x)

    def logdet(self, regul=0.0, damping="exact", **options):
        """``log det(M + Λ) = Σ_blocks log det(B + Λ_B)`` (positive definite, or the shared
        errors), differentiable with respect to a ``Λ`` that requires grad."""
        regul, blocks, dampings = self._dampings(regul, "logdet", damping, **options)
        caller = (type(self).__name__, regul)
        if len(blocks) > 1 and all(b.logdet_is_spectral(d) for b, d in zip(blocks, dampings)):
            # one check of the whole spectrum (one tolerance, one error), one sum
            from ._checks import logdet_of
            return logdet_of(torch.cat([b.eigenvalues(d).reshape(-1)
                                        for b, d in zip(blocks, dampings)]), caller[0], regul)
        return _total(b.logdet(d, caller) for b, d in zip(blocks, dampings))

    def eigenvalues(self, regul=0.0, damping="exact", **options):
        """The ``P`` eigenvalues of ``M + Λ``, block by block (in no particular order)."""
        regul, blocks, dampings = self._dampings(regul, "eigenvalues", damping, **options)
        return torch.cat([b.eigenvalues(d).reshape(-1) for b, d in zip(blocks, dampings)])

    def diag_of_inverse(self, regul=1e-8, damping="exact", **options):
        """``diag((M + Λ)⁻¹)`` as a ``(P,)`` tensor (the marginal variances of a Laplace
        posterior of precision ``M + Λ``), block by block, without forming a ``P × P``."""
        regul, blocks, dampings = self._dampings(regul, "diag_of_inverse", damping, **options)
        caller = (type(self).__name__, regul)
        return self._join([b.matpower(-1.0, d, caller).diag() for b, d in zip(blocks, dampings)])

    def sqrt(self, regul=0.0, **kwargs):
        """``(M + Λ)^{1/2}``: [`pow`][nngeometry.object.pspace.abstract.PMatAbstract.pow] with ``x = 1/2`` (same ``regul`` kinds, same damping
        rule and keywords; a matrix that is not positive semi-definite after damping raises the
        shared ``NotPositiveSemiDefiniteError``)."""
        return self.pow(0.5, regul=regul, **kwargs)

    # ------------------------------------------------------------------ reductions
    def get_diag(self):
        """The ``(P,)`` diagonal of ``M``."""
        return self._join([b.diag() for b in self._blocks_or_unsupported("get_diag")])

    def trace(self):
        blocks = self._blocks()
        if blocks is None:
            return self.get_diag().sum()
        return _total(b.trace() for b in blocks)

    def frobenius_norm(self):
        """``sqrt(Σ_pq M_pq²)``."""
        return torch.sqrt(_total(b.frobenius_sq() for b in self._blocks_or_unsupported(
            "frobenius_norm")))

    def norm(self, ord=None):
        """A matrix norm of ``M``:

        * ``ord=None`` or ``'fro'``: the Frobenius norm ``sqrt(Σ_pq M_pq²)``;
        * ``ord=2``: the spectral norm, the largest singular value (``max |λ|``: ``M`` is
          symmetric);
        * ``ord=-2``: the smallest singular value (``min |λ|``; 0 for a singular matrix).
        """
        if ord in (None, "fro"):
            return self._frobenius_norm_impl()
        if ord in (2, -2):
            sv = self._singular_values()
            return sv.max() if ord == 2 else sv.min()
        raise NotImplementedError(
            f"norm(ord={ord!r}) is not implemented for {type(self).__name__}; use ord='fro', 2 "
            "or -2, or torch.linalg.matrix_norm(M.to_torch(), ord) on small matrices")

    def _singular_values(self):
        """All ``P`` singular values (``|λ|``), in any order; what ``norm(ord=±2)`` needs."""
        self._blocks_or_unsupported("norm(ord=2 or -2)")
        return self.eigenvalues().abs()

    def pinv(self, atol=1e-8):
        """Moore-Penrose pseudo-inverse ``M⁺``: the eigenvalues with ``|λ| ≤ atol`` are treated
        as zero (their eigenvectors are sent to 0), the others inverted."""
        self._unsupported("pinv")

    def pinverse(self, atol=1e-8):
        """The pseudo-inverse under the name ``torch.pinverse`` uses: `pinv`."""
        return self.pinv(atol=atol)

    def get_device(self):
        """The device of the matrix's storage (for a matrix that stores nothing, such as
        PMatImplicit, the device of the model's parameters)."""
        t = _first_tensor(self.data)
        if t is not None:
            return t.device
        model = getattr(self.generator, "model", None)
        if model is not None:
            for p in model.parameters():
                return p.device
        device = getattr(self.layer_collection, "device", None)
        return torch.device(device if device is not None else "cpu")

    def to_torch(self):
        """The dense ``(P, P)`` matrix, from the blocks' dense matrices (allocates ``P²``;
        refused with a MemoryError naming the size when it can't fit)."""
        from ._checks import check_dense_fits
        blocks = self._blocks_or_unsupported("to_torch")
        like = self._like()
        check_dense_fits(self.layer_collection.numel(), like.element_size(),
                         what=f"{type(self).__name__}.to_torch(): a dense")
        if not self._flat_layouts:
            P = self.layer_collection.numel()
            check_dense_fits(P, like.element_size(), count=2,
                             what=f"{type(self).__name__}.to_torch(): a dense")
            return self._rows(torch.eye(P, dtype=like.dtype, device=like.device), _apply, blocks)
        if len(blocks) == 1 and self._block_keys() is None:
            return blocks[0].dense()
        return torch.block_diag(*[b.dense() for b in blocks])

    def get_dense_tensor(self):
        return self.to_torch()

    # ------------------------------------------------------------------ arithmetic
    def _scaled(self, x):
        return self._from_blocks([b.scaled(x) for b in self._blocks_or_unsupported("scaling")])

    def _add_blocks(self, other, sign=1.0):
        """``M + sign·other`` block by block, for another container on the same collection
        whose blocks add to a structured block (a PMatEye: ``+ s·I`` on every block)."""
        from .eye import PMatEye
        blocks = self._blocks_or_unsupported("__add__")
        if other.layer_collection != self.layer_collection:
            raise ValueError("the two matrices are built on different LayerCollections")
        if isinstance(other, PMatEye):
            s = other.scaling * sign
            return self._from_blocks([b.add_identity(s) for b in blocks])
        if type(other).__name__ not in self._ADDS_WITH:
            self._check_same_kind(other)
        theirs = other._blocks() if sign == 1.0 else [b.scaled(sign) for b in other._blocks()]
        return self._from_blocks([a.add(b) for a, b in zip(blocks, theirs)])

    # the names of the other representations whose blocks add to this one's (besides its own
    # class and PMatEye)
    _ADDS_WITH = ()

    def __mul__(self, x):
        if isinstance(x, (int, float)) or (torch.is_tensor(x) and x.dim() == 0):
            return self._scaled(x)
        return NotImplemented

    __rmul__ = __mul__

    def __truediv__(self, x):
        return self * (1.0 / x)

    def __neg__(self):
        return self._scaled(-1.0)

    def __add__(self, other):
        """``M + other`` block by block: another matrix of the same representation whose
        blocks add to a structured block, or a `PMatEye` ``s·I`` (``+ s·I`` on every block)."""
        if not isinstance(other, PMatAbstract):
            return NotImplemented
        return self._add_blocks(other)

    def __radd__(self, other):
        return self.__add__(other)

    def __sub__(self, other):
        if not isinstance(other, PMatAbstract):
            return NotImplemented
        if self._blocks() is None:
            return self + (-other)
        return self._add_blocks(other, -1.0)

    # ------------------------------------------------------------------ device and dtype
    def to(self, *args, **kwargs):
        """A copy of the matrix with its storage moved: ``M.to(device)``, ``M.to(dtype)``,
        ``M.to(device, dtype)`` or ``M.to(tensor)``, as ``torch.Tensor.to`` (``non_blocking=``
        too). Floating-point tensors take the dtype (e.g. ``torch.float64`` for an accurate
        solve); integer ones (indices) only move. The caches (factorizations,
        eigendecompositions) are not carried: they are recomputed on demand in the new dtype.
        The generator is kept. The LayerCollection is a copy recording the new dtype / device
        (the default of ``random_pvector``); it equals the original, so vectors on either work
        with the moved matrix once they are in its dtype and on its device."""
        from .._moving import move, parse_to

        device, dtype, non_blocking = parse_to(args, kwargs, type(self).__name__)
        # what pickling keeps, without the caches (keyed on the old tensors) and without an
        # eigendecomposition computed from the data (its '_eig_snapshot' says so; one set by
        # hand is the user's and moves): recomputed in the new dtype when asked for
        drop = {"generator"}
        if "_eig_snapshot" in self.__dict__:
            drop |= {"evals", "evecs"}
        state = {k: v for k, v in self.__getstate__().items()
                 if k not in drop and not k.endswith("_cache")}
        moved = type(self).__new__(type(self))
        moved.__setstate__({k: move(v, device, dtype, non_blocking) for k, v in state.items()})
        moved.generator = self.generator
        return moved

    # ------------------------------------------------------------------ pickling
    def __getstate__(self):
        # the generator holds the model and a user function (often a lambda): not picklable,
        # and not needed once the matrix is built
        state = self.__dict__.copy()
        state["generator"] = None
        state.pop("_slices_cache", None)  # recomputed on demand
        state.pop("_solve_cache", None)  # factorizations: recomputable
        state.pop("_blocks_cache", None)  # kept blocks and their caches: recomputable
        return state

    def __setstate__(self, state_dict):
        """Restore a pickled matrix: everything but the generator, which is None after
        loading (set ``M.generator`` again for the operations that run the model)."""
        self.__dict__.update(state_dict)
        self.__dict__.setdefault("generator", None)

    # ------------------------------------------------------------------ interop (see _scipy.py)
    def to_scipy(self, dtype=None):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out, batched
        ``matmat``) for ``eigsh``, ``cg``, ``lsmr``...; needs scipy (optional)."""
        from ._scipy import to_scipy
        return to_scipy(self, dtype=dtype)

    def submatrix(self, rows, cols=None):
        """The dense tensor ``M[rows][:, cols]`` (``cols`` default ``rows``), from products."""
        from ._scipy import submatrix
        return submatrix(self, rows, cols)


def function_origin(generator):
    """What identifies the function of ``generator`` (a Jacobian generator) across pickling: a
    variant's description (``closed_form_function(function, 'classif_logits')``, see
    `nngeometry.curvature`) or the module and qualified name of a user's function; None
    without a generator."""
    fn = getattr(generator, "function", None)
    if fn is None:
        return None
    return getattr(fn, "origin", None) or (
        f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}")


def check_same_function(matrix, rep):
    """``RuntimeError`` if the generator attached to an unpickled ``matrix`` computes another
    function than the one the matrix was built with: e.g. a generator of the bare model,
    ``TorchHooksJacobianBackend(model)``, differentiates the logits where a Fisher was built
    from ``closed_form_function(model, 'classif_logits')`` (12 times off on a 3-class MLP)."""
    built = matrix.__dict__.get("_function_origin")
    if built is None:
        return
    attached = function_origin(matrix.generator)
    if attached == built:
        return
    raise RuntimeError(
        f"the generator attached to this unpickled {rep} computes another function than the one "
        f"it was built with: built with {built}, attached {attached}; its products would be of "
        "another matrix. Attach a generator built with the same function, e.g. for "
        "FIM(model, ..., variant=v): TorchHooksJacobianBackend(model, "
        "nngeometry.curvature.closed_form_function(lambda *b: model(b[0]), v)) (for "
        "FIM_MonteCarlo: monte_carlo_function(lambda *b: model(b[0]), v, trials)); or build "
        "the matrix again from the model")


def _total(values):
    """The sum of an iterable of tensors, without the ``0 + t`` that ``sum`` starts with (one
    tensor operation less per call: these are per-call overheads on small models)."""
    it = iter(values)
    out = next(it)
    for v in it:
        out = out + v
    return out


def _apply(block, V):
    return block.apply(V)


def check_reduction(reduction):
    if reduction not in ("sum", "diag"):
        raise ValueError(f"unknown reduction '{reduction}': use 'sum' (shape (n,)) or 'diag' "
                         "(shape (K, n))")


def reduce_forms(q, reduction):
    """``q`` of shape ``(K, n)`` (the quadratic forms ``J[k, i] M J[k, i]ᵀ``) reduced as
    ``mapTMmap`` documents: ``'diag'`` keeps it, ``'sum'`` sums over ``k``."""
    check_reduction(reduction)
    return q if reduction == "diag" else q.sum(dim=0)


def _first_tensor(data):
    """The first tensor found in ``data`` (a tensor, or dicts / tuples / lists of them)."""
    if torch.is_tensor(data):
        return data
    if isinstance(data, dict):
        data = list(data.values())
    if isinstance(data, (tuple, list)):
        for item in data:
            t = _first_tensor(item)
            if t is not None:
                return t
    elif isinstance(data, PMatAbstract):  # PMatMixed: {group: PMat}
        return _first_tensor(data.data)
    return None


def bdot(A, B):
    """Batched dot product: ``bdot(A, B)[i] = <A[i], B[i]>``."""
    return torch.matmul(A.unsqueeze(1), B.unsqueeze(2)).squeeze(2).squeeze(1)


_install_renamed(PMatAbstract)
_install_keyword_aliases(PMatAbstract)
