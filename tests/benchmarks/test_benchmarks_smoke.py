"""Smoke test of the benchmark harness (benchmarks/run.py): a tiny run must print the table and
write the JSON with the expected structure, whatever representations are available."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "run.py")


def test_benchmark_harness_quick_run(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--n", "64", "--repeats", "1", "--quiet",
         "--workloads", "W1", "--reps", "Diag,KFAC", "--json", str(out)],
        capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "threads=1" in proc.stdout and "== targets" in proc.stdout
    assert "== W1" in proc.stdout

    data = json.loads(out.read_text())
    assert set(data) == {"meta", "workloads", "targets"}
    assert data["meta"]["threads"] == 1 and data["meta"]["dtype"] == "float32"
    w1 = data["workloads"]["W1"]
    assert w1["n"] == 64 and w1["n_params"] == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert w1["floor"]["time_s"] > 0 and w1["floor"]["peak_bytes"] > 0
    assert set(w1["reps"]) == {"Diag", "KFAC"}
    for name, rep in w1["reps"].items():
        assert rep["status"] in ("ok", "n/a")
        if rep["status"] == "n/a":
            assert rep["reason"]
            continue
        assert set(rep["build"]) == {"FIM", "MC"}
        for variant, b in rep["build"].items():
            # either measured (time, ratio to the floor, memory) or n/a with a reason
            assert ("time_s" in b and b["x_floor"] > 0 and "peak_bytes" in b) or b["reason"]
        assert {"mv", "vTMv", "solve", "solve_first", "get_diag", "trace"} <= set(rep["ops"])
    ids = {t["id"] for t in data["targets"]}
    assert {"mc-diag", "mc-kfac", "fim-diag", "fim-kfac", "kfac-solve", "mem-kfac-mc",
            "mem-nojac-diag-fim"} <= ids
    for t in data["targets"]:
        assert t["status"] in ("MET", "MISSED", "N/A")
        assert (t["measured"] is None) == (t["status"] == "N/A")
        assert f"[{t['status']:>6}] W1  {t['target']}" in proc.stdout

    # the spread summary over runs (here the same run twice): every target, both values, and
    # "met 2/2" exactly for the targets this run met
    spread = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "spread.py"),
                             str(out), str(out)], capture_output=True, text=True, timeout=60)
    assert spread.returncode == 0, spread.stderr[-3000:]
    lines = spread.stdout.strip().splitlines()
    assert len(lines) == len(data["targets"])
    for t, line in zip(data["targets"], lines):
        assert line.startswith(f"{t['workload']}  {t['target'][:40]}")
        n_met = {"MET": 2, "MISSED": 0, "N/A": 0}[t["status"]]
        assert line.endswith(f"met {n_met}/{0 if t['status'] == 'N/A' else 2}")



def test_overrides_script_lists_what_each_representation_writes_again():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "overrides_script", os.path.join(ROOT, "benchmarks", "overrides.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from nngeometry.object import PMatDiag, PMatKFAC, PMatLowRank

    # the Kronecker container solves through its blocks; PMatDiag keeps its one-product paths
    assert "solvePVec" not in mod.overrides(PMatKFAC)
    assert {"mv", "vTMv"} <= set(mod.overrides(PMatDiag))
    assert "pow" in mod.overrides(PMatLowRank)
