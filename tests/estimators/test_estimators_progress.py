"""``verbose=True`` shows a progress bar over the products (on stderr) and changes no number."""
import pytest
import torch

from nngeometry.estimators import (diag_estimate, log_spectral_density, spectral_density,
                                   top_eigenpairs, trace_estimate)
from nngeometry.layercollection import LayerCollection
from nngeometry.object import PMatDense


@pytest.fixture(scope="module")
def matrix():
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3).double()
    lc = LayerCollection.from_model(lin)
    X = torch.randn(lc.numel(), lc.numel(), dtype=torch.float64)
    return PMatDense(lc, data=X @ X.T)


@pytest.mark.parametrize("estimate, kwargs", [
    (trace_estimate, dict(n_matvecs=8, method="hutchpp")),
    (diag_estimate, dict(n_matvecs=8)),
    (top_eigenpairs, dict(k=2)),
    (spectral_density, dict(n_lanczos=6, n_repeats=2, n_points=16)),
    (log_spectral_density, dict(n_lanczos=6, n_repeats=2, n_points=16)),
], ids=lambda x: getattr(x, "__name__", ""))
def test_progress_bar_shown_and_numbers_unchanged(matrix, estimate, kwargs, capsys):
    quiet = estimate(matrix, generator=3, **kwargs)
    assert capsys.readouterr().err == ""
    shown = estimate(matrix, generator=3, verbose=True, **kwargs)
    assert "product" in capsys.readouterr().err
    for a, b in zip(_numbers(quiet), _numbers(shown)):
        assert torch.equal(a, b)


def _numbers(result):
    for name in ("value", "stderr", "eigenvalues", "density"):
        x = getattr(result, name, None)
        if x is not None:
            yield x.to_torch() if hasattr(x, "to_torch") else x
