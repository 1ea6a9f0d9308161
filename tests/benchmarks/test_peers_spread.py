"""benchmarks/peers.py: the spread of a cell over its runs (min / median / max), an error only
when no run succeeded, and the table's cell with the range."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import peers  # noqa: E402


def _run(x, t=0.01, error=None):
    r = {"lib": "ours", "workload": "W1", "row": "kfac_mc"}
    if error:
        r["error"] = error
    else:
        r.update(time=t, x_floor=x, peak=2.0 ** 20, floor=t / x)
    return r


def test_summarize_spread_and_errors(capsys):
    cell = peers.summarize([_run(1.5, 0.015), _run(2.5, 0.02), _run(1.2, 0.012),
                            _run(0, error="over 900 s")])
    assert cell["x_floor"] == {"min": 1.2, "median": 1.5, "max": 2.5}
    assert cell["time"]["median"] == 0.015 and cell["n_runs"] == 3 and len(cell["runs"]) == 4
    assert "error" not in cell
    failed = peers.summarize([_run(0, error="a"), _run(0, error="not installed")])
    assert failed["error"] == "not installed" and "x_floor" not in failed
    peers.print_table({("W1", "kfac_mc", "ours"): cell, ("W1", "kfac_mc", "backpack"): failed},
                      ["ours", "backpack"], ["W1"], ["kfac_mc"])
    out = capsys.readouterr().out
    assert "1.50x [1.20-2.50]" in out and "n/a (not installed)" in out
    assert out.strip().splitlines()[-1].endswith("ours")  # the fastest
