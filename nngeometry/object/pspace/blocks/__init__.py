"""Per-layer blocks: each block type, one file, implements the same few primitives once (apply
to a batch of vectors, quadratic forms, ``matpower(p, damping)``, eigenvalues, diagonal, dense,
trace, logdet), and the representations are containers of blocks that write each operation
once from them.

Migrated so far: the eigen-Kronecker block (PMatEKFAC, PMatEKFACBlockDiag's Kronecker layers,
and PMatKFAC's exact damping). See docs/representations.md for what the others still do on
their own."""
from .eigen_kron import EigenKronBlock

__all__ = ["EigenKronBlock"]
