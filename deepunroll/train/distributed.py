"""Process-group helpers for `torchrun --nproc_per_node=N scripts/train.py ...` (DistributedDataParallel).

Without torchrun's environment (WORLD_SIZE unset or 1) every helper is a no-op for one process.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on rank 0, the only process that logs, writes checkpoints and figures."""
    return rank() == 0


def init_from_env(device: torch.device) -> torch.device:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); returns this rank's device."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast(value):
    """rank 0's ``value`` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_over_ranks(*values: float) -> list[float]:
    """Element-wise sums of Python floats over all ranks."""
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()
