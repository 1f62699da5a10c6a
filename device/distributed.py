"""The base step over several processes: `fieldlearn init` under torchrun.

    torchrun --nproc_per_node N -m fieldlearn.cli init --data ... --state HUB ...

torchrun starts N processes (ranks) and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT; `world_from_env` reads them. With WORLD_SIZE 1, or without torchrun, nothing
here runs and init is the one-process step it always was. Otherwise, torch's own engine:

    process_group   torch.distributed over env:// (gloo on the CPU; nccl on CUDA, each rank
                    on the GPU of its LOCAL_RANK)
    DdpStep.shard   each rank trains on its share of the base images (DistributedSampler's
                    split: shuffled with the step's seed, padded by repeats to equal length,
                    so every rank makes the same number of optimiser steps); it keeps that
                    share for the whole step and shuffles it each epoch
    DdpStep.wrap    the trained part (the top and the head) in DistributedDataParallel: the
                    gradients are averaged over the ranks at every step (the global batch is
                    N x --batch-size), BatchNorm's running statistics are rank 0's
    DdpStep.finish  checks that every rank ends with the same weights, gives every rank
                    rank 0's buffers, and averages the step's loss terms over the ranks

What the training does not touch runs on every rank over all the images, as in one process
(fieldlearn.device.learner.train_base): the frozen trunk's pass and the class statistics
with their calibration, so the statistics count every base image once. Only rank 0
evaluates and publishes the version (same format, same store); the others wait for it at a
barrier (fieldlearn.field.increment.learn_base).

torch.distributed is imported only here and only when torchrun asked for it: a Jetson
build of torch without it runs init as before.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
import torch.nn as nn

from fieldlearn.device.model import Student
from fieldlearn.runtime.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job."""
    rank: int
    size: int
    local_rank: int

    @property
    def main(self) -> bool:
        """Rank 0: the one that logs, evaluates and publishes."""
        return self.rank == 0


def world_from_env(env: Mapping[str, str] = os.environ) -> World | None:
    """The torchrun job this process is part of (WORLD_SIZE > 1), or None: one process."""
    size = int(env.get("WORLD_SIZE") or 1)
    if size <= 1:
        return None
    rank = int(env["RANK"])
    return World(rank=rank, size=size, local_rank=int(env.get("LOCAL_RANK") or rank))


@contextlib.contextmanager
def process_group(world: World, device: str) -> Iterator[None]:
    """torch.distributed's default process group for the job (torchrun's env:// rendezvous):
    gloo on the CPU, nccl on CUDA with each rank on the GPU of its LOCAL_RANK."""
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError(f"torchrun started {world.size} processes, but this build of torch has no torch.distributed: "
                        "run fieldlearn init without torchrun")
    cuda = device.startswith("cuda")
    if cuda:
        if ":" in device:
            raise UserError(f"--device {device} under torchrun: use --device cuda (each process takes the GPU of "
                            "its LOCAL_RANK)")
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=world.rank, world_size=world.size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Every rank waits here until all have arrived (rank 0: after publishing)."""
    import torch.distributed as dist

    dist.barrier()


class TrainedPart(nn.Module):
    """What DistributedDataParallel wraps: the student's trained modules (top and head, the
    same modules, not copies) and, as forward, the student's forward_top. The trunk, the
    frozen top and the class statistics stay out of it: nothing of them trains, and DDP
    would broadcast the statistics' buffers (a Gram matrix of megabytes) at every step."""

    def __init__(self, student: Student):
        super().__init__()
        self.top, self.head = student.top, student.head
        self.__dict__["student"] = student          # not a submodule

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.student.forward_top(z)


class DdpStep:
    """What fieldlearn.device.learner.train_step does differently under torchrun (module
    docstring): shard -> wrap -> (the step's loop) -> finish."""

    def __init__(self, world: World):
        self.world = world
        self._part: TrainedPart | None = None

    def shard(self, n: int, seed: int) -> torch.Tensor:
        """[ceil(n / world size)] this rank's rows of n images (DistributedSampler's split)."""
        from torch.utils.data.distributed import DistributedSampler

        sampler = DistributedSampler(range(n), num_replicas=self.world.size, rank=self.world.rank, shuffle=True,
                                     seed=seed, drop_last=False)
        return torch.tensor(list(sampler), dtype=torch.long)

    def wrap(self, student: Student) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """forward_top through DistributedDataParallel (which first gives every rank rank 0's
        top and head)."""
        from torch.nn.parallel import DistributedDataParallel

        self._part = TrainedPart(student)
        return DistributedDataParallel(self._part)

    @torch.no_grad()
    def finish(self, loss_terms: dict[str, float]) -> dict[str, float]:
        """After the step's last optimiser step: RuntimeError unless every rank holds the same
        weights (what DDP promises); every rank then takes rank 0's buffers (BatchNorm's
        running statistics, which each rank updated from its own last batch). -> the loss
        terms averaged over the ranks (each rank's are over its share, of equal size)."""
        import torch.distributed as dist

        part = self._part
        flat = torch.cat([p.detach().reshape(-1).double() for p in part.parameters()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        gap = (flat - ref).abs().max().reshape(1)
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
        if float(gap) > 0:
            raise RuntimeError(f"after the distributed base step the ranks' weights differ by up to {float(gap):.3g}: "
                               "the gradients were not averaged; nothing was saved")
        for b in part.buffers():
            dist.broadcast(b, 0)
        names = list(loss_terms)
        mean = torch.tensor([loss_terms[k] for k in names], dtype=torch.float64, device=flat.device)
        dist.all_reduce(mean)
        self._part = None
        return dict(zip(names, (mean / self.world.size).tolist()))


__all__ = ["DdpStep", "TrainedPart", "World", "barrier", "process_group", "world_from_env"]
