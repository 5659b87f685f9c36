"""Shared bits of the Triton kernels: is Triton usable for these tensors, and launch sizing."""
from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # no triton wheel for this platform, or a broken install
    triton = tl = None
    HAS_TRITON = False


# Triton decides JIT vs interpreter when a kernel is decorated, i.e. when these modules are imported.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return INTERPRET


def use_triton(*tensors: torch.Tensor) -> bool:
    """Triton runs on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (slow: tests only)."""
    return HAS_TRITON and (interpreting() or all(t.is_cuda for t in tensors))


def check_head_dim(d: int) -> None:
    if d < 16 or d & (d - 1):
        raise ValueError(f"the Triton kernels need a power-of-two head_dim >= 16, got {d}")


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def target_programs(t: torch.Tensor) -> int:
    """How many programs keep the GPU busy (2 waves of SMs); few in the interpreter (it is serial)."""
    if t.is_cuda and not interpreting():
        return 2 * _sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 4


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
