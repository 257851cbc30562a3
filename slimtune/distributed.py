"""Data-parallel training under torchrun (`torchrun --nproc_per_node N -m slimtune fit ...`).

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; with WORLD_SIZE > 1 the process group is initialised from them
(NCCL when training on CUDA, gloo on CPU). Every rank draws the same global batch of N x `batch_size` windows
from the shared seed and trains on its own slice, so a run's data does not depend on how it is split. SLiM
calls backward once per chunk, so gradients are not reduced per backward (as DistributedDataParallel's hooks
would): each rank accumulates its step's gradients locally, and they are averaged over the ranks in one
all-reduce per optimizer step, before clipping and the update. All ranks then take the same step. Only rank 0
writes logs, progress, the run state and the export; the others follow. Without torchrun nothing changes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError, SlimtuneError


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def launched() -> Group:
    """This process's place in a torchrun launch, from the environment (rank 0 of 1 without torchrun)."""
    try:
        return Group(
            int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
        )
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None


def join(device: torch.device) -> Group:
    """Initialise the process group for a torchrun launch (once); returns the group. No-op for one process."""
    group = launched()
    if group.active and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend)
        except (RuntimeError, ValueError) as e:
            raise SlimtuneError(
                f"cannot join the torchrun process group ({backend}: {str(e).splitlines()[0]}): "
                "launch with torchrun, which sets MASTER_ADDR and MASTER_PORT"
            ) from None
    return group


def rank_device(device: torch.device, group: Group) -> torch.device:
    """Each rank's own GPU: cuda:LOCAL_RANK when training on CUDA under torchrun."""
    if device.type == "cuda" and group.active:
        if group.local_rank >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK {group.local_rank} but only {torch.cuda.device_count()} GPU(s) here: "
                "start torchrun with at most one process per GPU (its nproc_per_node)"
            )
        torch.cuda.set_device(group.local_rank)
        return torch.device("cuda", group.local_rank)
    return device


def _ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Rank 0's weights on every rank (they start equal anyway: same checkpoint or same seed)."""
    if _ready():
        for t in model.state_dict().values():
            dist.broadcast(t, src=0)


def average_gradients(model: torch.nn.Module) -> None:
    """Mean of every parameter's .grad over the ranks, in one all-reduce of one flat buffer."""
    if not _ready():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # a rank whose batch never touched a parameter still takes part
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def _reduce(value: float, op, device: torch.device) -> float:
    if not _ready():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def mean(value: float, device: torch.device) -> float:
    return _reduce(value, dist.ReduceOp.SUM, device) / (dist.get_world_size() if _ready() else 1)


def agree_min(value: int, device: torch.device) -> int:
    """The smallest value over the ranks (e.g. the chunk size every rank can afford)."""
    return int(_reduce(float(value), dist.ReduceOp.MIN, device))


def barrier() -> None:
    if _ready():
        dist.barrier()


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
