"""``PMatKFAC``: block-diagonal over layers, each block a Kronecker product of two small factors
(Martens & Grosse 2015; convolutions: Grosse & Martens 2016)."""
import inspect

import torch

from . import _checks
from ._statistics import check_layers
from ...layer_types.base import check_kfac_support
from .abstract import PMatAbstract
from .blocks import KronBlock, kron
from .blocks.kron import LAZY_INVERSE_WIDTH, PiDamping  # noqa: F401  (kept importable here)
from .ekfac import PMatEKFAC
from ..vector import PVector

_DAMPINGS = ("pi", "exact")


class PMatKFAC(kron.KronBlocksInLayout, PMatAbstract):
    """KFAC: per layer, ``M_layer ≈ kron(G, A)`` in the layer's Kronecker layout.

    ``kron(G, A)`` approximates the layer's block of ``(1/n) Σ_x J(x)ᵀ J(x)`` (exact for a Linear
    layer on a single example). Built from examples, with ``K`` the function's number of output
    directions (``C - 1`` for the closed-form ``classif_logits`` Fisher, ``C`` for
    ``regression``, 1 for ``classif_binary_logits``, ``trials`` for Monte-Carlo):

    * ``A = √K · (1/n) Σ_x a aᵀ`` (size ``dA``): the inputs' second moment, with a trailing 1
      when the layer has a bias;
    * ``G = (1/√K) · (1/n) Σ_x Σ_k g_k g_kᵀ`` (size ``dG``): the output gradients' second
      moment, summed over the ``K`` directions.

    The ``√K`` moved from ``G`` to ``A`` leaves ``kron(G, A)`` unchanged; it is upstream
    nngeometry's split of the scale, kept so that code reading ``.data`` or damping with
    ``use_pi=False`` gets the same numbers (π-damping does not depend on the split). For a Linear layer the Kronecker layout is the row-major
    ``[W | b]`` of shape ``(out, in + 1)``; each layer type maps it to the flat layout with
    ``kfac_permutation()``. Off-diagonal (cross-layer) blocks are zero.

    Args:
        layer_collection: the layers (every layer type must support KFAC).
        generator: a Jacobian generator (e.g. ``TorchHooksJacobianBackend``).
        data: ``{layer_id: (A, G)}``; either factor may be a 1-D tensor standing for a diagonal
            matrix (e.g. an Embedding's input factor), which is never densified. A layer with
            several Kronecker blocks (e.g. MultiheadAttention: input and output projections, see
            ``AbstractLayer.kfac_factors``) has the tuple ``((A_0, G_0), (A_1, G_1), ...)``: its
            block is ``block_diag(kron(G_0, A_0), kron(G_1, A_1), ...)`` in its Kronecker layout
            (the concatenation of the blocks' layouts), and every operation works per block.
        examples: a DataLoader or a single mini-batch, used with ``generator`` when ``data`` is
            None.
        kfac_approx: ``'expand'`` (default) or ``'reduce'`` for layers with weight sharing
            (convolutions, Linear layers on ``(n, T, d)`` sequences, attention projections),
            Eschenhagen et al. 2023. ``'expand'``: the ``S`` shared positions act like examples
            in ``A``, and ``G`` sums over them divided by ``S``. ``'reduce'``:
            ``A = √K · (1/n) Σ_i ā_i ā_iᵀ`` with ``ā_i`` example ``i``'s (bias-augmented) input
            averaged over its positions, ``G = (1/√K) · (1/n) Σ_i Σ_k ĝ_{i,k} ĝ_{i,k}ᵀ`` with
            ``ĝ_{i,k}`` its output gradient summed over them. Both are exact for ``S = 1``.
        separate_weight_and_bias: False (default): one Kronecker block per layer for the joint
            ``[W | b]``. True: the weight and the bias factored separately, no cross terms
            (curvlinops' default and laplace-torch's layout): the weight block ``G ⊗ A_ww``
            (``A`` without its last row and column) and the bias block ``G · A_bb`` (the bias
            entry of ``A``), both exact parts of the joint factors. Stored in the same layout as
            ``A`` with its last row and column zeroed off the diagonal (see
            ``kron.separate_weight_and_bias``); applies to the layers whose bias is the last
            column of the Kronecker layout (Linear, convolutions), others are unchanged.

    Damping (``solve``, ``inverse``, ``pow``, ``logdet``) takes ``damping='pi'`` or
    ``damping='exact'``:

    * ``'pi'`` (default for ``solve``/``inverse``/``pow``): Tikhonov damping split over the factors
      with π-damping, ``(A + π√λ I) ⊗ (G + (√λ/π) I)``, ``π = sqrt((tr A/dA)/(tr G/dG))``
      (``use_pi=False``: π = 1). Stays a PMatKFAC. This is *not* ``M + λI``.
    * ``'exact'`` (default for ``logdet``): ``M + λI`` exactly, through the eigendecompositions
      ``A = U_A Λ_A U_Aᵀ``, ``G = U_G Λ_G U_Gᵀ``: ``(M + λI)⁻¹ = U (Λ_G ⊗ Λ_A + λ)⁻¹ Uᵀ`` with
      ``U = U_G ⊗ U_A`` (``solve='eigh'`` is an alias). ``inverse``/``pow`` then return a
      [`PMatEKFAC`][nngeometry.object.pspace.PMatEKFAC] (the result is no longer Kronecker).

    The factors' eigendecompositions are computed once and cached, and so are the π-damped
    inverse factors for the last ``(regul, use_pi)``: after the first call, a solve costs about
    one ``mv``. π-damped inverses with ``regul > 0`` go through Cholesky factorizations of the
    damped factors (several times cheaper than eigendecompositions of the large input factors
    of wide convolutions); the eigendecompositions are only computed for exact damping,
    fractional powers, ``logdet`` and undamped inverses. The caches are keyed on the factors
    themselves (tensors and version counters): replacing ``data`` or updating a factor in place
    (``A.mul_(0.9).add_(0.1 * A_new)``) recomputes them. ``mm`` results may have non-symmetric
    factors: use them for products and ``to_torch``, not for damped solves.
    """

    _DAMPINGS = _DAMPINGS
    _DAMPING_OPTIONS = ("use_pi",)

    def __init__(self, layer_collection=None, generator=None, data=None, examples=None,
                 kfac_approx="expand", separate_weight_and_bias=False, **kwargs):
        super().__init__(layer_collection, generator, data=data, examples=examples,
                         kfac_approx=kfac_approx, **kwargs)
        if data is not None:
            # factors given by the caller (those of the engine, `_build`, have this structure
            # by construction; a 0.4 generator's are checked there)
            self._check_data(self.data)
        if separate_weight_and_bias:
            self.data = kron.separate_weight_and_bias(self.layer_collection, self.data)

    statistic = "get_kfac_blocks"

    def _build(self, examples, kfac_approx="expand"):
        if kfac_approx not in ("expand", "reduce"):
            raise ValueError(f"unknown kfac_approx '{kfac_approx}': use 'expand' or 'reduce'")
        check_kfac_support(self.layer_collection, type(self).__name__)
        get = self.generator.get_kfac_blocks
        if "sqrt_k_split" not in inspect.signature(get).parameters:
            # a generator written for nngeometry 0.4: its factors as it splits them
            factors = self._check_data(get(examples, self.layer_collection, approx=kfac_approx))
        else:
            factors = get(examples, self.layer_collection, approx=kfac_approx, sqrt_k_split=True)
        # separate_weight_and_bias is applied by __init__, to built and given data alike
        return self._data_from_statistics(self.layer_collection, factors)

    @classmethod
    def _check_statistics(cls, layer_collection, statistics, separate_weight_and_bias=False):
        check_layers(cls.__name__, layer_collection, statistics, "the Kronecker factors")

    @classmethod
    def _data_from_statistics(cls, layer_collection, statistics, separate_weight_and_bias=False):
        """``statistics``: ``{layer_id: (A, G)}`` (a tuple of pairs for a multi-block layer),
        the factors of ``get_kfac_blocks``; with ``separate_weight_and_bias=True`` the weight
        and bias are factored separately (see the class docstring). Their structure is checked
        by the constructor (``_check_data``)."""
        if separate_weight_and_bias:
            return kron.separate_weight_and_bias(layer_collection, statistics)
        return statistics

    def _check_data(self, data):
        """``data`` (``{layer_id: (A, G)}``, see the class) after refusing a wrong structure."""
        ids = self.layer_collection.layer_ids()
        if set(data) != set(ids):
            raise ValueError(f"PMatKFAC data must have one (A, G) per layer {ids}, got {list(data)}")
        for lid, e in data.items():
            layer = kron.KronLayer.of(e)
            for key, term in zip(layer.units(lid), layer.terms):
                where = key.describe(len(layer.terms))
                if len(term) != 2:
                    raise ValueError(f"{where}: expected a pair (A, G), got {len(term)} items")
                for name, F in zip(("A", "G"), term):
                    if F.dim() not in (1, 2) or (F.dim() == 2 and F.shape[0] != F.shape[1]):
                        raise ValueError(f"factor {name} of {where} must be square or 1-D "
                                         f"(diagonal), got shape {tuple(F.shape)}")
        return data

    @property
    def _layout(self):
        lay = self.__dict__.get("_layout_obj")
        if lay is None:
            dims = {}
            for lid, e in self.data.items():
                layer = kron.KronLayer.of(e)
                sizes = [(kron.factor_size(G), kron.factor_size(A)) for A, G in layer.terms]
                dims[lid] = sizes if layer.multi else sizes[0]
            perms = {lid: l.kfac_permutation() for lid, l in self.layer_collection.layers.items()}
            lay = self._layout_obj = kron.Layout(self.layer_collection, dims, perms)
        return lay

    def _units(self):
        """``(Unit, A, G)`` for every Kronecker term (one per layer, several for a multi-block
        layer)."""
        return [(key, A, G) for key, (A, G) in kron.iter_units(self.data)]

    def _map_units(self, fn):
        """A data dict of the same structure with each term's ``(A, G)`` replaced by
        ``fn(key, A, G)``."""
        return kron.repack(self.data, {key: fn(key, A, G) for key, A, G in self._units()})

    @property
    def dtype(self):
        return self._units()[0][2].dtype

    # ------------------------------------------------------------------ the container
    # one KronBlock per Kronecker unit (a layer, or each term of a multi-block layer), in the
    # layer's Kronecker layout. The blocks are kept while ``data`` is unchanged (the same
    # tensors, no in-place change), so the caches they own (the factors' eigendecompositions,
    # the π-damped inverse factors) are computed once; every operation is the base class's,
    # from the blocks' primitives, π-damping included (`PiDamping`)
    _flat_layouts = False
    _per_entry_exact = False

    def _blocks(self):
        return _checks.cached(self.__dict__, "_blocks_cache", "blocks", self._make_blocks,
                              self.data)

    def _make_blocks(self):
        out = []
        for lid, (*_, units) in self._layout.entries.items():
            entry = self.data[lid]
            for (key, *_), (A, G) in zip(units, entry if len(units) > 1 else (entry,)):
                name = f"layer '{lid}'" + (f" (block {key.index})" if len(units) > 1 else "")
                out.append(KronBlock(A, G, name=name))
        return out

    _block_damping = PiDamping

    def _from_blocks(self, blocks):
        """Kronecker blocks stay a PMatKFAC; exactly damped ones (eigen-Kronecker) are a
        PMatEKFAC on the factors' eigenbases."""
        keys = self._block_keys()
        if all(isinstance(b, KronBlock) for b in blocks):
            return PMatKFAC(self.layer_collection, None, data=kron.repack(
                self.data, {k: (b.A, b.G) for k, b in zip(keys, blocks)}))
        eig = [b.eigen() if isinstance(b, KronBlock) else b for b in blocks]
        return PMatEKFAC(self.layer_collection, None, data=kron.repack(
            self.data, {k: b.as_entry() for k, b in zip(keys, eig)}))

    def _like(self):
        return self._units()[0][2]

    def _block_of(self, key):
        return self._blocks()[self._block_keys().index(key)]

    def _eigen_block(self, key):
        """The unit's ``A ⊗ G`` as an `EigenKronBlock` (its block's cached factor
        eigendecompositions)."""
        return self._block_of(key).eigen()

    def compute_eigendecomposition(self, impl="eigh"):
        """Compute (again) and cache the factors' eigendecompositions ``A = U_A Λ_A U_Aᵀ``,
        ``G = U_G Λ_G U_Gᵀ``, used by `get_eigendecomposition`, exact damping and
        ``logdet``. ``impl='eigh'`` (symmetric eigensolver, eigenvalues ascending) or ``'svd'``
        (singular value decomposition, values descending: the same decomposition for the
        symmetric positive semi-definite factors that KFAC builds)."""
        if impl not in ("eigh", "svd"):
            raise ValueError(f"unknown impl '{impl}' for compute_eigendecomposition: use 'eigh' "
                             "or 'svd'")
        eig = kron.eig if impl == "eigh" else kron.eig_svd
        for b in self._blocks():
            b.set_factor_eig((eig(b.A), eig(b.G)))

    def kronecker_eigenbases(self):
        """``{layer_id: (U_A, U_G)}`` (a tuple of pairs for a multi-block layer): the
        eigenbases of the factors, what `PMatEKFAC` takes as ``eigendecomposition=``."""
        eig = [b.factor_eig() for b in self._blocks()]
        return kron.repack(self.data, {key: (eA[1], eG[1])
                                    for key, (eA, eG) in zip(self._block_keys(), eig)})

    def get_eigendecomposition(self):
        """``(evals, evecs)``: ``evals[layer_id] = (λ_A, λ_G)`` (1-D) and
        ``evecs[layer_id] = (U_A, U_G)`` (eigenvectors as columns) of the layer's factors, so
        that the layer's eigenvectors are ``U_G[:, p] ⊗ U_A[:, q]`` with eigenvalue
        ``λ_G[p] λ_A[q]``. Computed on first use (or by `compute_eigendecomposition`) and
        cached. A diagonal factor's basis is the int size of its identity; a multi-block layer
        gets a tuple of pairs, one per Kronecker block."""
        eig = dict(zip(self._block_keys(), (b.factor_eig() for b in self._blocks())))
        evals = kron.repack(self.data, {k: (eA[0], eG[0]) for k, (eA, eG) in eig.items()})
        evecs = kron.repack(self.data, {k: (eA[1], eG[1]) for k, (eA, eG) in eig.items()})
        return evals, evecs

    # ------------------------------------------------------------------ products
    def mv(self, vs):
        """``M v`` for a PVector ``vs``: per layer ``G V Aᵀ`` on the reshaped vector."""
        if isinstance(vs, PVector) and (vs.layer_collection is self.layer_collection
                                        or vs.layer_collection == self.layer_collection):
            blocks = self._blocks()
            out = self._layout.kron_mv([(b.right_factor(), b.G) for b in blocks], vs)
            if out is not None:
                return PVector(self.layer_collection, vector_repr=out)
        return super().mv(vs)

    def vTMv(self, vector):
        """``vᵀ M v`` (a scalar tensor) for a PVector ``vector``."""
        return super().vTMv(vector)

    def mm(self, other):
        """``M₁ M₂`` for another PMatKFAC: per layer ``(G₁G₂) ⊗ (A₁A₂)``."""
        self._check_same_kind(other)

        def prod(key, A, G):
            A2, G2 = kron.get_unit(other.data, key)
            return (kron.fmatmul(A, A2), kron.fmatmul(G, G2))

        return PMatKFAC(self.layer_collection, None, data=self._map_units(prod))

    # ------------------------------------------------------------------ solves and functions
    # (the base class's, from the blocks; these keep upstream's keywords and KFAC's defaults:
    # π-damping for solve / inverse / pow, exact damping for logdet)
    # solve='eigh' stands for exact damping
    _SOLVE_METHODS = {"default": (None, None), "solve": (None, None), "eigh": ("exact", None)}

    def solvePVec(self, x, regul=1e-8, solve="default", use_pi=True, damping="pi"):
        """Solve with damping ``regul``: π-damped factors (``damping='pi'``, default;
        ``use_pi=False`` for π = 1) or ``(M + regul·I)⁻¹ x`` exactly (``damping='exact'``).
        π-damping differs from exact: it inverts ``(A + π√λ I) ⊗ (G + √λ/π I) = A ⊗ G + λI +
        √λ (π I ⊗ G + A ⊗ I / π)``, ``M + λI`` plus that last term (cheaper: no
        eigendecomposition). ``regul``: a scalar ``λ`` or a per-layer dict ``{layer_id: λ_l}``
        (layers left out: 0; π-damping then uses each layer's ``λ_l``), also a PMatEye; a
        per-parameter ``Λ`` raises ``NotImplementedError``."""
        return super().solvePVec(x, regul, solve, damping, use_pi=use_pi)

    def solvePFMap(self, x, regul=1e-8, solve="default", use_pi=True, damping="pi"):
        """[`solvePVec`][nngeometry.object.pspace.abstract.PMatAbstract.solvePVec] applied to every row of a PFMap."""
        return super().solvePFMap(x, regul, solve, damping, use_pi=use_pi)

    def inverse(self, regul=1e-8, use_pi=True, damping="pi"):
        """``damping='pi'`` (default): the PMatKFAC with factors ``(A + π√λ I)⁻¹``,
        ``(G + √λ/π I)⁻¹`` (not ``(M + λI)⁻¹``: see [`solvePVec`][nngeometry.object.pspace.abstract.PMatAbstract.solvePVec]); ``damping='exact'``:
        ``(M + Λ)⁻¹`` as a PMatEKFAC (``regul`` a scalar or a per-layer dict)."""
        return super()._inverse_impl(regul, damping, use_pi=use_pi)

    def inv(self, regul=1e-8, use_pi=True, damping="pi"):
        """Alias of [`inverse`][nngeometry.object.pspace.abstract.PMatAbstract.inverse]."""
        return self._inverse_impl(regul=regul, use_pi=use_pi, damping=damping)

    def pow(self, pow, regul=0.0, use_pi=True, damping="pi"):
        """``damping='pi'``: PMatKFAC with π-damped factors to the power ``pow`` (for
        ``regul=0``, exactly ``M^pow``); ``damping='exact'``: ``(M + regul·I)^pow`` as a
        PMatEKFAC. Negative eigenvalues (round-off) are clipped to 0 for fractional ``pow``."""
        return super().pow(pow, regul, damping, use_pi=use_pi)

    def logdet(self, regul=0.0, damping="exact", use_pi=True):
        """``log det(M + regul·I) = Σ log(λ_G,i λ_A,j + regul)`` (``damping='exact'``, default),
        or the log-determinant of the π-damped Kronecker product (``damping='pi'``)."""
        return super().logdet(regul, damping, use_pi=use_pi)

    # ------------------------------------------------------------------ reductions
    def get_diag(self, split_weight_bias=True):
        """Diagonal ``(P,)``: per layer ``diag(G) ⊗ diag(A)``; in the flat layout
        (``split_weight_bias=True``) or each layer's Kronecker layout (False)."""
        if split_weight_bias:
            # written in place into the flat vector where the layout allows (no reordering copy)
            return self._layout.outer_diag_flat(
                {lid: [(kron.factor_diag(A), kron.factor_diag(G)) for A, G in kron.KronLayer.of(e).terms]
                 for lid, e in self.data.items()})
        return torch.cat([b.diag().reshape(-1) for b in self._blocks()])

    def get_block_torch(self, layer_id, layer=None, split_weight_bias=True):
        """The dense ``(p_l, p_l)`` block of layer ``layer_id``, in the flat order
        (``split_weight_bias=True``) or the Kronecker order of ``kron(G, A)`` (False; for a
        multi-block layer the block-diagonal of its blocks' Kronecker products). ``layer`` is
        accepted for compatibility and not needed (the collection knows the layer)."""
        if layer_id not in self.data:
            raise KeyError(f"no layer '{layer_id}' in this matrix; its layers are "
                           f"{self.layer_collection.layer_ids()}")
        _checks.check_dense_fits(self.layer_collection[layer_id].numel(),
                                 self._units()[0][2].element_size(),
                                 what=f"the KFAC block of layer '{layer_id}': a dense")
        block = torch.block_diag(*[b.dense() for k, b in zip(self._block_keys(), self._blocks())
                                   if k.layer == layer_id])
        return self._layout.to_flat_order(layer_id, block, both=True) if split_weight_bias \
            else block

    def to_torch(self, split_weight_bias=True):
        """The dense ``(P, P)`` matrix: layers at their flat positions; inside a layer the flat
        order (``split_weight_bias=True``) or the Kronecker order of ``kron(G, A)`` (False; see
        `get_block_torch`)."""
        P = self.layer_collection.numel()
        G0 = self._units()[0][2]
        _checks.check_dense_fits(P, G0.element_size(), what="PMatKFAC.to_torch(): a dense")
        out = torch.zeros(P, P, dtype=G0.dtype, device=G0.device)
        for lid in self.data:
            s = self.layer_collection.slice(lid)
            out[s, s] = self.get_block_torch(lid, split_weight_bias=split_weight_bias)
        return out

    # ------------------------------------------------------------------ arithmetic
    def factor_average(self, other, weight=1.0, other_weight=1.0):
        """The KFAC approximation of ``weight·self + other_weight·other`` that running averages
        and online EWC use: factor by factor (each Kronecker term of each layer),
        ``Ā = (w₁A₁ + w₂A₂)/(w₁ + w₂)`` and ``Ḡ = w₁G₁ + w₂G₂``, so the matrix is ``Ā ⊗ Ḡ``.
        Exact when the two matrices share either factor (up to scale: e.g. the same inputs);
        otherwise an approximation of the sum, which is not a Kronecker product (``+`` refuses
        it). With ``w₁ + w₂ = 1`` it is the exponential moving average of both factors."""
        self._check_same_kind(other)
        w1, w2 = float(weight), float(other_weight)
        if w1 + w2 <= 0:
            raise ValueError(f"factor_average needs weights with a positive sum, got {w1}, {w2}")

        def average(key, A1, G1):
            A2, G2 = kron.get_unit(other.data, key)
            return ((w1 * A1 + w2 * A2) / (w1 + w2), w1 * G1 + w2 * G2)

        return PMatKFAC(self.layer_collection, None, data=self._map_units(average))

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_layout_obj", None)
        state.pop("_blocks_cache", None)  # the blocks and their caches: recomputable
        return state
