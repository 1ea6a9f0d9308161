"""Data-parallel Fisher matrices and natural-gradient training with torch.distributed.

Run as a plain script, it starts its own 2 processes on this machine (CPU, gloo)::

    python examples/distributed_fim.py            # --nproc 4 for four ranks

Under torchrun it is one rank among those torchrun starts, e.g. on GPUs (one process per GPU,
NCCL)::

    torchrun --standalone --nproc_per_node=4 examples/distributed_fim.py --cuda

Each process (rank) reads its own shard of the data; every nngeometry call then returns, on every
rank, the matrix of the WHOLE data set: the statistics are summed over the ranks once per
matrix (not per batch). Nothing to switch on: ``distributed=None`` (the default of every entry
point) turns data parallelism on when a process group with more than one rank is initialised.
"""
import argparse
import os
import socket

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from nngeometry import FIM
from nngeometry.object import PMatKFAC
from nngeometry.optim import NaturalGradient


def synthetic_data(n=512, d=20, classes=4, seed=0):
    """A classification problem every rank builds identically (same seed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w + 0.5 * torch.randn(n, classes, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def main(steps=50, cuda=False, quiet=False):
    """Train a small MLP with natural-gradient SGD under DistributedDataParallel, then compute
    the Fisher of the whole data set on every rank. Returns ``(trace of the KFAC Fisher, final
    parameters)`` flattened in one tensor (identical on every rank)."""
    started_here = not dist.is_initialized()
    if started_here:
        # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}") if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        torch.manual_seed(0)  # the same initial model on every rank
        model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 4)).to(device)
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device] if cuda else None)
        data = synthetic_data()

        # training: each rank takes its part of every global batch of 64 (DistributedSampler)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
        train = DataLoader(data, batch_size=64 // world, sampler=sampler)
        # the preconditioner's Fisher on the step's batch is that of the GLOBAL batch: every
        # rank's half is reduced, so every rank takes the same step (as the DDP gradients)
        precond = NaturalGradient(ddp, PMatKFAC, curvature="fisher", damping=1e-2,
                                  update_freq=5)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        step = 0
        while step < steps:
            sampler.set_epoch(step)
            for x, y in train:
                x, y = x.to(device), y.to(device)
                opt.zero_grad()
                loss = F.cross_entropy(ddp(x), y)
                loss.backward()           # DDP averages the gradients over the ranks
                precond.step((x, y))      # g <- (F + λI)^-1 g, F of the global batch
                opt.step()
                step += 1
                if step == steps:
                    break

        # the Fisher of the whole data set, on every rank. A DistributedSampler pads the shards
        # to equal sizes by repeating examples (drop_last=False) or drops the last ones
        # (drop_last=True): for the exact matrix give each rank a plain shard instead.
        shard = Subset(data, range(rank, len(data), world))
        F_kfac = FIM(ddp, DataLoader(shard, batch_size=128), PMatKFAC)
        trace = F_kfac.trace()
        if not quiet and rank == 0:
            print(f"{world} ranks, {len(data)} examples: final loss {loss.item():.4f}, "
                  f"trace of the KFAC Fisher {trace.item():.6f}")
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        return torch.cat([trace.reshape(1), params]).cpu()
    finally:
        if started_here:
            dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_rank(rank, world, port, steps):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    main(steps)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cuda", action="store_true", help="one GPU per process, NCCL (torchrun)")
    ap.add_argument("--nproc", type=int, default=2,
                    help="ranks to start when run without torchrun (CPU, gloo)")
    args = ap.parse_args()
    if "RANK" in os.environ:        # started by torchrun: this process is one rank
        main(args.steps, args.cuda)
    elif args.cuda:
        ap.error("--cuda runs one process per GPU: start it with torchrun (see the docstring)")
    else:                           # a plain run: start the ranks here
        torch.multiprocessing.spawn(_spawned_rank, args=(args.nproc, _free_port(), args.steps),
                                    nprocs=args.nproc)
