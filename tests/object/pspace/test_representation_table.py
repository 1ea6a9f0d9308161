"""The representation × operation tables of docs/representations.md, checked against the code.

The tables are parsed from the markdown; for every (representation, operation) cell the operation
is run on a tiny float64 model:

* ``yes`` cells must run, return the documented type/shape, and agree with the same operation on
  the representation's own dense matrix ``to_torch()`` (damped operations following the
  representation's documented ``regul`` rule: exact ``(M + λI)⁻¹``, π-damped KFAC factors, CG,
  or per group); restrictions written ``... only`` must hold (the compatible operand works, an
  incompatible one raises ``NotImplementedError``);
* ``no [^note]`` cells must raise ``NotImplementedError`` with a message naming an alternative,
  and the footnote must exist;
* ``—`` cells: the method does not exist;
* the "what it is" column is checked against brute-force dense matrices where it claims an
  equality (``= M``, ``= diag(M)``, ``= blockdiag(M)``, ``= quasidiag(M)``).

So the page cannot drift from the code.
"""
import pickle
import re
from pathlib import Path

import pytest
import torch

import nngeometry.object.pspace as pspace
from nngeometry.object import PFMapDense, PMatDiag, PMatEye, PMatImplicit, PVector

from _table_models import DT, REGUL, built, dense_of

DOC = Path(__file__).resolve().parents[3] / "docs" / "representations.md"

PRODUCT_COLUMNS = ["mv", "vTMv", "mmap", "mapTMmap (sum, diag)", "solvePVec", "solvePFMap", "solve",
                   "inverse / inv", "pow / **", "@"]
OTHER_COLUMNS = ["get_diag", "trace", "frobenius_norm / norm", "to_torch", "size", "mm", "+", "-",
                 "scalar *", "+ PMatEye", "logdet", "pickling", "eigendecomposition"]
PRIOR_COLUMNS = ["`regul`: scalar / PMatEye", "`regul`: per-layer dict", "`regul`: PVector / PMatDiag",
                 "`damping=`", "diag_of_inverse", "eigenvalues"]
INFO_COLUMNS = ["storage (`data`)", "memory", "build (passes over the data)",
                "`regul` in solve / inverse / pow", "what it is"]
ALTERNATIVE = re.compile(r"\b(use|call|instead|convert|multiply|apply|chain|go back|add)\b", re.I)


pytestmark = pytest.mark.usefixtures("one_thread")


# ====================================================================== parsing the page
def _split_row(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def parse_doc(text):
    """``(ops, info, solves, footnotes)``: ``ops[rep][column]`` from the operation tables,
    ``info[rep][column]`` from the per-representation table, ``solves[rep]`` the cell of the
    ``solve=`` table, ``footnotes[name] = text``."""
    ops, info, solves = {}, {}, {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("|"):
            i += 1
            continue
        block = []
        while i < len(lines) and lines[i].startswith("|"):
            block.append(lines[i])
            i += 1
        header = _split_row(block[0])
        target = info if "memory" in header else solves if "`solve=` values" in header else ops
        for line in block[2:]:
            cells = _split_row(line)
            assert len(cells) == len(header), f"row with {len(cells)} cells under {len(header)} columns: {line}"
            rep = cells[0].strip("`")
            target.setdefault(rep, {}).update(dict(zip(header[1:], cells[1:])))
    footnotes = {}
    for m in re.finditer(r"^\[\^([\w-]+)\]:(.*(?:\n    .*)*)", text, re.M):
        footnotes[m.group(1)] = " ".join(m.group(2).split())
    return ops, info, {rep: cols["`solve=` values"] for rep, cols in solves.items()}, footnotes


TEXT = DOC.read_text() if DOC.exists() else ""
OPS, INFO, SOLVES, FOOTNOTES = parse_doc(TEXT)
PUBLIC = sorted(n for n in pspace.__all__ if n.startswith("PMat") and n != "PMatAbstract")
CELLS = [(rep, col) for rep in sorted(OPS)
         for col in PRODUCT_COLUMNS + OTHER_COLUMNS + PRIOR_COLUMNS]


def test_page_covers_every_representation_and_column():
    assert TEXT, f"{DOC} is missing"
    assert sorted(OPS) == PUBLIC, "the operation tables must have one row per public PMat class"
    assert sorted(INFO) == PUBLIC, "the per-representation table must have one row per PMat class"
    assert sorted(SOLVES) == PUBLIC, "the solve= table must have one row per PMat class"
    for rep in PUBLIC:
        assert list(OPS[rep]) == PRODUCT_COLUMNS + OTHER_COLUMNS + PRIOR_COLUMNS, rep
        assert list(INFO[rep]) == INFO_COLUMNS, rep
        for col, cell in INFO[rep].items():
            assert cell, f"empty cell ({rep}, {col})"


# ====================================================================== references
def close(a, b, rtol=1e-9, what=""):
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    assert a.shape == b.shape, f"{what}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
    assert a.dtype == DT, f"{what}: dtype {a.dtype}, expected float64"
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-300)
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:.0e} × {scale:.3e}"


def dense_pow(D, x):
    evals, evecs = torch.linalg.eigh(D)
    if not float(x).is_integer():
        evals = evals.clamp(min=0)
    return (evecs * evals ** x) @ evecs.t()


def _rule(rep):
    cell = INFO[rep]["`regul` in solve / inverse / pow"]
    for rule in ("exact", "π-damped", "CG", "per group", "none"):
        if cell.startswith(rule):
            return rule
    raise AssertionError(f"{rep}: the regul cell must start with exact / π-damped / CG / per "
                         f"group / none, got {cell!r}")


def kfac_pi_dense(M, regul, x):
    """``(A + π√λ I)^x ⊗ (G + √λ/π I)^x`` per layer, in the flat layout, computed here from the
    factors (π of Martens & Grosse)."""
    P = M.layer_collection.numel()
    out = torch.zeros(P, P, dtype=DT)
    s = regul ** 0.5
    for lid, (A, G) in M.data.items():
        A = torch.diag(A) if A.dim() == 1 else A
        G = torch.diag(G) if G.dim() == 1 else G
        pi = ((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])).sqrt()
        Ad = A + pi * s * torch.eye(A.shape[0], dtype=DT)
        Gd = G + s / pi * torch.eye(G.shape[0], dtype=DT)
        block = torch.kron(dense_pow(Gd, x), dense_pow(Ad, x))
        perm = M.layer_collection[lid].kfac_permutation()  # flat i = Kronecker perm[i]
        sl = M.layer_collection.slice(lid)
        out[sl, sl] = block[perm][:, perm]
    return out


def damped_ref(M, D, regul, x=-1.0):
    """``(M + regul)^x`` as the page says the representation damps it (dense)."""
    rule = _rule(type(M).__name__)
    if rule in ("exact", "CG"):
        return dense_pow(D + regul * torch.eye(D.shape[0], dtype=DT), x)
    if rule == "π-damped":
        return kfac_pi_dense(M, regul, x)
    if rule == "per group":
        out = torch.zeros_like(D)
        for g, sub in M.data.items():
            idx = torch.cat([torch.arange(M.layer_collection.slice(lid).start,
                                          M.layer_collection.slice(lid).stop)
                             for lid in M.layer_collection_each[g].layer_ids()])
            out[idx.unsqueeze(1), idx.unsqueeze(0)] = damped_ref(sub, dense_of(sub), regul, x)
        return out
    raise AssertionError(f"{type(M).__name__} has no damped operation (rule {rule!r})")


def _rtol(M):
    return 1e-7 if _rule(type(M).__name__) == "CG" else 1e-8


# ====================================================================== cells
def returned_type(cell, default):
    m = re.match(r"yes → `(PMat\w+)`", cell)
    return m.group(1) if m else default


def check_type(obj, name, what):
    assert type(obj).__name__ == name, f"{what} returned {type(obj).__name__}, the page says {name}"


def expect_not_implemented(fn, cell, what):
    m = re.search(r"\[\^([\w-]+)\]", cell)
    assert m, f"{what}: a 'no' cell needs a footnote saying what to use instead: {cell!r}"
    assert m.group(1) in FOOTNOTES, f"{what}: footnote [^{m.group(1)}] is not defined"
    assert ALTERNATIVE.search(FOOTNOTES[m.group(1)]), f"footnote [^{m.group(1)}] names no alternative"
    with pytest.raises(NotImplementedError) as e:
        fn()
    msg = str(e.value)
    assert msg.strip(), f"{what}: NotImplementedError without a message"
    assert ALTERNATIVE.search(msg), f"{what}: the message names no alternative: {msg!r}"


def _check_pow(b, cell):
    M, D = b.M, b.D
    if cell.startswith("x = ±1 only"):
        close(dense_of(M.pow(1, regul=REGUL)), D + REGUL * torch.eye(b.P, dtype=DT), what="pow(1)")
        close(dense_of(M.pow(-1, regul=REGUL)), damped_ref(M, D, REGUL), rtol=1e-8,
              what="pow(-1)")
        expect_not_implemented(lambda: M.pow(0.5), cell, "pow(0.5)")
        expect_not_implemented(lambda: M ** 2, cell, "** 2")
        return
    R = M.pow(0.5)
    check_type(R, returned_type(cell, b.rep), "pow(0.5)")
    close(dense_of(R), dense_pow(D, 0.5), rtol=1e-7, what="pow(0.5)")
    close(dense_of((M ** 2)), D @ D, what="M ** 2")
    close(dense_of(M.pow(-1, regul=REGUL)), damped_ref(M, D, REGUL), rtol=1e-8, what="pow(-1, λ)")
    close(dense_of(M.pow(0.5, regul=REGUL)), damped_ref(M, D, REGUL, 0.5), rtol=1e-8,
          what="pow(0.5, λ)")
    _check_exact_variant(b, cell, lambda **kw: M.pow(-1, regul=REGUL, **kw), -1.0)


def _check_exact_variant(b, cell, call, x):
    """Cells saying ``damping='exact'`` → T: that variant is ``(M + λI)^x`` exactly, of type T."""
    m = re.search(r"`damping='exact'` → `(PMat\w+)`", cell)
    if m:
        R = call(damping="exact")
        check_type(R, m.group(1), "damping='exact'")
        close(dense_of(R), dense_pow(b.D + REGUL * torch.eye(b.P, dtype=DT), x), rtol=1e-8,
              what="damping='exact'")


def _restricted(cell):
    return cell.startswith("yes") and "only" in cell


def _binary(b, cell, op, dense_op, name):
    """``+``, ``-``, ``mm``: with another matrix of the kind; restricted cells use a compatible
    operand (``M * 0.5``) and check that an incompatible one (other data) is refused."""
    M = b.M
    if _restricted(cell):
        other, Do = M * 0.5, b.D * 0.5
        _refused(lambda: op(M, b.M2), name)
    else:
        other, Do = b.M2, b.D2
    R = op(M, other)
    check_type(R, returned_type(cell, b.rep), name)
    close(dense_of(R), dense_op(b.D, Do), what=name)


def _refused(fn, what):
    with pytest.raises(NotImplementedError) as e:
        fn()
    assert ALTERNATIVE.search(str(e.value)), f"{what}: the message names no alternative"


def _check_eig(b, cell):
    M, D = b.M, b.D
    if cell == "—":
        assert not hasattr(M, "get_eigendecomposition") and not hasattr(M, "get_KFE")
        return
    method = re.search(r"`(\w+)`", cell).group(1)
    E = getattr(M, method)()
    lc = b.lc
    if isinstance(E, tuple) and isinstance(E[0], dict):
        # KFAC: evals[lid] = (λ_A, λ_G), evecs[lid] = (U_A, U_G) of the factors
        evals, evecs = E
        for lid, lams in evals.items():
            for lam, U, F in zip(lams, evecs[lid], M.data[lid]):
                Fd = torch.diag(F) if F.dim() == 1 else F
                Ud = torch.eye(U, dtype=DT) if isinstance(U, int) else U
                close((Ud * lam) @ Ud.t(), Fd, what="factor eigendecomposition")
        return
    if isinstance(E, tuple):  # (evals, evecs as columns), possibly thin
        evals, evecs = E
        close(evecs.t() @ evecs, torch.eye(evecs.shape[1], dtype=DT), what="orthonormal evecs")
        close((evecs * evals) @ evecs.t(), D, what="V Λ Vᵀ")
        return
    for lid, e in E.items():
        sl = lc.slice(lid)
        if method == "get_KFE":  # the basis; the diagonal is the data's D
            U = e
            d = M._entry(lid)[2].reshape(-1)
            close(U.t() @ U, torch.eye(U.shape[0], dtype=DT), what="orthonormal KFE")
            close((U * d) @ U.t(), D[sl, sl], what="U diag(D) Uᵀ")
        else:  # per-layer (evals, evecs) of a block
            lam, U = e
            close((U * lam) @ U.t(), D[sl, sl], what="block eigendecomposition")


def _check_to_torch(b, cell):
    """Shape, dtype, symmetry, and the "what it is" claim against brute force (for
    PMatImplicit, whose cell is "no", on ``to_torch(allow_dense=True)``)."""
    D = dense_of(b.M)
    assert D.shape == (b.P, b.P) and D.dtype == DT
    close(D, D.t(), what="symmetric")
    what = INFO[b.rep]["what it is"]
    B = b.brute
    kept = {"= M": torch.ones_like(B, dtype=torch.bool),
            "= diag(M)": torch.eye(b.P, dtype=torch.bool),
            "= blockdiag(M)": _block_mask(b.lc), "= quasidiag(M)": _quasidiag_mask(b.lc)}
    for claim, mask in kept.items():
        if what == claim or what.startswith(claim + " "):
            close(D, torch.where(mask, B, torch.zeros_like(B)), rtol=1e-10, what=claim)


def _block_mask(lc):
    mask = torch.zeros(lc.numel(), lc.numel(), dtype=torch.bool)
    for lid in lc.layer_ids():
        sl = lc.slice(lid)
        mask[sl, sl] = True
    return mask


def _quasidiag_mask(lc):
    """Diagonal, plus each output unit's weight-bias couplings (layers with a bias)."""
    mask = torch.eye(lc.numel(), dtype=torch.bool)
    for lid, layer in lc.layers.items():
        if layer.bias is None:
            continue
        out, nw, start = layer.weight.size[0], layer.weight.numel(), lc.p_pos[lid]
        for o in range(out):
            w = torch.arange(start + o * nw // out, start + (o + 1) * nw // out)
            mask[w, start + nw + o] = mask[start + nw + o, w] = True
    return mask


def _prior_of(b, col):
    """``(regul, its (P,) diagonal)`` for a prior column, and a second form of the same kind."""
    ids = b.lc.layer_ids()
    g = torch.Generator().manual_seed(11)
    if col.endswith("scalar / PMatEye"):
        return [(0.35, torch.full((b.P,), 0.35, dtype=DT)),
                (PMatEye(b.lc, scaling=torch.tensor(0.35, dtype=DT)),
                 torch.full((b.P,), 0.35, dtype=DT))]
    if col.endswith("per-layer dict"):
        lams = {lid: 0.2 + 0.25 * i for i, lid in enumerate(ids)}
        flat = torch.cat([torch.full((b.lc[lid].numel(),), lams[lid], dtype=DT) for lid in ids])
        return [(lams, flat)]
    d = 0.1 + torch.rand(b.P, generator=g, dtype=DT)
    return [(PVector(b.lc, vector_repr=d), d), (PMatDiag(b.lc, None, data=d), d)]


def _check_damping_cell(b, cell):
    """``damping=``: every value the cell lists is accepted by solve / inverse / pow / logdet
    (``'exact'`` gives the exact result), any other is refused with a ValueError; never a
    TypeError."""
    M, D, v = b.M, b.D, b.v
    listed = re.findall(r"`'(\w+)'`", cell)
    assert "exact" in listed, f"{b.rep}: damping='exact' must be accepted everywhere"
    calls = {"solve": lambda d: M.solve(v, regul=REGUL, damping=d),
             "inverse": lambda d: M.inverse(regul=REGUL, damping=d),
             "pow": lambda d: M.pow(-1, regul=REGUL, damping=d),
             "logdet": lambda d: M.logdet(regul=REGUL, damping=d)}
    A = D + REGUL * torch.eye(b.P, dtype=DT)
    for name, call in calls.items():
        for value in listed:
            try:
                r = call(value)
            except NotImplementedError:
                # the operation itself is a "no" cell of this representation
                continue
            if value == "exact" and name == "logdet":
                close(r, torch.linalg.slogdet(A)[1], rtol=1e-9, what="logdet, damping='exact'")
            elif value == "exact" and name == "solve":
                close(r.get_flat_representation(), torch.linalg.solve(A, v.get_flat_representation()),
                      rtol=1e-7, what="solve, damping='exact'")
        with pytest.raises(ValueError, match="damping"):
            call("not-a-damping")
    for value in ("pi",):
        if value not in listed:
            for name, call in calls.items():
                try:
                    call(value)
                except NotImplementedError:
                    continue
                except ValueError as e:
                    assert "'exact'" in str(e), f"{b.rep}.{name}: the error names no alternative"
                    continue
                raise AssertionError(f"{b.rep}.{name}(damping={value!r}) should be refused")


def _check_block_op(b, col, cell):
    """``diag_of_inverse`` / ``eigenvalues`` against torch.linalg on the dense ``M + λI``."""
    M, D = b.M, b.D
    call = (lambda: M.diag_of_inverse(regul=REGUL)) if col == "diag_of_inverse" \
        else (lambda: M.eigenvalues(regul=REGUL))
    if cell.startswith("no"):
        return expect_not_implemented(call, cell, f"{b.rep}.{col}")
    assert cell.startswith("yes"), f"({b.rep}, {col}): unknown cell {cell!r}"
    A = D + REGUL * torch.eye(b.P, dtype=DT)
    if col == "diag_of_inverse":
        close(call(), torch.diagonal(torch.linalg.inv(A)), rtol=1e-8, what="diag_of_inverse")
    else:
        close(torch.sort(call())[0], torch.linalg.eigvalsh(A),
              rtol=1e-9, what="eigenvalues")


def _check_prior(b, col, cell):
    """A prior column: ``solve`` (and ``inverse`` / ``logdet`` where the representation has
    them) against the dense ``M + Λ`` (KFAC with ``damping='exact'``); a ``no`` cell raises."""
    if col == "`damping=`":
        return _check_damping_cell(b, cell)
    if col in ("diag_of_inverse", "eigenvalues"):
        return _check_block_op(b, col, cell)
    M, D, v = b.M, b.D, b.v
    # π-damped KFAC (alone, or as a PMatMixed group): its exact damping
    kw = {"damping": "exact"} if _rule(b.rep) in ("π-damped", "per group") else {}
    for regul, lam in _prior_of(b, col):
        if cell.startswith("no"):
            expect_not_implemented(lambda: M.solve(v, regul=regul, **kw), cell, f"{b.rep}.{col}")
            continue
        assert cell.startswith("yes"), f"({b.rep}, {col}): unknown cell {cell!r}"
        A = D + torch.diag(lam)
        rt = 1e-7 if _rule(b.rep) == "CG" else 1e-8
        close(M.solve(v, regul=regul, **kw).get_flat_representation(),
              torch.linalg.solve(A, v.get_flat_representation()), rtol=rt, what=f"solve, {col}")
        if OPS[b.rep]["inverse / inv"].startswith("yes"):
            R = M.inverse(regul=regul, **kw)
            if "→" in cell:
                check_type(R, returned_type(cell, b.rep), f"inverse, {col}")
            close(dense_of(R), torch.linalg.inv(A), rtol=1e-8, what=f"inverse, {col}")
        if OPS[b.rep]["logdet"].startswith("yes"):
            close(M.logdet(regul=regul), torch.linalg.slogdet(A)[1], rtol=1e-9,
                  what=f"logdet, {col}")


def run_cell(b, col, cell):
    if col in PRIOR_COLUMNS:
        return _check_prior(b, col, cell)
    M, D, v, m, P = b.M, b.D, b.v, b.m, b.P
    f, J = v.get_flat_representation(), m.to_torch()
    K, n, _ = J.shape
    Jflat = J.reshape(K * n, P)
    rt = _rtol(M) if col.startswith("solve") else 1e-9

    def solve_pfmap_ref():
        return (Jflat @ damped_ref(M, D, REGUL)).reshape(K, n, P)

    calls = {  # the default call of each column (used for the "no" cells)
        "mv": lambda: M.mv(v), "vTMv": lambda: M.vTMv(v), "mmap": lambda: M.mmap(m),
        "mapTMmap (sum, diag)": lambda: M.mapTMmap(m), "solvePVec": lambda: M.solvePVec(v, regul=REGUL),
        "solvePFMap": lambda: M.solvePFMap(m, regul=REGUL), "solve": lambda: M.solve(v, regul=REGUL),
        "inverse / inv": lambda: M.inverse(REGUL), "pow / **": lambda: M.pow(0.5),
        "@": lambda: M @ v, "get_diag": lambda: M.get_diag(), "trace": lambda: M.trace(),
        "frobenius_norm / norm": lambda: M.frobenius_norm(), "to_torch": lambda: M.to_torch(),
        "size": lambda: M.size(), "mm": lambda: M.mm(b.M2), "+": lambda: M + b.M2,
        "-": lambda: M - b.M2, "scalar *": lambda: M * 2.5, "+ PMatEye": lambda: M + b.eye,
        "logdet": lambda: M.logdet(REGUL), "pickling": lambda: pickle.dumps(M),
    }
    if col == "eigendecomposition":
        return _check_eig(b, cell)
    if col == "pow / **" and cell.startswith("x = ±1 only"):
        return _check_pow(b, cell)
    if cell.startswith("no"):
        expect_not_implemented(calls[col], cell, f"{b.rep}.{col}")
        if col == "to_torch":
            _check_to_torch(b, cell)
        return
    assert cell.startswith("yes"), f"({b.rep}, {col}): unknown cell {cell!r}: use yes / no [^note] / —"

    if col == "mv":
        r = M.mv(v)
        assert isinstance(r, PVector)
        close(r.get_flat_representation(), D @ f, what="mv")
    elif col == "vTMv":
        r = M.vTMv(v)
        assert torch.is_tensor(r) and r.dim() == 0
        close(r, f @ D @ f, what="vTMv")
    elif col == "mmap":
        r = M.mmap(m)
        assert isinstance(r, PFMapDense)
        close(r.to_torch(), J @ D, what="mmap")
    elif col == "mapTMmap (sum, diag)":
        forms = torch.einsum("kip,pq,kiq->ki", J, D, J)  # (K, n): J[k, i] D J[k, i]ᵀ
        close(M.mapTMmap(m, reduction="sum"), forms.sum(dim=0), what="sum")
        close(M.mapTMmap(m, reduction="diag"), forms, what="diag")
    elif col == "solvePVec":
        r = M.solvePVec(v, regul=REGUL)
        assert isinstance(r, PVector)
        close(r.get_flat_representation(), damped_ref(M, D, REGUL) @ f, rtol=rt, what="solvePVec")
    elif col == "solvePFMap":
        r = M.solvePFMap(m, regul=REGUL)
        assert isinstance(r, PFMapDense)
        close(r.to_torch(), solve_pfmap_ref(), rtol=rt, what="solvePFMap")
    elif col == "solve":
        close(M.solve(v, regul=REGUL).get_flat_representation(), damped_ref(M, D, REGUL) @ f,
              rtol=rt, what="solve(PVector)")
        close(M.solve(m, regul=REGUL).to_torch(), solve_pfmap_ref(), rtol=rt, what="solve(PFMap)")
        if _rule(b.rep) == "π-damped":  # and the exact damping beside it
            close(M.solve(v, regul=REGUL, damping="exact").get_flat_representation(),
                  torch.linalg.solve(D + REGUL * torch.eye(P, dtype=DT), f), rtol=1e-8,
                  what="solve(damping='exact')")
    elif col == "inverse / inv":
        R = M.inverse(REGUL)
        check_type(R, returned_type(cell, b.rep), "inverse")
        close(dense_of(R), damped_ref(M, D, REGUL), rtol=1e-8, what="inverse")
        close(dense_of(M.inv(REGUL)), damped_ref(M, D, REGUL), rtol=1e-8, what="inv")
        _check_exact_variant(b, cell, lambda **kw: M.inverse(REGUL, **kw), -1.0)
    elif col == "pow / **":
        _check_pow(b, cell)
    elif col == "@":
        close((M @ v).get_flat_representation(), D @ f, what="M @ PVector")
        close((M @ m).to_torch(), J @ D, what="M @ PFMap")
    elif col == "get_diag":
        r = M.get_diag()
        assert r.shape == (P,)
        close(r, torch.diagonal(D), what="get_diag")
    elif col == "trace":
        close(M.trace(), torch.trace(D), what="trace")
    elif col == "frobenius_norm / norm":
        close(M.frobenius_norm(), torch.linalg.norm(D), what="frobenius_norm")
        close(M.norm(), torch.linalg.norm(D), what="norm")
    elif col == "to_torch":
        _check_to_torch(b, cell)
    elif col == "size":
        assert M.size() == (P, P) and M.size(0) == P and M.size(1) == P
    elif col == "mm":
        _binary(b, cell, lambda A, B: A.mm(B), lambda A, B: A @ B, "mm")
        if not _restricted(cell):
            close(dense_of((M @ b.M2)), D @ b.D2, what="M @ M2")
    elif col == "+":
        _binary(b, cell, lambda A, B: A + B, lambda A, B: A + B, "+")
    elif col == "-":
        _binary(b, cell, lambda A, B: A - B, lambda A, B: A - B, "-")
    elif col == "scalar *":
        R = M * 2.5
        check_type(R, returned_type(cell, b.rep), "M * 2.5")
        close(dense_of(R), 2.5 * D, what="M * 2.5")
        close(dense_of((2.5 * M)), 2.5 * D, what="2.5 * M")
        close(dense_of((M * torch.tensor(0.5, dtype=DT))), 0.5 * D, what="M * tensor")
        close(dense_of((M / 4)), D / 4, what="M / 4")
        close(dense_of((-M)), -D, what="-M")
    elif col == "+ PMatEye":
        R = M + b.eye
        check_type(R, returned_type(cell, b.rep), "M + PMatEye")
        ref = D + 0.4 * torch.eye(P, dtype=DT)
        close(dense_of(R), ref, what="M + PMatEye")
        close(dense_of((b.eye + M)), ref, what="PMatEye + M")
    elif col == "logdet":
        close(M.logdet(REGUL), torch.linalg.slogdet(D + REGUL * torch.eye(P, dtype=DT))[1],
              rtol=1e-9, what="logdet")
    elif col == "pickling":
        M3 = pickle.loads(pickle.dumps(M))
        check_type(M3, b.rep, "unpickled")
        assert M3.generator is None  # the model and its function are not pickled
        if isinstance(M, PMatImplicit):
            M3.generator = M.generator
        close(dense_of(M3), D, what="unpickled to_torch")
        close(M3.mv(v).get_flat_representation(), D @ f, what="unpickled mv")
    else:
        raise AssertionError(f"no check for column {col!r}")


@pytest.mark.parametrize("rep,col", CELLS, ids=[f"{r}-{c}" for r, c in CELLS])
def test_cell(rep, col):
    run_cell(built(rep), col, OPS[rep][col])


@pytest.mark.parametrize("rep", sorted(SOLVES))
def test_solve_methods(rep):
    """Every ``solve=`` value of the page runs and gives the documented damped solve; a value
    marked "(exact damping)" solves with exactly ``M + λI`` whatever the default rule."""
    b = built(rep)
    cell = SOLVES[rep]
    values = re.findall(r"`'(\w+)'`((?:\s*/\s*`'\w+'`)*)\s*(\([^)]*\))?", cell)
    if cell.startswith("none"):
        assert OPS[rep]["solvePVec"].startswith("no")
        return
    assert values, f"{rep}: no solve= value in {cell!r}"
    f = b.v.get_flat_representation()
    exact = torch.linalg.solve(b.D + REGUL * torch.eye(b.P, dtype=DT), f)
    for name, aliases, note in values:
        names = [name] + re.findall(r"'(\w+)'", aliases)
        ref = exact if "exact damping" in note else damped_ref(b.M, b.D, REGUL) @ f
        for nm in names:
            r = b.M.solvePVec(b.v, regul=REGUL, solve=nm)
            close(r.get_flat_representation(), ref, rtol=_rtol(b.M), what=f"solve='{nm}'")
