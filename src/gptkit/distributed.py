"""Data-parallel (DDP) and sharded (FSDP2) training through PyTorch's own engine.

`torchrun --nproc_per_node=N -m gptkit train ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
`init` reads them and joins the process group (`nccl` on CUDA, `gloo` on CPU). Without
them everything here is a no-op, so one code path serves 1 and N processes.

FSDP uses `fully_shard` (FSDP2): each Transformer block and then the root are sharded,
so parameters, gradients and optimizer state are split across ranks; checkpoints are
gathered into full (unsharded) tensors so that the saved model directory is the same as
a single-process run's, and `transformers` still opens it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


T = TypeVar("T")
SINGLE = DistInfo()  # one process, no process group


def init(device_name: str | None = "auto") -> DistInfo:
    """Join the process group torchrun describes, once; a single process gets DistInfo()."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return SINGLE
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name in (None, "auto", "cuda")
        if use_cuda:
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return info


def launch(body: Callable[[Any, DistInfo, bool], T], cfg: Any, progress: bool) -> T:
    """Run `body(cfg, info, progress)` inside the process group torchrun describes (if any),
    with progress shown by rank 0 only, and leave the group however it ends."""
    info = init(cfg.device)
    try:
        return body(cfg, info, progress and info.is_main)
    finally:
        shutdown(info)


def device_for(info: DistInfo, device: torch.device) -> torch.device:
    """Each rank drives its own GPU."""
    if info.enabled and device.type == "cuda":
        return torch.device("cuda", info.local_rank)
    return device


def wrap(model: torch.nn.Module, info: DistInfo, device: torch.device, fsdp: bool,
         dtype: torch.dtype) -> torch.nn.Module:
    """The module the loop calls: DDP, FSDP2-sharded (in place), or the model itself."""
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) \
            if device.type == "cuda" and dtype != torch.float32 else MixedPrecisionPolicy()
        for block in model.transformer.h:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
        return model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def no_sync(module: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """Skip the gradient all-reduce on accumulation micro-steps (DDP and FSDP2)."""
    if sync:
        return nullcontext()
    if hasattr(module, "no_sync"):  # DDP
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        return _ReenableSync(module)
    return nullcontext()


class _ReenableSync(AbstractContextManager):
    def __init__(self, module: Any) -> None:
        self.module = module

    def __exit__(self, *exc: Any) -> None:
        self.module.set_requires_gradient_sync(True)


def mean(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Average a scalar tensor over ranks."""
    if info.enabled:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= info.world_size
    return value


def total(value: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum a tensor over ranks."""
    if info.enabled:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def full_model_state(model: torch.nn.Module, fsdp: bool) -> dict[str, torch.Tensor]:
    """Unsharded parameters on CPU (a collective under FSDP: every rank must call it)."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict()


def full_optimizer_state(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                         fsdp: bool) -> dict[str, Any]:
    """The optimizers' state in one dict keyed by parameter name, gathered: loadable by any
    world size (and split back among the same optimizers by `load_optimizer_state`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizers, options=options)


def load_optimizer_state(model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
                         state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizers, state, options=StateDictOptions(full_state_dict=True))


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
