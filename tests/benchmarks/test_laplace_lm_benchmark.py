"""Smoke test of benchmarks/laplace_lm.py: one row per form, in process, at a tiny size."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("form", ["kfac", "diag"])
def test_laplace_lm_benchmark_row(form, capsys):
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location(
        "laplace_lm_benchmark", os.path.join(ROOT, "benchmarks", "laplace_lm.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--row", form, "--small", "--n", "3", "--seq", "9", "--batch", "2",
                "--output-rank", "4", "--chunk", "7"])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["form"] == form and row["positions"] == 3 * 8
    assert row["params"] == 97 * 16 and row["predictive_shape"] == [3, 9, 97]
    assert row["predictive_bytes"] == 3 * 9 * 97 * 4 and row["probs_sum_err"] < 1e-5
    assert row["log_marglik"] < 0
    for key in ("body", "fit", "evidence", "predictive"):
        assert row[key + "_s"] >= 0 and row[key + "_cpu_s"] >= 0
    assert row["predictive_rss_mib"] >= row["fit_rss_mib"] >= row["floor_rss_mib"] > 0
