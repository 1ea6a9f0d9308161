"""Per-layer Kronecker algebra shared by the KFAC and EKFAC representations.

Conventions (see CONVENTIONS.md, "KFAC and EKFAC"): a layer's block is ``kron(G, A)`` in the
*Kronecker layout*, where a flat vector of the layer reshaped row-major to ``(dG, dA)`` is the
matrix ``V`` (e.g. ``[W | b]`` for a Linear layer), so that ``kron(G, A) vec(V) = vec(G V Aᵀ)``.
The layer type's ``kfac_permutation()`` maps the flat layout to that layout: flat coordinate
``i`` is Kronecker coordinate ``perm[i]``.

A factor is a 2-D tensor, or a 1-D tensor standing for a diagonal matrix (never densified here).
An eigenbasis is a 2-D orthogonal tensor (eigenvectors as columns), or an ``int`` ``d`` standing
for the identity of size ``d`` (the eigenbasis of a diagonal factor).
"""
import torch


# ---------------------------------------------------------------------- factors
def fdim(F):
    """Size of a factor or eigenbasis (tensor 1-D / 2-D, or int for an identity basis)."""
    return int(F) if isinstance(F, int) else F.shape[0]


def left(G, V):
    """``G V`` for ``V`` of shape ``(..., dG, dA)``."""
    if G.dim() == 1:
        return G.unsqueeze(-1) * V
    return G @ V


def right(V, A):
    """``V Aᵀ`` for ``V`` of shape ``(..., dG, dA)`` (``Aᵀ = A`` for symmetric factors)."""
    if A.dim() == 1:
        return V * A
    return V @ A.mT


def kron_apply(A, G, V):
    """``kron(G, A)`` applied to ``V`` in the Kronecker layout: ``G V Aᵀ``."""
    return right(left(G, V), A)


def dense(F):
    return torch.diag(F) if F.dim() == 1 else F


def fdiag(F):
    return F if F.dim() == 1 else torch.diagonal(F)


def ftrace(F):
    return F.sum() if F.dim() == 1 else torch.trace(F)


def fnorm(F):
    return torch.linalg.vector_norm(F) if F.dim() == 1 else torch.linalg.matrix_norm(F)


def fmatmul(F1, F2):
    """``F1 F2`` keeping diagonal factors diagonal where both are."""
    if F1.dim() == 1 and F2.dim() == 1:
        return F1 * F2
    if F1.dim() == 1:
        return F1.unsqueeze(1) * F2
    if F2.dim() == 1:
        return F1 * F2
    return F1 @ F2


def eig(F):
    """``(evals, basis)`` of a symmetric factor; a diagonal factor's basis is the int identity."""
    if F.dim() == 1:
        return F, F.shape[0]
    return torch.linalg.eigh(F)


def from_eig(evals, U):
    """The factor ``U diag(evals) Uᵀ`` (1-D when ``U`` is the int identity)."""
    if isinstance(U, int):
        return evals
    return (U * evals) @ U.t()


def pi_damping(A, G, use_pi=True):
    """π of Martens & Grosse (2015): ``sqrt((tr A / dim A) / (tr G / dim G))``, 1 when
    ``use_pi`` is False or the ratio is not a positive finite number."""
    if not use_pi:
        return 1.0
    tA = float(ftrace(A)) / fdim(A)
    tG = float(ftrace(G)) / fdim(G)
    if tA > 0 and tG > 0 and tA < float("inf") and tG < float("inf"):
        return (tA / tG) ** 0.5
    return 1.0


def proportional(X, Y, tol):
    """``c`` with ``Y = c X`` (within ``tol`` relative), or None."""
    if X.dim() != Y.dim() or X.shape != Y.shape:
        return None
    xx = (X * X).sum()
    if xx == 0:
        return 0.0 if (Y * Y).sum() == 0 else None
    c = (X * Y).sum() / xx
    if torch.linalg.vector_norm(Y - c * X) <= tol * max(float(torch.linalg.vector_norm(Y)), 1e-300):
        return c
    return None


# ---------------------------------------------------------------------- eigenbases
def to_kfe(V, UA, UG):
    """Coordinates of ``V`` (``(..., dG, dA)``) in the eigenbasis ``kron(U_G, U_A)``:
    ``U_Gᵀ V U_A``."""
    if not isinstance(UA, int):
        V = V @ UA
    if not isinstance(UG, int):
        V = UG.t() @ V
    return V


def from_kfe(W, UA, UG):
    """Inverse of :func:`to_kfe`: ``U_G W U_Aᵀ``."""
    if not isinstance(UA, int):
        W = W @ UA.t()
    if not isinstance(UG, int):
        W = UG @ W
    return W


def dense_basis(U, like):
    if isinstance(U, int):
        return torch.eye(U, dtype=like.dtype, device=like.device)
    return U


# ---------------------------------------------------------------------- layouts
class Layout:
    """Where each layer sits in the flat vector and how to reach its Kronecker layout.

    ``entries[lid] = (start, end, perm, inv, dG, dA)`` with ``perm`` flat -> Kronecker and
    ``inv`` its inverse (Kronecker -> flat), so ``kron_vec = flat[inv]`` and ``flat = kron_vec[perm]``.
    """

    def __init__(self, layer_collection, dims, perms):
        self.entries = {}
        for lid, layer in layer_collection.layers.items():
            dG, dA = dims[lid]
            start = layer_collection.p_pos[lid]
            numel = layer.numel()
            if dG * dA != numel:
                raise ValueError(
                    f"layer '{lid}' has {numel} parameters but its Kronecker factors have sizes "
                    f"G: {dG}, A: {dA} (product {dG * dA}); the factors do not match the layer")
            perm = perms[lid]
            inv = torch.empty_like(perm)
            inv[perm] = torch.arange(perm.numel())
            self.entries[lid] = (start, start + numel, perm, inv, dG, dA)

    def _on(self, lid, which, device):
        """``perm`` (which=2) or ``inv`` (which=3) of a layer on ``device``, copied once."""
        key = (lid, which, str(device))
        t = self._moved.get(key)
        if t is None:
            t = self._moved[key] = self.entries[lid][which].to(device)
        return t

    @property
    def _moved(self):
        if "_moved_cache" not in self.__dict__:
            self._moved_cache = {}
        return self._moved_cache

    def split(self, flat):
        """``{lid: (..., dG, dA)}`` from a flat ``(..., P)`` tensor."""
        out = {}
        for lid, (s, e, perm, inv, dG, dA) in self.entries.items():
            out[lid] = flat[..., s:e][..., self._on(lid, 3, flat.device)].reshape(
                *flat.shape[:-1], dG, dA)
        return out

    def join(self, parts):
        """Flat ``(..., P)`` from ``{lid: (..., dG, dA)}`` (layers in layout order)."""
        flats = []
        for lid, (s, e, perm, inv, dG, dA) in self.entries.items():
            V = parts[lid]
            flats.append(V.reshape(*V.shape[:-2], dG * dA)[..., self._on(lid, 2, V.device)])
        return flats[0] if len(flats) == 1 else torch.cat(flats, dim=-1)

    def to_flat_order(self, lid, vec_or_mat, both=False):
        """Re-index a Kronecker-ordered vector (or the rows, and with ``both`` the columns, of a
        matrix) of layer ``lid`` to the flat order."""
        perm = self._on(lid, 2, vec_or_mat.device)
        out = vec_or_mat[perm]
        return out[:, perm] if both else out
