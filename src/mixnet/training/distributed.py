"""Where training runs: the device, and the processes of a ``torchrun`` launch (rank, world size).

Every helper here is a no-op in a single process, so the loop calls them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..errors import MixNetError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_runtime(device: str = "auto", threads: Optional[int] = None) -> Runtime:
    """The device (``auto``: a GPU if there is one) and, under ``torchrun``, the process group."""
    if threads:
        torch.set_num_threads(threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MixNetError("device cuda requested but no GPU is available")
    torch_device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    return Runtime(torch_device, rank, world_size, local_rank)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce(values: List[float], runtime: Runtime, op=None) -> List[float]:
    """``values`` summed (or reduced by ``op``) over all processes."""
    if not runtime.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def any_process(flags: List[bool], runtime: Runtime) -> List[bool]:
    """Each flag true if it is true in any process, so every process takes the same branch."""
    return [bool(v) for v in all_reduce([float(f) for f in flags], runtime,
                                        dist.ReduceOp.MAX if runtime.distributed else None)]


def average_buffers(model: nn.Module, runtime: Runtime) -> None:
    """Average BatchNorm statistics over processes (each saw different batches) before evaluation."""
    if not runtime.distributed:
        return
    for b in model.buffers():
        if b.is_floating_point():
            dist.all_reduce(b, op=dist.ReduceOp.SUM)
            b.div_(runtime.world_size)


def rng_state(runtime: Runtime) -> Dict[str, Any]:
    state: Dict[str, Any] = {"torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def set_rng_state(state: Dict[str, Any], runtime: Runtime) -> None:
    torch.set_rng_state(state["torch"])
    if runtime.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], runtime.device)
