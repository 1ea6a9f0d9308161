"""Bottom-layer linear algebra: Kronecker products and Gram-matrix accumulation
(`nngeometry.maths.gram_accumulator`). Nothing here knows about models or representations."""
import torch


def kronecker(A, B, transpose=False):
    """The Kronecker product ``A ⊗ B`` of two matrices.

    For ``A`` of shape ``(a0, a1)`` and ``B`` of shape ``(b0, b1)``, returns the
    ``(a0·b0, a1·b1)`` matrix whose block ``(i, j)`` (of shape ``(b0, b1)``) is ``A[i, j] · B``,
    i.e. entry ``[i·b0 + k, j·b1 + l] = A[i, j] B[k, l]`` (the same as ``torch.kron``).

    ``transpose=True`` returns ``(A ⊗ B)ᵀ = Aᵀ ⊗ Bᵀ``, shape ``(a1·b1, a0·b0)``.
    """
    if A.dim() != 2 or B.dim() != 2:
        raise ValueError(f"kronecker expects two matrices, got shapes {tuple(A.shape)} and "
                         f"{tuple(B.shape)}: reshape vectors to (d, 1) or (1, d)")
    if transpose:
        A, B = A.t(), B.t()
    return torch.kron(A, B)


__all__ = ["kronecker"]
