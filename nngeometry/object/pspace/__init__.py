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

# Upstream import paths: re-exports only. Upstream's pspace module exposed these names through
# its own imports, and `from nngeometry.object.pspace import ...` of them keeps working. Nothing
# here uses them (DummyGenerator is the one name under object/ that comes from the engine).
from abc import ABC, abstractmethod  # noqa: E402,F401
from collections import OrderedDict  # noqa: E402,F401
from ...backend.dummy import DummyGenerator  # noqa: E402,F401
from ...maths import kronecker  # noqa: E402,F401
from ..map import PFMap, PFMapDense  # noqa: E402,F401
from ..vector import PVector  # noqa: E402,F401

__all__ = ["PMatAbstract", "bdot", "PMatDense", "PMatEye", "PMatDiag", "PMatBlockDiag", "PMatQuasiDiag",
           "PMatQuasiDiagInverse", "PMatLowRank", "PMatEyePlusLowRank", "PMatImplicit",
           "PMatKFAC", "PMatEKFAC", "PMatEKFACBlockDiag", "PMatMixed"]
