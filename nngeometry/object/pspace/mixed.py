"""``PMatMixed``: a different representation for each group of layers (block-diagonal across
groups)."""
import torch

from ...layercollection import LayerCollection
from . import _checks
from ._prior import scalar_or_prior
from .abstract import PMatAbstract, resolve_layer_collection
from .blocks.representation import GroupDamping, RepresentationBlock, call_group, accepted


class PMatMixed(PMatAbstract):
    """Block-diagonal across groups of layers, each group's block in its own representation.

    With the layers split into groups ``g`` (sub-collections ``L_g`` of ``layer_collection``),
    the matrix is ``M = ⊕_g M_g`` (cross-group blocks are zero), ``M_g`` a ``PMat*`` on ``L_g``;
    e.g. KFAC for the large layers and PMatDense / PMatBlockDiag for small ones. Every operation
    splits its operand (PVector or PFMap) by group, runs the group's representation, and
    reassembles the result in the full layout.

    Args:
        layer_collection: the full collection.
        generator: the Jacobian generator, used for the groups given as classes.
        layer_collection_each: ``{group: LayerCollection}``: each group's layers, a
            sub-collection of ``layer_collection`` (e.g. ``lc.sub([...])``). The groups must
            partition the layers. Optional when ``layer_map`` is given.
        layer_map: ``{layer_id: group}``: the group of each layer (every layer of
            ``layer_collection`` exactly once). Optional when ``layer_collection_each`` is given
            (or when every ``sub_pmats`` entry is a built matrix: their collections define the
            groups); checked against it when both are given.
        sub_pmats: ``{group: PMat}``: per group either a built matrix on that group's collection,
            a ``PMat*`` class (built here from ``examples`` with ``generator``), or a pair
            ``(PMat class, kwargs)`` (e.g. ``(PMatKFAC, {"kfac_approx": "reduce"})``).
        examples: a DataLoader or a single mini-batch (needed when a group is given as a class).
        data: alias of ``sub_pmats`` made of built matrices only (``{group: PMat}``).

    Keyword arguments of ``solve`` (e.g. ``use_pi``, ``damping``) are passed to the groups whose
    representation accepts them.
    """

    def __init__(self, layer_collection, generator, layer_collection_each=None, layer_map=None,
                 sub_pmats=None, examples=None, data=None):
        layer_collection = resolve_layer_collection(layer_collection, generator, type(self).__name__)
        self.layer_collection = layer_collection
        self.generator = generator
        if data is not None:
            if sub_pmats is not None:
                raise ValueError("give sub_pmats or data, not both")
            sub_pmats = data
        if not sub_pmats:
            raise ValueError("PMatMixed needs sub_pmats: {group: PMat class or built PMat}")
        self.layer_collection_each, self.layer_map = self._groups(
            layer_collection, layer_collection_each, layer_map, sub_pmats)
        built = {}
        for g, spec in sub_pmats.items():
            lc_g = self.layer_collection_each[g]
            if isinstance(spec, PMatAbstract):
                if spec.layer_collection != lc_g:
                    raise ValueError(f"the matrix given for group '{g}' is built on layers "
                                     f"{spec.layer_collection.layer_ids()}, the group has "
                                     f"{lc_g.layer_ids()}")
                built[g] = spec
                continue
            cls, kw = (spec if isinstance(spec, tuple) else (spec, {}))
            if not (isinstance(cls, type) and issubclass(cls, PMatAbstract)):
                raise TypeError(f"sub_pmats['{g}'] must be a PMat class, (class, kwargs) or a built "
                                f"PMat, got {spec!r}")
            if examples is None or generator is None:
                raise ValueError(f"group '{g}' is given as a class ({cls.__name__}): building it "
                                 "needs examples and a generator")
            built[g] = cls(layer_collection=lc_g, generator=generator, examples=examples, **kw)
        self.data = built
        P = layer_collection.numel()
        self._index = {}
        for g, lc_g in self.layer_collection_each.items():
            idx = [torch.arange(layer_collection.slice(lid).start, layer_collection.slice(lid).stop)
                   for lid in lc_g.layer_ids()]
            self._index[g] = torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)
        assert sum(i.numel() for i in self._index.values()) == P

    @property
    def sub_pmats(self):
        """``{group: PMat}``: the built matrix of every group (the same dict as ``data``)."""
        return self.data

    @classmethod
    def from_mapping(cls, layer_collection, generator, default_representation, map_layers_to,
                     data=None, examples=None, **kwargs):
        """A PMatMixed that uses ``default_representation`` for every layer, except those that
        ``map_layers_to`` sends to another representation; the layers that share a
        representation form one group (so e.g. ``PMatDense`` on two layers keeps their cross
        terms).

        Args:
            layer_collection: the full collection (None: the generator's).
            generator: the Jacobian generator.
            default_representation: a ``PMat*`` class, or ``(class, kwargs)``.
            map_layers_to: ``{key: representation}`` (representations as above), where a key
                is a layer id (``"net.0"``), a layer type (``LinearLayer``) or its name
                (``"LinearLayer"``), or a module class (``nn.Conv2d``, matched against the
                generator's model); a layer id takes precedence over a type.
            data: ``{group: built PMat}`` instead of ``examples``; groups are named after
                their representation's class (``"PMatDiag"``; ``"PMatDiag_1"``, ... when a class
                comes with different kwargs).
            examples: a DataLoader or a single mini-batch, to build every group.
            **kwargs: passed to every group's constructor (e.g. ``kfac_approx``).
        """
        lc = resolve_layer_collection(layer_collection, generator, cls.__name__)
        model = getattr(generator, "model", None)
        modules = dict(model.named_modules()) if model is not None else {}
        specs = {}
        for lid in lc.layer_ids():
            spec = default_representation
            if lid in map_layers_to:
                spec = map_layers_to[lid]
            else:
                layer, module = lc[lid], modules.get(lid)
                for key, rep in map_layers_to.items():
                    if (isinstance(key, type) and isinstance(layer, key)) or \
                            (isinstance(key, type) and isinstance(module, key)) or \
                            (isinstance(key, str) and key == type(layer).__name__):
                        spec = rep
                        break
            rep = spec[0] if isinstance(spec, tuple) else spec
            if not (isinstance(rep, type) and issubclass(rep, PMatAbstract)):
                raise TypeError(f"layer '{lid}' is mapped to {rep!r}, not a PMat class")
            specs[lid] = spec
        unknown = [k for k in map_layers_to if isinstance(k, str) and k not in lc.layers
                   and not any(type(lc[lid]).__name__ == k for lid in lc.layer_ids())]
        if unknown:
            raise ValueError(f"map_layers_to names {unknown}: neither layer ids of the collection "
                             f"({lc.layer_ids()}) nor the type of any of its layers")
        # one group per distinct representation (a class with different kwargs is another one)
        groups, layer_map, sub_pmats, per_class = [], {}, {}, {}
        for lid, spec in specs.items():
            for name, known in groups:
                if known is spec or known == spec:
                    break
            else:
                rep = spec[0] if isinstance(spec, tuple) else spec
                base = getattr(rep, "__name__", str(rep))
                count = per_class.get(base, 0)
                per_class[base] = count + 1
                name = base if count == 0 else f"{base}_{count}"
                groups.append((name, spec))
            layer_map[lid] = name
        for name, spec in groups:
            if isinstance(spec, tuple):
                rep, kw = spec
                sub_pmats[name] = (rep, {**kwargs, **kw})
            else:
                sub_pmats[name] = (spec, dict(kwargs)) if kwargs else spec
        if data is not None:
            if examples is not None:
                raise ValueError("give either data or examples, not both")
            if set(data) != set(sub_pmats):
                raise ValueError(f"data must have one built PMat per group {sorted(sub_pmats)}, "
                                 f"got {sorted(map(str, data))}")
            sub_pmats = dict(data)
        return cls(lc, generator, layer_map=layer_map, sub_pmats=sub_pmats, examples=examples)

    @staticmethod
    def _groups(lc, each, layer_map, sub_pmats):
        if each is None and layer_map is None:
            if all(isinstance(s, PMatAbstract) for s in sub_pmats.values()):
                each = {g: s.layer_collection for g, s in sub_pmats.items()}
            else:
                raise ValueError("give layer_collection_each ({group: LayerCollection}) or "
                                 "layer_map ({layer_id: group}) to say which layers form each group")
        if each is None:
            unknown = set(layer_map) - set(lc.layers)
            if unknown:
                raise ValueError(f"layer_map names layers that are not in the collection: {sorted(unknown)}")
            groups = {}
            for lid in lc.layer_ids():
                if lid not in layer_map:
                    raise ValueError(f"layer '{lid}' has no group in layer_map")
                groups.setdefault(layer_map[lid], []).append(lid)
            each = {g: lc.sub(ids) for g, ids in groups.items()}
        else:
            seen = {}
            fixed = {}
            for g, lc_g in each.items():
                if not isinstance(lc_g, LayerCollection):
                    raise TypeError(f"layer_collection_each['{g}'] must be a LayerCollection")
                for lid, layer in lc_g.layers.items():
                    if lid not in lc.layers or lc[lid] != layer:
                        raise ValueError(f"layer '{lid}' of group '{g}' is not a layer of the "
                                         "collection (or has another spec)")
                    if lid in seen:
                        raise ValueError(f"layer '{lid}' is in two groups ('{seen[lid]}', '{g}')")
                    seen[lid] = g
                fixed[g] = lc.sub(lc_g.layer_ids())
                if fixed[g] != lc_g:
                    raise ValueError(f"group '{g}' lists its layers in another order than the "
                                     "collection; build it with layer_collection.sub(...)")
            missing = set(lc.layers) - set(seen)
            if missing:
                raise ValueError(f"layers {sorted(missing)} belong to no group")
            if layer_map is not None and dict(layer_map) != seen:
                raise ValueError("layer_map disagrees with layer_collection_each")
            layer_map = seen
            each = fixed
        if layer_map is None:
            layer_map = {lid: g for g, lc_g in each.items() for lid in lc_g.layer_ids()}
        if set(sub_pmats) != set(each):
            raise ValueError(f"sub_pmats has groups {sorted(map(str, sub_pmats))}, the layers are "
                             f"split in groups {sorted(map(str, each))}")
        return dict(each), dict(layer_map)

    def _new(self, subs):
        return PMatMixed(self.layer_collection, self.generator,
                         layer_collection_each=self.layer_collection_each, sub_pmats=subs)

    # ------------------------------------------------------------------ the container
    # One `RepresentationBlock` per group, in the order of ``data``: every operation is the
    # base class's, each block calling its group's representation. A group's layers need not
    # be contiguous in the flat layout: ``_split`` / ``_join`` gather and scatter them.
    def _blocks(self):
        return [RepresentationBlock(m) for m in self.data.values()]

    def _from_blocks(self, blocks):
        return self._new({g: b.matrix for g, b in zip(self.data, blocks)})

    def _split(self, X):
        return [X[..., self._index[g].to(X.device)] for g in self.data]

    def _join(self, parts):
        order = self.__dict__.get("_join_order")
        if order is None:  # the flat position of each entry of the groups' parts, put back
            order = self._join_order = torch.argsort(torch.cat([self._index[g]
                                                                for g in self.data]))
        return torch.cat(parts, dim=-1)[..., order.to(parts[0].device)]

    def _dampings(self, regul, what, damping=None, **options):
        """Each group's `GroupDamping`: its share of ``Λ`` (a scalar as it is, a per-layer or
        per-parameter prior restricted to the group's layers: ``M + Λ`` is block-diagonal over
        the groups, so every group's result is exact where its representation's is) and the
        keywords, which reach the groups whose representation takes them."""
        if damping is not None:
            self._check_damping(damping, what)
        scalar, prior = scalar_or_prior(regul, self.layer_collection, "PMatMixed", what)
        options = dict(options, damping=damping)
        reguls = [scalar if prior is None else prior.restrict(self.layer_collection_each[g])
                  for g in self.data]
        return (scalar if prior is None else prior, self._blocks(),
                [GroupDamping(r, options) for r in reguls])

    def _solve_damping(self, solve, damping):
        # the solve= names are the groups' own
        return damping, solve

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_join_order", None)
        return state

    def _check_same_grouping(self, other):
        self._check_same_kind(other)
        if other.layer_collection_each != self.layer_collection_each:
            raise NotImplementedError("the two PMatMixed group their layers differently; use "
                                      "to_torch() (dense)")

    def mm(self, other):
        """Group-wise products with another PMatMixed grouped the same way."""
        self._check_same_grouping(other)
        return self._new({g: self.data[g].mm(other.data[g]) for g in self.data})

    # ------------------------------------------------------------------ solves and functions
    @property
    def _DAMPINGS(self):
        """Every damping one of the groups offers ('pi' when a group is KFAC)."""
        out = ["exact"]
        for m in self.data.values():
            out += [d for d in m._DAMPINGS if d not in out]
        return tuple(out)

    # upstream's signatures, with damping=None: each group's own default damping (π-damping for
    # a KFAC group), or the one given where the group offers it (else exact); the operations
    # are the base class's, on the groups' blocks
    def solvePVec(self, x, regul=1e-8, solve="default", damping=None, **kwargs):
        """Group-wise ``solve`` (each group's damping semantics, see its representation);
        ``regul``: a scalar, a per-layer dict, a PVector, a PMatEye or a PMatDiag, each group
        receiving its own layers' part; ``solve`` and the other keywords reach the groups
        that take them."""
        return super().solvePVec(x, regul, solve, damping, **kwargs)

    def solvePFMap(self, x, regul=1e-8, solve="default", damping=None, **kwargs):
        """``(M + Λ)⁻¹`` applied to every row of the PFMap, group by group (see
        `solvePVec`)."""
        return super().solvePFMap(x, regul, solve, damping, **kwargs)

    def inverse(self, regul=1e-8, damping=None, **kwargs):
        """Each group's inverse (a PMatMixed of them)."""
        return super()._inverse_impl(regul, damping, **kwargs)

    def pow(self, x, regul=0.0, damping=None, **kwargs):
        """Each group's ``pow(x)`` (a PMatMixed of them)."""
        return super().pow(x, regul, damping, **kwargs)

    def logdet(self, regul=0.0, damping=None, **kwargs):
        """``Σ_g log det(M_g + Λ_g)``."""
        return super().logdet(regul, damping, **kwargs)

    def eigenvalues(self, regul=0.0, damping=None, **kwargs):
        """The ``P`` eigenvalues of ``M + Λ``: the union of the groups' (in no particular
        order)."""
        return super().eigenvalues(regul, damping, **kwargs)

    def diag_of_inverse(self, regul=1e-8, damping=None, **kwargs):
        """``diag((M + Λ)⁻¹)`` group by group (``M + Λ`` is block-diagonal over the groups),
        from each group's own ``diag_of_inverse`` (which need not form the inverse)."""
        regul, blocks, dampings = self._dampings(regul, "diag_of_inverse", damping, **kwargs)
        return self._join([call_group(b.matrix.diag_of_inverse, d) for b, d in zip(blocks, dampings)])

    def pinv(self, atol=1e-8, **kwargs):
        """Pseudo-inverse group by group (block-diagonal across groups, so exact for this
        matrix): each group's ``pinv(atol)``."""
        return self._new({g: m.pinv(atol=atol, **accepted(m.pinv, kwargs))
                          for g, m in self.data.items()})

    # ------------------------------------------------------------------ reductions
    def to_torch(self):
        """Dense ``(P, P)``: each group's block at its layers' positions, zeros elsewhere
        (refused with a MemoryError naming the size when it can't fit)."""
        _checks.check_dense_fits(self.layer_collection.numel(), self.dtype.itemsize,
                                 what="PMatMixed.to_torch(): a dense")
        out = None
        for g, m in self.data.items():
            B = m.to_torch()
            if out is None:
                P = self.layer_collection.numel()
                out = torch.zeros(P, P, dtype=B.dtype, device=B.device)
            idx = self._index[g].to(B.device)
            out[idx.unsqueeze(1), idx.unsqueeze(0)] = B
        return out

    @property
    def dtype(self):
        return next(iter(self.data.values())).dtype
