"""Objects of the parameter and function spaces."""
from .pspace import *  # noqa: F401,F403
from .pspace import __all__ as _pspace_all
from .vector import FVector, PVector, random_fvector, random_pvector, random_pvector_dict
from .map import PFMap, PFMapDense, PFMapImplicit, random_pfmap
from .fspace import FMatDense

__all__ = list(_pspace_all) + ["FVector", "PVector", "random_fvector", "random_pvector",
                               "random_pvector_dict", "PFMap", "PFMapDense", "PFMapImplicit",
                               "random_pfmap", "FMatDense"]
