"""Smoke test of benchmarks/estimators.py: a tiny run prints the table and writes the JSON rows
(trace, diag, single) as multiples of the floor."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "estimators.py")


def test_estimators_benchmark_smoke(tmp_path):
    out = tmp_path / "est.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--workloads", "W1", "--n", "16", "--repeats", "1",
         "--products", "3", "--quiet", "--json", str(out)],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== 3 products with PMatImplicit" in proc.stdout and "W1" in proc.stdout
    data = json.loads(out.read_text())
    w1 = data["workloads"]["W1"]
    assert w1["n"] == 16 and w1["n_products"] == 3 and w1["floor"]["time_s"] > 0
    for row in ("trace", "diag", "single"):
        assert w1[row]["time_s"] > 0 and w1[row]["x_floor"] > 0, (row, w1[row])
    assert w1["single_over_trace"] > 0 and w1["single_over_diag"] > 0
