#!/usr/bin/env python
"""What is alive at the peak of one build: the tensor memory allocated during the call and not
yet freed at its highest point, grouped by the package function (or the torch call outside the
package) that allocated it.

    python benchmarks/peak_breakdown.py                      # W5, closed-form KFAC, 64 images
    python benchmarks/peak_breakdown.py --n 128 --json out.json

The build runs once under ``torch.profiler`` with memory and Python stacks recorded; every
allocation event is matched with its free by address, and the allocating frame is the innermost
Python function of ``nngeometry`` above it (``torch`` or ``<other>`` when none). The floor's
peak (forward + backward of the mean loss) is measured the same way for scale. The profiler
slows the build several times; the bytes are exact.
"""
import argparse
import collections
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import real  # noqa: E402

import nngeometry  # noqa: E402
from nngeometry.object import PMatKFAC  # noqa: E402

MiB = 2 ** 20


def _site(event):
    """The innermost nngeometry function above an allocation event, or the nearest Python
    frame's file when none is in the package."""
    e, outer = event.parent, None
    while e is not None:
        name = e.name
        if "nngeometry/" in name:
            return name.split("nngeometry/", 1)[1]
        if outer is None and ".py(" in name:
            outer = name.rsplit("/", 1)[-1]
        e = e.parent
    return outer or "<no Python frame>"


def alive_at_peak(fn):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, with_stack=True) as prof:
        fn()
    alloc_tag = torch._C._profiler._EventType.Allocation
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == alloc_tag:
            f = e.extra_fields
            events.append((e.start_time_ns, f.alloc_size, f.ptr, e))
        stack.extend(e.children)
    events.sort(key=lambda a: a[0])
    live, running, peak, at_peak = {}, 0, 0, {}
    for _, size, ptr, e in events:
        running += size
        if size > 0:
            live[ptr] = (size, e)
        else:
            live.pop(ptr, None)
        if running > peak:
            peak, at_peak = running, dict(live)
    sites = collections.Counter()
    for size, e in at_peak.values():
        sites[_site(e)] += size
    return peak, sites


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="W5", choices=sorted(real.WORKLOADS))
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    make = real.WORKLOADS[args.workload][0]
    s = make(args.n)
    floor_peak, _ = alive_at_peak(real.floor(s))
    peak, sites = alive_at_peak(lambda: nngeometry.FIM(s.model, s.loader, PMatKFAC,
                                                       **real._kw(s, "FIM")))
    print(f"{args.workload}, {args.n} examples: closed-form KFAC build, peak {peak / MiB:.0f} MiB "
          f"({peak / floor_peak:.2f}x the floor's {floor_peak / MiB:.0f} MiB); alive at the "
          "peak, by the function that allocated it:")
    for site, b in sites.most_common(args.top):
        print(f"  {b / MiB:8.1f} MiB  {site}")
    rest = sum(b for _, b in sites.most_common()[args.top:])
    if rest:
        print(f"  {rest / MiB:8.1f} MiB  (the rest)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"peak": peak, "floor_peak": floor_peak, "sites": dict(sites)}, f, indent=1)


if __name__ == "__main__":
    main()
