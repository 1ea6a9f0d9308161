"""Per-layer blocks: each block type, one file, implements the same few primitives once, on
batches of vectors in its layout (see ``base.Block``): ``apply``, ``quadratic``, ``solve``,
``matpower(p, damping)``, ``eigenvalues``, ``diag``, ``dense``, ``trace``, ``frobenius_sq``,
``logdet(damping)``, ``scaled``, ``add``. The representations are containers of blocks and write
each operation once from them (see ``abstract.PMatAbstract``).

* `DenseBlock`: a dense symmetric block (PMatDense, PMatBlockDiag);
* `DiagBlock`: a diagonal (PMatDiag);
* `ScaledIdentityBlock`: ``s·I`` (PMatEye);
* `KronBlock`: ``A ⊗ G``, factors possibly diagonal (PMatKFAC);
* `EigenKronBlock`: ``(U_G ⊗ U_A) diag(D) (U_G ⊗ U_A)ᵀ`` (PMatEKFAC, exactly damped KFAC);
* `QuasiDiagBlock` / `ArrowInverseBlock`: per-unit arrowheads and their inverses
  (PMatQuasiDiag, PMatQuasiDiagInverse), and `DiagPlusRankOneBlock`, a damped inverse;
* `LowRankBlock`: ``diag(α) + Jᵀ C J`` (PMatLowRank, PMatEyePlusLowRank);
* `representation.RepresentationBlock`: a whole representation on a group of layers
  (PMatMixed); not imported here, since it is built on the representations (it adds a
  `PMatEye`), which import this package.
"""
from .base import Block
from .dense import DenseBlock
from .diag import DiagBlock
from .eigen_kron import EigenKronBlock
from .identity import ScaledIdentityBlock
from .kron import KronBlock
from .lowrank import LowRankBlock
from .quasidiag import ArrowInverseBlock, DiagPlusRankOneBlock, QuasiDiagBlock

__all__ = ["Block", "DenseBlock", "DiagBlock", "EigenKronBlock", "ScaledIdentityBlock",
           "KronBlock", "LowRankBlock", "QuasiDiagBlock", "ArrowInverseBlock",
           "DiagPlusRankOneBlock"]
