"""Matrix-free analysis of any parameter-space matrix: trace and diagonal estimators with error
bars, top eigenpairs (block Lanczos), spectral densities. See docs/estimators.md."""
from .trace import Estimate, diag_estimate, trace_estimate

__all__ = ["Estimate", "diag_estimate", "trace_estimate"]
