"""The sum of per-(direction, example) Gram matrices of a convolution's output gradients, by
either kernel the shape rule picks, equals the dense definition; the kernel benchmark runs."""
import json
import os
import sys

import pytest
import torch

from nngeometry.layer_types import conv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(7, 3, 5), (3, 40, 200), (17, 520, 1)])
def test_sum_of_grams(shape, threads):
    # (7, 3, 5): bmm and a sum; (3, 40, 200): addbmm on one thread; (17, 520, 1): an
    # intermediate too large for bmm and a sum (addbmm on one thread, one GEMM on several)
    torch.manual_seed(0)
    g = torch.randn(*shape, dtype=torch.float64)
    B, C, L = shape
    assert (B * C * C <= conv.BMM_SUM_MAX_NUMBERS) == (shape != (17, 520, 1))
    assert (C * C * L < conv.BMM_SUM_MAX_WORK) == (shape == (7, 3, 5))
    ref = sum(g[b] @ g[b].t() for b in range(B))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = conv._sum_of_grams(g)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_kernel_benchmark_quick(tmp_path):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    try:
        import gram_kernels as kernels
    finally:
        sys.path.pop(0)
    out = tmp_path / "k.json"
    rows = kernels.main(["--quick", "--json", str(out)])
    assert len(rows) == 3
    assert json.loads(out.read_text())["rows"][0]["fastest"] in kernels.kernels()
