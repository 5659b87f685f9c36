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


# Programmatic dependent launch (Hopper and newer): a kernel launched with it may start while the
# kernel before it drains, fetch what no earlier kernel writes (its weights), and only then wait
# (`griddepcontrol.wait`) for the earlier kernels' outputs. A small model's decode step is a chain
# of ~170 kernels of a few microseconds each, so the ramp and tail each one costs are much of it.
# `set_pdl(False)` turns it off (benchmarks' A/B); the output is the same either way.
_PDL = {"on": os.environ.get("TRIFORCE_PDL", "1") != "0"}


def set_pdl(on: bool) -> None:
    """Launch the decode-step kernels with programmatic dependent launch where the GPU has it."""
    _PDL["on"] = bool(on)


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> int:
    return torch.cuda.get_device_capability(device_index)[0]


PDL_MAX_BYTES = 32 << 20


def use_pdl(t: torch.Tensor, nbytes: int = 0) -> bool:
    """Whether a kernel on t's device reading about `nbytes` launches with programmatic dependent
    launch: sm90+, compiled Triton, and a kernel short enough that its ramp and tail matter. On the
    H200 it made a 0.5B decode step 8% faster, but a 7B step at 32K (GEMVs of 32-180 MB, attention
    over 0.5 GB) 2-4% slower, so kernels reading PDL_MAX_BYTES or more launch plainly."""
    return (_PDL["on"] and nbytes < PDL_MAX_BYTES and HAS_TRITON and t.is_cuda and not interpreting()
            and _capability(t.device.index if t.device.index is not None else torch.cuda.current_device()) >= 9)


if triton is not None:

    @triton.jit
    def pdl_wait(PDL: tl.constexpr):
        """Under programmatic dependent launch: wait until the kernels before this one are done and
        their writes visible, then let the next kernel start. Every read of an activation or cache,
        and every store, comes after this; only weights may be read before it."""
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()


if triton is not None:

    @triton.jit
    def rotate_half(lo, hi, c_lo, c_hi, s_lo, s_hi):
        """RoPE of a head's paired halves (rotate-half layout), float32 math: (lo', hi')."""
        lo = lo.to(tl.float32)
        hi = hi.to(tl.float32)
        return lo * c_lo - hi * s_lo, hi * c_hi + lo * s_hi


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
