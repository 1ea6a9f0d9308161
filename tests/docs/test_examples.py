"""Every example runs (a smoke run with fewer steps) and prints its summary. Skipped where
scikit-learn is not installed (the ``test`` extra installs it, so CI runs them)."""
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _run(args, tmp_path):
    pytest.importorskip("sklearn")
    run = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def test_fim_digits(tmp_path):
    out = _run([str(EXAMPLES / "fim_digits.py"), "--out", str(tmp_path)], tmp_path)
    assert "Fisher information matrix (PMatDense)" in out and "EWC, KFAC F" in out
    assert "EKFAC" in out


def test_ewc_split_digits(tmp_path):
    out = _run([str(EXAMPLES / "ewc_split_digits.py"), "--quick", "--out", str(tmp_path)],
               tmp_path)
    assert "EWC KFAC" in out and (tmp_path / "ewc_split_digits.json").exists()
    if "plot:" in out:
        assert (tmp_path / "ewc_split_digits.png").stat().st_size > 1000


def test_natural_gradient_digits(tmp_path):
    out = _run([str(EXAMPLES / "natural_gradient_digits.py"), "--quick", "--out", str(tmp_path)],
               tmp_path)
    assert "NG-KFAC" in out and "NG-EKFAC" in out
    assert (tmp_path / "natural_gradient_digits.json").exists()


def test_laplace_digits(tmp_path):
    out = _run([str(EXAMPLES / "laplace_digits.py"), "--quick", "--out", str(tmp_path)], tmp_path)
    assert "Laplace KFAC" in out and "marglik" in out and "noisy test" in out
    assert (tmp_path / "laplace_digits.json").exists()


def test_fim_spectrum(tmp_path):
    out = _run([str(EXAMPLES / "fim_spectrum.py"), "--quick", "--out", str(tmp_path)], tmp_path)
    assert "Lanczos top 20 vs exact" in out and "CNN" in out
    assert (tmp_path / "fim_spectrum.json").exists()


def test_distributed_fim_runs_as_written(tmp_path):
    """A plain ``python examples/distributed_fim.py`` starts its own ranks (gloo)."""
    out = _run([str(EXAMPLES / "distributed_fim.py"), "--steps", "2"], tmp_path)
    assert "2 ranks, 512 examples" in out and "trace of the KFAC Fisher" in out


def test_influence_digits(tmp_path):
    out = _run([str(EXAMPLES / "influence_digits.py"), "--quick", "--out", str(tmp_path)],
               tmp_path)
    assert "EKFAC" in out and "self-influence" in out
    assert (tmp_path / "influence_digits.json").exists()
