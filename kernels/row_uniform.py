"""Counter-based uniforms: one random stream per row of a batch, every row drawn by one launch.

Each sequence of a batch keeps its own random stream, so that a row's draws never depend on which
other rows share its batch. With one torch.Generator per row that costs a launch per row and draw:
at 32 rows a drafting tier's host time per step then outweighs its step on the GPU. Here a row's
stream is a key (two 32-bit words derived from its seed) and a counter on the device: element j of
a draw is a keyed hash of counter + j, and the counter then moves past what was drawn. The hash is
integer arithmetic, so the Triton kernel and the numpy reference are bitwise equal: CPU and GPU,
eager and graphed steps, one row alone or in any batch, draw the same numbers from the same seed.
"""
from __future__ import annotations

import numpy as np
import torch

from ._common import tl, triton, use_triton

M32 = 0xFFFFFFFF
MUL_A, MUL_B = 0x7FEB352D, 0x31848BAB  # odd 32-bit multipliers of the mixing rounds
BLOCK = 1024


def seed_key(seed: int) -> tuple[int, int]:
    """Two 32-bit key words of a seed (splitmix64), so that nearby seeds give unrelated streams."""
    z = (seed + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    z ^= z >> 31
    return z & M32, z >> 32


def _mix_reference(x: np.ndarray, mul: int) -> np.ndarray:
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(mul)  # uint32 arithmetic wraps, as the kernel's
    return x ^ (x >> np.uint32(15))


def row_uniform_reference(keys: torch.Tensor, counters: torch.Tensor, n: int) -> torch.Tensor:
    """Uniforms [B, n] in [0, 1) (multiples of 2**-24, float32): row b hashes counters[b] + 0 .. n-1
    under keys[b] (int64 [B, 2], 32-bit words). In numpy's uint32 arithmetic: the kernel's own
    integer semantics, and on a CPU far fewer passes over the row than int64 torch ops with masks."""
    idx = counters.cpu().numpy().astype(np.uint64)[:, None] + np.arange(n, dtype=np.uint64)
    lo, hi = (idx & np.uint64(M32)).astype(np.uint32), (idx >> np.uint64(32)).astype(np.uint32)
    k = keys.cpu().numpy().astype(np.uint32)
    k0, k1 = k[:, :1], k[:, 1:]
    with np.errstate(over="ignore"):
        h = _mix_reference(lo ^ k0, MUL_A)
        h = _mix_reference(h ^ hi ^ k1, MUL_B)
        h = _mix_reference(h + k0, MUL_A)
    h = h ^ (h >> np.uint32(16))
    return torch.from_numpy((h >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)).to(counters.device)


if triton is not None:

    @triton.jit
    def _mix(x, mul):
        x = x ^ (x >> 16)
        x = x * mul
        return x ^ (x >> 15)

    @triton.jit
    def _row_uniform_kernel(KEYS, COUNTERS, OUT, n, s_out, BLOCK_N: tl.constexpr, MUL_1: tl.constexpr,
                            MUL_2: tl.constexpr):
        row = tl.program_id(0)
        j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        idx = tl.load(COUNTERS + row) + j.to(tl.int64)
        lo = (idx & 0xFFFFFFFF).to(tl.uint32)
        hi = ((idx >> 32) & 0xFFFFFFFF).to(tl.uint32)
        k0 = tl.load(KEYS + 2 * row).to(tl.uint32)
        k1 = tl.load(KEYS + 2 * row + 1).to(tl.uint32)
        mul_a = tl.full([BLOCK_N], MUL_1, tl.uint32)
        mul_b = tl.full([BLOCK_N], MUL_2, tl.uint32)
        h = _mix(lo ^ k0, mul_a)
        h = _mix(h ^ hi ^ k1, mul_b)
        h = _mix(h + k0, mul_a)  # uint32 addition wraps, as the reference's & M32
        h = h ^ (h >> 16)
        u = (h >> 8).to(tl.float32) * (1.0 / 16777216.0)
        tl.store(OUT + row * s_out + j, u, mask=j < n)


def row_uniform_triton(keys: torch.Tensor, counters: torch.Tensor, n: int, out: torch.Tensor) -> torch.Tensor:
    """`row_uniform_reference` into `out` [B, n] (float32, contiguous rows) by one launch."""
    b = counters.shape[0]
    if out.shape != (b, n) or out.dtype != torch.float32 or out.stride(1) != 1 or not keys.is_contiguous():
        raise ValueError(f"row_uniform writes float32 [{b}, {n}] with contiguous rows from contiguous keys "
                         f"[{b}, 2], got {out.dtype} {tuple(out.shape)}")
    _row_uniform_kernel[(b, triton.cdiv(n, BLOCK))](keys, counters, out, n, out.stride(0), BLOCK_N=BLOCK,
                                                    MUL_1=MUL_A, MUL_2=MUL_B)
    return out


def row_uniform(keys: torch.Tensor, counters: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Uniforms [B, n] of the rows' streams (into `out` when given): the Triton kernel on CUDA, the
    reference elsewhere (bitwise the same numbers)."""
    if out is None:
        out = torch.empty(counters.shape[0], n, dtype=torch.float32, device=counters.device)
    if counters.is_cuda and use_triton(keys, counters, out):
        return row_uniform_triton(keys, counters, n, out)
    return out.copy_(row_uniform_reference(keys, counters, n))
