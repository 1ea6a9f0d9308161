"""Summarize several runs of ``run.py --json``: per target, the measured value in each run, its
median, and in how many runs it was met.

On a shared or virtual machine a ratio near its limit can land on either side of it from one
run to the next (the floor and the builds do not slow down together); this shows which targets
are met in every run, which in none, and which are within the noise.

    python benchmarks/spread.py run1.json run2.json run3.json [--markdown]
"""
import argparse
import json
import statistics


def load(paths):
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append({(t["workload"], t["target"]): t for t in json.load(f)["targets"]})
    return runs


def summarize(runs):
    keys = list(runs[0])
    for r in runs[1:]:
        keys += [k for k in r if k not in keys]
    rows = []
    for k in keys:
        ts = [r.get(k) for r in runs]
        vals = [t["measured"] for t in ts if t and t.get("measured") is not None]
        met = sum(1 for t in ts if t and t["status"] == "MET")
        measured = sum(1 for t in ts if t and t["status"] in ("MET", "MISSED"))
        limit = next((t["limit"] for t in ts if t), None)
        rows.append((k[0], k[1], vals, statistics.median(vals) if vals else None, limit, met,
                     measured))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="JSON files written by run.py --json")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table")
    args = ap.parse_args(argv)
    rows = summarize(load(args.json))
    if args.markdown:
        print("| workload | target | runs | median | met in |")
        print("|---|---|---|---|---|")
    for w, target, vals, med, limit, met, measured in rows:
        runs = " ".join(f"{v:.2f}" for v in vals) or "n/a"
        medtxt = f"{med:.2f}" if med is not None else "n/a"
        if args.markdown:
            print(f"| {w} | {target} | {runs} | {medtxt} | {met}/{measured} |")
        else:
            print(f"{w}  {target:<95.95} {runs:<32} median {medtxt:>6}  met {met}/{measured}")


if __name__ == "__main__":
    main()
