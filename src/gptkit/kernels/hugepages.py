"""Weights in 2 MiB pages, so that decoding streams them at the machine's read bandwidth.

A decode step reads every weight once. With the default 4 KiB pages that is one page
table walk per 4 KiB, and inside a virtual machine each walk goes through two levels of
tables, which makes streaming a large weight measurably slower than in 2 MiB pages
(docs/performance.md). Linux backs memory with 2 MiB pages ("transparent huge pages") where a
program asks for them with `madvise`, which torch's allocator does not do by default. So
inference moves a model's tensors into one block of memory that asks for them. Embedding
tables stay where they are: a step looks up one row of them, it does not stream them.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
from torch import nn

HUGE_PAGE = 2 << 20
_ALIGN = 64  # each tensor starts on a cache line
_THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether this system gives 2 MiB pages to memory that asks for them (Linux with
    transparent huge pages set to "always" or "madvise")."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        return "[never]" not in _THP_MODE.read_text()
    except OSError:
        return False


def move_to_huge_pages(module: nn.Module, min_bytes: int = HUGE_PAGE,
                       align_anyway: bool = False) -> bool:
    """Move every dense CPU parameter and buffer of `module` into one block of memory
    backed by 2 MiB pages, in place; values, shapes and dtypes stay as they were (each
    tensor becomes contiguous). Tensors shared between modules stay shared. A tensor held
    only by embedding tables stays put.

    Returns whether it moved them into huge pages: not on systems without transparent
    huge pages, nor for modules with under `min_bytes` of tensors, where 4 KiB pages cost
    nothing. With `align_anyway` those still get one block, of ordinary memory: tensors
    mapped from a file may start at any byte, and ATen's int8 kernel faults on unaligned
    rows.
    """
    held: dict[int, tuple[torch.Tensor, list[tuple[dict, str]]]] = {}  # tensor, its places
    streamed: set[int] = set()  # tensors some module other than an embedding reads
    for owner in module.modules():
        for table in (owner._parameters, owner._buffers):
            for name, tensor in table.items():
                if _movable(tensor):
                    held.setdefault(id(tensor), (tensor, []))[1].append((table, name))
                    if not isinstance(owner, nn.Embedding):
                        streamed.add(id(tensor))
    held = {key: entry for key, entry in held.items() if key in streamed}
    sizes = {key: -(-tensor.nbytes // _ALIGN) * _ALIGN for key, (tensor, _) in held.items()}
    huge = sum(sizes.values()) >= min_bytes and huge_pages_available()
    if not (huge or align_anyway):
        return False
    block = (_huge_page_block(sum(sizes.values())) if huge
             else torch.empty(sum(sizes.values()), dtype=torch.uint8))  # 64-byte aligned
    start = 0
    for key, size in sizes.items():
        tensor, places = held.pop(key)  # held only by its modules now, so swapping frees it
        copy = block[start:start + tensor.nbytes].view(tensor.dtype).view(tensor.shape)
        with torch.no_grad():
            copy.copy_(tensor)
        start += size
        if isinstance(tensor, nn.Parameter):
            copy = nn.Parameter(copy, tensor.requires_grad)
        for table, name in places:
            table[name] = copy
    return huge


def _movable(tensor: torch.Tensor | None) -> bool:
    return (tensor is not None and tensor.device.type == "cpu"
            and tensor.layout == torch.strided and tensor.numel() > 0)


def _huge_page_block(nbytes: int) -> torch.Tensor:
    """`nbytes` of zeroed memory (uint8) that starts on a 2 MiB boundary and asks the kernel
    for 2 MiB pages. A private mapping: shared anonymous memory follows the shmem setting,
    which is usually off. The tensor keeps the mapping alive."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes]
