"""Dequantize-in-GEMV for weight-quantized draft tiers: y = x @ dequant(W)^T (+ bias) for 1-16 rows.

A decode or verify step of a draft tier reads every weight once for a few tokens, so its cost is
the weight bytes: int8 halves them, int4 quarters them (plus 1/32 for scales and zeros at group
128). Each kernel reads the packed weight once and dequantizes in registers; nothing is expanded
in memory. Formats (computed at load, round to nearest):

- int8, per output channel, symmetric: W[n, k] ~ q[n, k] * scale[n]; q int8 [N, K] in -127..127,
  scale [N] in the compute dtype. The scale factors out of the dot product: applied once per row.
- int4, groups of `group` (32, 64 or 128) along K, asymmetric: W[n, k] ~ (q[n, k] - zero[n, g]) *
  scale[n, g] with g = k // group; q in 0..15, two per uint8 (even k in the low nibble, k + 1 in the
  high one), [N, groups * group / 2] (K padded with zeros to whole groups); scale, zero
  [N, groups] in the compute dtype. The zero point is fractional: each group's grid runs exactly
  from its minimum to its maximum, so a group that already is a 16-level grid comes back exactly.
  A GGUF Q4_0/Q4_1 model's 32-weight blocks are such grids: at group 32 the int4 copy of the
  embedded SmolLM2 (Q4_1) is its weights exactly in float32 (relative error 0.006 in bf16, where
  the scales round), against 0.082 with an integer zero point over a range widened to include 0.

Dispatch as kernels/gemv.py: CUDA + bf16/fp16 + <= 16 rows -> Triton, else the reference
(dequantize, then F.linear): CPU, float32, and prefill-sized row counts.

On CUDA (compute capability 8.0+, bf16, N a multiple of 8, K of the group and of 32) an int4 weight is held
in PyTorch's tinygemm layout instead (`torch._weight_int4pack_mm`, the kernel gpt-fast's int4
uses; our scale and fractional zero map onto its (q - 8) * scale + offset exactly up to rounding
the offset): `tinygemm_pack` converts, `int4_tinygemm` runs it, the reference is the same.

Measured on the H200 (bf16, CUDA graphs, weights rotated out of L2; microseconds for 1 / 7-8 rows):
q/k/v 12288x4096: bf16 GEMV 26.4 / 28.1, int8 17.7 / 20.4, int4 tinygemm 17.2 / 33.0 (the Triton
kernel 25.9 / 27.8); gate/up 22016x4096: bf16 45.2 / 46.0, int8 27.9 / 35.3, tinygemm 27.4 / 54.7;
down 4096x11008: bf16 24.0 / 28.5, int8 20.3 / 24.2, tinygemm 16.1 / 30.0 (Triton 29.8 / 43.8).
tinygemm takes decode steps to ~0.65x bf16 but costs ~1.2x bf16 at 7-16 rows (it tiles M by 16);
neither int4 path is near its byte floor (6.3 µs for q/k/v): the Triton kernel is bound by its
unpacking (~1 TB/s: shift/mask, a float build from the exponent bits, multiply-adds per weight, a
register join into k order), and a layout of eight codes per int32 word with the scale folded per
word (tried: one shift, one and-or, one FMA per weight) was no faster for one row and 2.5x slower
under tl.dot. What would fix it: converting two nibbles per instruction (lop3/prmt inline
assembly, as Marlin-style kernels do).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import tl, triton, use_pdl, use_triton
from . import gemv  # int8 runs the bf16 GEMV kernel, with its per-row scale applied once per output
from .gemv import MAX_ROWS
GROUP_SIZES = (32, 64, 128)  # powers of two: a kernel block holds whole groups


# ----------------------------------------------------------------------------- formats (PyTorch)

def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 of w [N, K]: (q int8 [N, K], scale [N] in w's dtype)."""
    wf = w.float()
    scale = (wf.abs().amax(1) / 127).to(w.dtype)
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)  # all-zero row: q = 0
    q = (wf / s[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(scale.dtype)


def check_group_size(group: int) -> None:
    if group not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES} (quant_group_size), got {group}")


def quantize_int4(w: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grouped asymmetric int4 of w [N, K]: (packed uint8 [N, G*group/2], scale [N, G], zero [N, G]).

    Each group's 16 levels span its own [min, max] (zero = -min / scale, not rounded); a constant
    group's range is widened to include 0, so it still has a step. K is padded to whole groups;
    the padding enters no group's range, and its codes are never read (the reference drops them,
    the kernel masks x past K). Codes round against the stored (compute-dtype) scale and zero.
    """
    check_group_size(group)
    n, k = w.shape
    groups = -(-k // group)
    pad = groups * group - k
    wf = w.float()
    lo = F.pad(wf, (0, pad), value=float("inf")).view(n, groups, group).amin(2)
    hi = F.pad(wf, (0, pad), value=float("-inf")).view(n, groups, group).amax(2)
    flat = hi == lo
    lo, hi = torch.where(flat, lo.clamp(max=0), lo), torch.where(flat, hi.clamp(min=0), hi)
    scale = ((hi - lo) / 15).to(w.dtype)
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # all-zero group: q = zero = 0
    zero = (-lo / s).to(w.dtype)
    q = (F.pad(wf, (0, pad)).view(n, groups, group) / s[..., None] + zero.float()[..., None]).round().clamp(0, 15)
    q = q.to(torch.uint8).view(n, groups * group)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale, zero


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int, group: int) -> torch.Tensor:
    """[N, k] in scale's dtype: (q - zero) * scale per group, the padding dropped."""
    n, groups = scale.shape
    q = torch.stack((packed & 15, packed >> 4), -1).view(n, groups, group).float()
    w = (q - zero.float()[..., None]) * scale.float()[..., None]
    return w.view(n, groups * group)[:, :k].to(scale.dtype)


def int8_gemv_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, dequantize_int8(q, scale), bias)


def int4_gemv_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                        bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, dequantize_int4(packed, scale, zero, x.shape[-1], group), bias)


# ----------------------------------------------------------------------------- Triton

if triton is not None:

    @triton.jit
    def _int4_gemv_kernel(X, Q, S, Z, B, Y, M, N, K, KB, sxm, sqn, ssn, sym,
                          GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
                          DOT: tl.constexpr, HAS_BIAS: tl.constexpr):
        H: tl.constexpr = GROUP // 2  # bytes of one group
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        j = tl.arange(0, H)
        n_ok = n < N
        if DOT:
            acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        else:  # per-lane partial sums, reduced once at the end (not once per group)
            acc2 = tl.zeros([BLOCK_N, GROUP], tl.float32)
        for b0 in range(0, KB, H * GROUPS):
            for gg in tl.static_range(GROUPS):
                # masks on the byte index (contiguous, KB a multiple of 16) keep the loads vectorized
                byte = b0 + gg * H + j
                b_ok = byte < KB
                p = tl.load(Q + n[:, None] * sqn + byte[None, :], mask=n_ok[:, None] & b_ok[None, :], other=0).to(tl.int32)
                # nibble -> float32 without an int-to-float conversion: the bits of 2^23 + q, minus 2^23
                lo = ((p & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                hi = ((p >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
                g = (b0 + gg * H) // H
                g_ok = n_ok & (tl.full([BLOCK_N], b0 + gg * H, tl.int32) < KB)
                s = tl.load(S + n * ssn + g, mask=g_ok, other=0.0).to(tl.float32)
                z = tl.load(Z + n * ssn + g, mask=g_ok, other=0.0).to(tl.float32)
                # the group in natural k order: lo and hi nibbles interleaved, x read contiguously
                kk = 2 * (b0 + gg * H) + tl.arange(0, GROUP)
                q = tl.reshape(tl.join(lo, hi), (BLOCK_N, GROUP))
                if DOT:  # dequantize, then tensor cores
                    x = tl.load(X + m[:, None] * sxm + kk[None, :], mask=(m[:, None] < M) & (kk < K)[None, :], other=0.0)
                    w = (q - z[:, None]) * s[:, None]
                    acc += tl.dot(x, tl.trans(w.to(x.dtype)))
                else:
                    x = tl.load(X + kk, mask=kk < K, other=0.0).to(tl.float32)
                    acc2 += (q - z[:, None]) * (s[:, None] * x[None, :])
        if DOT:
            if HAS_BIAS:
                acc += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(Y + m[:, None] * sym + n[None, :], acc.to(Y.dtype.element_ty), mask=(m[:, None] < M) & n_ok[None, :])
        else:
            out = tl.sum(acc2, 1)
            if HAS_BIAS:
                out += tl.load(B + n, mask=n_ok, other=0.0).to(tl.float32)
            tl.store(Y + n, out.to(Y.dtype.element_ty), mask=n_ok)


def _check_rows(name: str, x: torch.Tensor, k: int) -> None:
    if x.dim() != 2 or x.shape[0] > MAX_ROWS or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"{name} takes x [<= {MAX_ROWS}, {k}] with contiguous rows, got {tuple(x.shape)}")


def int8_gemv_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                     block_k: int | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16) times the int8 weight q [N, K] (scale [N]) -> [M, N] in x's dtype."""
    n, k = q.shape
    _check_rows("int8_gemv_triton", x, k)
    if q.stride(1) != 1 or scale.shape != (n,):
        raise ValueError(f"int8_gemv_triton takes q [N, K] with contiguous rows and scale [N], got "
                         f"{tuple(q.shape)} and {tuple(scale.shape)}")
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # best of a sweep on the H200 over the 7B shapes: one row FMA, several tl.dot
    block_n, warps, bk, dot = (4, 4, 2048, False) if m == 1 else (32, 4, 512, True)
    pdl = use_pdl(x, n * k)
    gemv._gemv_kernel[(triton.cdiv(n, block_n),)](
        x, q, scale, bias if bias is not None else scale, y, m, n, k, x.stride(0), q.stride(0), y.stride(0),
        BLOCK_M=MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k or bk, DOT=dot, SCALED=True, HAS_BIAS=bias is not None,
        PDL=pdl, launch_pdl=pdl, num_stages=3, num_warps=warps)
    return y


def int4_gemv_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                     bias: torch.Tensor | None = None, groups_per_step: int | None = None) -> torch.Tensor:
    """x [M, K] (M <= 16) times the int4 weight (packed [N, G*group/2], scale/zero [N, G]) -> [M, N]."""
    check_group_size(group)
    n, groups = scale.shape
    k = x.shape[-1]
    _check_rows("int4_gemv_triton", x, k)
    if (packed.shape != (n, groups * group // 2) or zero.shape != scale.shape or groups != -(-k // group)
            or packed.stride(1) != 1 or scale.stride(1) != 1 or zero.stride() != scale.stride()):
        raise ValueError(f"int4_gemv_triton: packed {tuple(packed.shape)}, scale {tuple(scale.shape)}, zero "
                         f"{tuple(zero.shape)} do not describe K={k} in groups of {group}")
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # rows per program, groups per loop step (unrolled), warps: best of a sweep on the H200 over the 7B shapes
    block_n, per_step, warps, dot = (32, 4, 8, False) if m == 1 else (32, 4, 4, True)
    _int4_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, packed, scale, zero, bias if bias is not None else scale, y, m, n, k, packed.shape[1], x.stride(0),
        packed.stride(0), scale.stride(0), y.stride(0), GROUP=group, BLOCK_M=MAX_ROWS, BLOCK_N=block_n,
        GROUPS=groups_per_step or per_step, DOT=dot, HAS_BIAS=bias is not None, num_stages=2, num_warps=warps)
    return y


def tinygemm_supported(w: torch.Tensor, group: int) -> bool:
    """Whether the weight w [N, K] (bf16, on a GPU) can be held and multiplied in tinygemm's layout."""
    n, k = w.shape
    return (w.is_cuda and w.dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int4pack_mm")
            and torch.cuda.get_device_capability(w.device) >= (8, 0) and n % 8 == 0 and k % group == 0 and k % 32 == 0)


def _inner_k_tiles(k: int, group: int) -> int:
    """tinygemm's K tiling: 2 at group 32, else 8 (best on the H200), the largest that divides k / 16."""
    for tiles in ((2,) if group == 32 else (8, 4, 2)):
        if k % (16 * tiles) == 0:
            return tiles
    return 2


def tinygemm_scales(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """scale/zero [N, G] -> tinygemm's [G, N, 2]: (q - zero) * scale = (q - 8) * scale + (8 - zero) * scale."""
    s, z = scale.float(), zero.float()
    return torch.stack((s, (8 - z) * s), -1).transpose(0, 1).contiguous().to(scale.dtype)


def tinygemm_pack(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, k: int, group: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 format -> (tinygemm's packed weight, its scales_and_zeros), on packed's (CUDA) device."""
    n = packed.shape[0]
    codes = torch.stack((packed & 15, packed >> 4), -1).view(n, -1)[:, :k]
    pairs = (codes[:, 0::2] << 4) | codes[:, 1::2]  # tinygemm: the even k in the high nibble
    return torch._convert_weight_to_int4pack(pairs.contiguous(), _inner_k_tiles(k, group)), tinygemm_scales(scale, zero)


def int4_tinygemm(x: torch.Tensor, weight: torch.Tensor, scales_and_zeros: torch.Tensor, group: int,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ the tinygemm-packed int4 weight (+ bias): any row count (decode, verify, prefill)."""
    y = torch._weight_int4pack_mm(x.reshape(-1, x.shape[-1]), weight, group, scales_and_zeros)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])


def _triton_rows(x: torch.Tensor, *weights: torch.Tensor) -> int | None:
    """Rows of x when the Triton path applies (CUDA, bf16/fp16, <= 16 rows), else None."""
    rows = x.numel() // x.shape[-1]
    ok = rows <= MAX_ROWS and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and use_triton(x, *weights)
    return rows if ok else None


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, dequantize_int8(q, scale), bias) for x [..., K]; Triton for decode/verify on CUDA."""
    rows = _triton_rows(x, q)
    if rows is None:
        return int8_gemv_reference(x, q, scale, bias)
    return int8_gemv_triton(x.reshape(rows, x.shape[-1]), q, scale, bias).view(*x.shape[:-1], q.shape[0])


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, dequantize_int4(...), bias) for x [..., K]; Triton for decode/verify on CUDA."""
    rows = _triton_rows(x, packed)
    if rows is None:
        return int4_gemv_reference(x, packed, scale, zero, group, bias)
    return int4_gemv_triton(x.reshape(rows, x.shape[-1]), packed, scale, zero, group, bias).view(*x.shape[:-1], scale.shape[0])
