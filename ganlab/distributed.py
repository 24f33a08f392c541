"""One run across several processes (DistributedDataParallel under torchrun): which rank this process
is, this rank's share of every global draw, batch norm across ranks, the few collectives the loop
needs, and `ganlab train --nproc N` (torchrun started for the user).

The rule that keeps N processes equal to one: every random number is drawn for the *global* batch,
with the same generator and seed on every rank, and each rank keeps its rows (`Share`). So the data
order, latents, instance noise, DiffAugment and penalty interpolates of a 2-process run are those of
a 1-process run with the same global batch; gradients are averaged by DDP over equal shards, which
is the mean over the global batch. What still differs is batch norm, whose statistics are per rank
by default (train.sync_bn: true makes them the global batch's, on any backend).

With one process (no torchrun) every function here is a no-op and `Share()` draws exactly what the
single-process code always drew.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from .errors import ConfigError

# Rank 0 evaluates (and may first train the domain encoder) while the other ranks wait for its
# decision: the collectives must outwait that, not the default 10-30 minutes.
TIMEOUT = timedelta(hours=6)


@dataclass(frozen=True)
class Share:
    """This process's place in the run: rank `rank` of `world`, holding rows [rank*n, (rank+1)*n) of
    every global batch of n*world rows."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:  # the rank that evaluates, checkpoints, tracks and prints
        return self.rank == 0

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[0] // self.world
        return t[self.rank * n : (self.rank + 1) * n]

    def rand(self, n: int, *shape, generator, device) -> torch.Tensor:
        """n rows of uniform noise: this rank's rows of a draw for the whole global batch."""
        return self.rows(torch.rand(n * self.world, *shape, device=device, generator=generator))

    def randn(self, n: int, *shape, generator, device) -> torch.Tensor:
        return self.rows(torch.randn(n * self.world, *shape, device=device, generator=generator))


SINGLE = Share()


# ------------------------------------------------------------------------------- joining the run


def join(device: torch.device) -> tuple[Share, torch.device]:
    """Join the process group torchrun described in the environment (WORLD_SIZE, RANK, LOCAL_RANK,
    MASTER_ADDR/PORT). Returns this rank's Share and its device: cuda:LOCAL_RANK on GPUs (one GPU per
    process, NCCL), the given device otherwise (gloo). Without torchrun: (SINGLE, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE, device
    if device.type == "mps":
        raise ConfigError("train.device mps: one run across several processes needs cuda or cpu")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            timeout=TIMEOUT,
            device_id=device if device.type == "cuda" else None,
        )
    return Share(dist.get_rank(), dist.get_world_size()), device


def check_split(batch_size: int, world: int, pack: int = 1, group: int = 0):
    """Each process's share of the batch must hold whole packs (model.pack) of whole minibatch-std groups
    (model.mbstd_group): a pack that straddled the lean step's real and fake halves would mix them."""
    unit = world * pack * max(1, group)
    if batch_size % unit:
        what = (
            (f"{world} processes" if world > 1 else "1 process")
            + (f" x model.pack {pack}" if pack > 1 else "")
            + (f" x model.mbstd_group {group}" if group > 1 else "")
        )
        raise ConfigError(f"train.batch_size {batch_size} does not split evenly over {what}: use a multiple of {unit}")


def leave(share: Share):
    if share.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast(obj, share: Share):
    """Rank 0's `obj` (any picklable value) on every rank."""
    if share.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(share: Share):
    if share.world > 1:
        dist.barrier()


@contextmanager
def main_first(share: Share):
    """Rank 0 runs the block first (building a cache), then the others (reading it)."""
    if not share.main:
        barrier(share)
    yield
    if share.main:
        barrier(share)


def mean_over_ranks(t: torch.Tensor, share: Share) -> torch.Tensor:
    """The mean of `t` over the ranks (gloo has no AVG, so a sum and a division)."""
    if share.world == 1:
        return t
    dist.all_reduce(t)
    return t / share.world


def wrap(net: nn.Module, device: torch.device, share: Share) -> nn.Module:
    """`net` in DistributedDataParallel (gradients averaged across ranks in backward), or `net`.
    forward_sync_buffers off: batch-norm running averages are not used in training, and with
    train.sync_bn they are equal on every rank anyway; rank 0's are the ones saved."""
    if share.world == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids, **{no_buffer_sync_kwarg(): False})


def no_buffer_sync_kwarg() -> str:
    """DDP's switch for syncing buffers at each forward: `forward_sync_buffers` in newer torch,
    `broadcast_buffers` before (torch 2.11 on the lent GPU machine): read from the signature, not the version."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"


# ---------------------------------------------------------------------------- batch norm across ranks


class _SumOverRanks(torch.autograd.Function):
    """x summed over the ranks. Its gradient is the sum over the ranks of the gradients (each rank's
    loss depends on every rank's x through the sum); that sum is taken by this same function, so it
    is differentiable again: R1 and the gradient penalty differentiate through batch norm twice."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return _SumOverRanks.apply(grad)


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch: the per-channel sums are
    all-reduced with a backward that all-reduces their gradients, so the gradient is that of one
    BatchNorm2d over the whole batch. The same function as a single process's BatchNorm2d on the whole
    batch; unlike torch's SyncBatchNorm (CUDA only) it runs on gloo, so it is tested on CPU. Same
    parameters and buffers as BatchNorm2d, so checkpoints load in a single process."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        xf = x.float()
        count = xf.numel() // xf.shape[1] * dist.get_world_size()
        mean = _SumOverRanks.apply(xf.sum((0, 2, 3))) / count
        centred = xf - mean[None, :, None, None]
        var = _SumOverRanks.apply(centred.pow(2).sum((0, 2, 3))) / count  # two passes: no cancellation
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), m)
                self.running_var.lerp_(var.detach() * count / max(count - 1, 1), m)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def sync_batchnorm(net: nn.Module) -> nn.Module:
    """Every BatchNorm2d of `net` computes global-batch statistics from now on. The class is swapped
    in place: CrossRankBatchNorm2d adds no state, so parameters, buffers and state-dict keys stay."""
    for m in net.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = CrossRankBatchNorm2d
    return net


def local_batchnorm(net: nn.Module) -> nn.Module:
    """The reverse of sync_batchnorm: a copy that rank 0 runs alone (sampling, standing statistics)
    must not wait for the other ranks."""
    for m in net.modules():
        if type(m) is CrossRankBatchNorm2d:
            m.__class__ = nn.BatchNorm2d
    return net


# ----------------------------------------------------------------------------------------- launch


def cpu_share(env: dict, processes: int) -> dict:
    """`env` with OMP_NUM_THREADS = this machine's cores / processes, unless the user set it: N
    processes of torch's default (all cores each) would fight over the same cores."""
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    return env


def launch(nproc: int, argv: list[str]) -> int:
    """`ganlab train --nproc N ARGS`: the same command under torchrun, N processes on this machine.
    Each gets an equal share of the CPU threads (torchrun's default of 1 thread would starve a CPU
    run). Everything stays on the loopback interface: `--standalone` would advertise the host name,
    and gloo would bind to whatever address a lookup of it gives."""
    env = cpu_share(dict(os.environ), nproc)
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "--local-addr=127.0.0.1",
        "-m",
        "ganlab.cli",
        *argv,
    ]
    return subprocess.call(cmd, env=env)
