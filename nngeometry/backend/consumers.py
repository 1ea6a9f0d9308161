"""Consumers of per-batch statistics: each accumulates one kind of matrix over the batches.

A consumer has ``update(ctx)`` (called once per mini-batch and chunk of output directions with a
:class:`~nngeometry.backend.context.BatchContext`) and ``finalize(n)`` (called once, with the
number of examples seen). Keeping the running sums in one object per statistic is what lets
statistics be summed across data-parallel workers before ``finalize``.
"""
import torch


class Consumer:
    def update(self, ctx):
        raise NotImplementedError

    def finalize(self, n):
        raise NotImplementedError


class DenseCovariance(Consumer):
    """``(1/n) Σ_x J(x)ᵀ J(x)``, shape ``(P, P)``."""

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self.result = None

    def update(self, ctx):
        J = ctx.jacobian()
        J = J.reshape(-1, J.shape[-1])
        if self.result is None:
            self.result = J.new_zeros(J.shape[1], J.shape[1])
        self.result.addmm_(J.t(), J)

    def finalize(self, n):
        self.result /= n


class DiagCovariance(Consumer):
    """Diagonal of ``(1/n) Σ_x J(x)ᵀ J(x)``, shape ``(P,)``."""

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self.result = None

    def update(self, ctx):
        parts = torch.cat([ctx.layer_diag(lid) for lid in ctx.layer_ids()])
        self.result = parts if self.result is None else self.result + parts

    def finalize(self, n):
        self.result = self.result / n


class LayerBlocks(Consumer):
    """``{layer_id: (1/n) Σ_x J_l(x)ᵀ J_l(x)}``: one dense block per layer."""

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self.result = {}

    def update(self, ctx):
        for lid in ctx.layer_ids():
            g = ctx.per_example_grad(lid)
            g = g.reshape(-1, g.shape[-1])
            if lid not in self.result:
                self.result[lid] = g.new_zeros(g.shape[1], g.shape[1])
            self.result[lid].addmm_(g.t(), g)

    def finalize(self, n):
        for b in self.result.values():
            b /= n


class KFACFactors(Consumer):
    """``{layer_id: (A, G)}`` with both factors divided by ``n`` (see ``kfac_factors``)."""

    def __init__(self, layer_collection, approx="expand"):
        self.lc = layer_collection
        self.approx = approx
        self.result = {}

    def update(self, ctx):
        for lid in ctx.layer_ids():
            A, G = ctx.kfac_factors(lid, approx=self.approx)
            if lid not in self.result:
                self.result[lid] = [A, G]
            else:
                acc = self.result[lid]
                if A is not None:
                    acc[0] = A if acc[0] is None else acc[0] + A
                acc[1] = acc[1] + G

    def finalize(self, n):
        self.result = {lid: (A / n, G / n) for lid, (A, G) in self.result.items()}


class Jacobian(Consumer):
    """The per-example Jacobians stacked over batches: ``(n_output, n, P)``, not normalized."""

    def __init__(self, layer_collection):
        self.lc = layer_collection
        self.batches = []  # one entry per batch: list of (k_start, (K, nb, P))
        self.result = None

    def update(self, ctx):
        if ctx.first_chunk:
            self.batches.append([])
        self.batches[-1].append(ctx.jacobian())

    def finalize(self, n):
        per_batch = [torch.cat(chunks, dim=0) for chunks in self.batches]
        self.result = torch.cat(per_batch, dim=1)
        self.batches = []
