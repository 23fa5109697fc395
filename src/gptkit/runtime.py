"""Device and precision choices shared by training, generation and serving."""

from __future__ import annotations

import contextlib

import torch

from gptkit.errors import GptkitError, closest

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def pick_device(name: str | None = "auto") -> torch.device:
    """The best available device for 'auto', else the one asked for (checked)."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GptkitError(f"--device '{name}' is not a device; expected auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GptkitError(f"--device {name} was asked for but this machine has no CUDA GPU; use --device cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GptkitError(f"--device {name} was asked for but Apple MPS is not available; use --device cpu.")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on GPUs that support it and fp32 elsewhere."""
    if name in (None, "", "auto"):
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise GptkitError(f"--dtype '{name}' is unknown{closest(name, tuple(DTYPES))}; expected float32, bfloat16 or float16.")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise GptkitError("--dtype float16 is not supported on CPU; use bfloat16 or float32.")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def tune_allocator() -> bool:
    """Keep freed memory in glibc's heap instead of returning it to the OS each step.

    A training step frees and re-allocates the same large activation buffers; by default
    glibc serves them with fresh mmaps that page-fault on first touch, a large part of a
    CPU step (docs/performance.md). Disabling mmap for large blocks and never trimming
    the heap keeps those pages mapped. Returns False where glibc is not the allocator.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
