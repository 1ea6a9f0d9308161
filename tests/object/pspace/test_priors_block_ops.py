"""Operations written once in the base class from the blocks' primitives, for every
representation that is a container of blocks, against torch.linalg on the dense ``M + Λ``
(float64), for every kind of ``Λ``: ``diag_of_inverse`` (``diag((M + Λ)⁻¹)``, the marginal
variances of a Laplace posterior; with its gradient w.r.t. ``Λ``) and ``eigenvalues``. The other
representations say they don't have them."""
import pytest
import torch

from test_priors_exact import KINDS, built, close, dense, make_prior, refused

DT = torch.float64
CONTAINERS = ["PMatDense", "PMatBlockDiag", "PMatDiag", "PMatQuasiDiag", "PMatEye",
              "PMatKFAC", "PMatEKFAC", "PMatEKFACBlockDiag", "PMatMixed", "PMatMixed-diag",
              "PMatLowRank"]
MATRIX_FREE = ["PMatImplicit"]

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [(rep, kind) for rep in CONTAINERS for kind in KINDS]


@pytest.mark.parametrize("rep,kind", CASES, ids=[f"{r}-{k}" for r, k in CASES])
def test_diag_of_inverse_and_eigenvalues_against_dense(rep, kind):
    M = built(rep)
    regul, lam, _ = make_prior(kind, M.layer_collection)
    if rep == "PMatLowRank" and kind not in ("float", "tensor0d", "eye"):
        # a low-rank matrix plus a diagonal: diag of the inverse by Woodbury; its eigenvalues
        # need the dense matrix
        close(M.diag_of_inverse(regul=regul), torch.diagonal(torch.linalg.inv(
            dense(M) + torch.diag(lam))), what="diag_of_inverse")
        return
    if refused(rep, kind):  # a per-parameter Λ on Kronecker blocks: no exact form
        for call in (M.diag_of_inverse, M.eigenvalues):
            with pytest.raises(NotImplementedError, match="PMatDense.*PMatLowRank"):
                call(regul=regul)
        return
    D = dense(M) + torch.diag(lam)
    Dinv = torch.linalg.inv(D)
    close(M.diag_of_inverse(regul=regul), torch.diagonal(Dinv), what="diag_of_inverse")
    close(torch.sort(M.eigenvalues(regul=regul))[0], torch.linalg.eigvalsh(D), rtol=1e-9,
          what="eigenvalues")


GRAD_CASES = [(rep, kind) for rep in CONTAINERS for kind in KINDS
              if kind != "float" and not refused(rep, kind)]


@pytest.mark.parametrize("rep,kind", GRAD_CASES, ids=[f"{r}-{k}" for r, k in GRAD_CASES])
def test_diag_of_inverse_gradient(rep, kind):
    """``d Σ_p w_p [(M + Λ)⁻¹]_pp / dΛ_qq = -Σ_p w_p [(M + Λ)⁻¹]_pq²``, summed over what each
    leaf covers."""
    M = built(rep)
    lc = M.layer_collection
    _, lam0, _ = make_prior(kind, lc)
    Dinv = torch.linalg.inv(dense(M).detach() + torch.diag(lam0.detach()))
    w = torch.linspace(0.5, 1.5, lc.numel(), dtype=DT)
    per_param = -(w.unsqueeze(1) * Dinv * Dinv).sum(0)
    regul, _, leaves = make_prior(kind, lc, requires_grad=True)
    got = torch.autograd.grad((w * M.diag_of_inverse(regul=regul)).sum(), leaves)
    for i, (g, leaf) in enumerate(zip(got, leaves)):
        if leaf.dim() == 1:
            want = per_param
        elif kind == "layer":
            want = per_param[lc.slice(lc.layer_ids()[i])].sum()
        else:
            want = per_param.sum()
        close(g, want, rtol=1e-7, what="d diag_of_inverse")


@pytest.mark.parametrize("rep", MATRIX_FREE)
def test_matrix_free_block_says_what_to_use(rep):
    """A matrix-free block has no inverse: ``diag_of_inverse`` names the solve instead."""
    M = built(rep)
    with pytest.raises(NotImplementedError, match=r"never stores.*solve\(x, regul\)"):
        M.diag_of_inverse(regul=0.3)
