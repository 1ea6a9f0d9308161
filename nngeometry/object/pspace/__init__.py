"""Parameter-space matrix representations: one module per representation."""
from .abstract import PMatAbstract, bdot
from .dense import PMatDense
from .eye import PMatEye
from .diag import PMatDiag
from .blockdiag import PMatBlockDiag
from .quasidiag import PMatQuasiDiag, PMatQuasiDiagInverse
from .lowrank import PMatLowRank, PMatEyePlusLowRank
from .implicit import PMatImplicit
from .kfac import PMatKFAC
from .ekfac import PMatEKFAC
from .ekfac_blockdiag import PMatEKFACBlockDiag
from .mixed import PMatMixed

__all__ = ["PMatAbstract", "bdot", "PMatDense", "PMatEye", "PMatDiag", "PMatBlockDiag", "PMatQuasiDiag",
           "PMatQuasiDiagInverse", "PMatLowRank", "PMatEyePlusLowRank", "PMatImplicit",
           "PMatKFAC", "PMatEKFAC", "PMatEKFACBlockDiag", "PMatMixed"]
