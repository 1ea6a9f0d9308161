"""Matrix-free analysis of any parameter-space matrix (any ``PMat*``, ``PMatImplicit`` of a
Fisher, GGN or Hessian included, or any object with ``mv`` and a ``layer_collection``): trace and
diagonal estimators with error bars, extreme eigenpairs (block Lanczos), spectral densities
(stochastic Lanczos quadrature). Products with many vectors are batched (one ``mmap``). See
docs/estimators.md for the formulas."""
from .lanczos import Eigenpairs, top_eigenpairs
from .spectral_density import SpectralDensity, log_spectral_density, plot_spectrum, spectral_density
from .trace import Estimate, diag_estimate, trace_estimate

__all__ = ["Eigenpairs", "Estimate", "SpectralDensity", "diag_estimate", "log_spectral_density",
           "plot_spectrum", "spectral_density", "top_eigenpairs", "trace_estimate"]
