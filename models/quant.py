"""Weight-only quantized views of a Transformer, for draft tiers.

Only the target's distribution has to be exact: every draft token is verified against it. So a
draft tier may read cheaper weights, and a decode step of a draft is bound by its weight bytes
(7B: 13.5 of ~16 GB per retrieval-tier step). `quantized_view` builds, at load time and from the
target's own weights, a model that shares the target's embedding, norms and rotary tables and
holds round-to-nearest int8 (per output channel) or int4 (grouped) copies of the fused q/k/v (its
bias shared), o, fused gate/up, down and, optionally, the LM head. The embedding lookup stays in
the compute dtype (with tied embeddings the head is a quantized copy; the lookup is not).
Under tensor parallelism each rank quantizes its own shard; the all-reduces are the target's.
Formats and kernels: kernels/quant_gemv.py.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from triforce.kernels.quant_gemv import (check_group_size, dequantize_int4, dequantize_int8, int4_gemv, int4_tinygemm,
                                         int8_gemv, quantize_int4, quantize_int8, tinygemm_pack, tinygemm_supported)
from triforce.models.llama import Attention, Block, FeedForward, ModelArgs, Transformer, add_norm, swiglu

WEIGHT_FORMATS = ("bf16", "int8", "int4")  # "bf16": the compute dtype, i.e. the target's own weights (no copy)


def check_weights(key: str, weights: str) -> None:
    """Raise a clear error for an unknown weight format in config key `key`."""
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"{key}={weights!r} is not a weight format: choose one of {', '.join(WEIGHT_FORMATS)} "
                         f"(bf16 = the target's own weights in the compute dtype)")


def quantizes_head(quantize_head: bool | str, weights: str) -> bool:
    """Whether a `weights` draft quantizes its LM head: `quant_head` true / false, or "auto".

    auto: int8 yes, int4 no. Measured on SmolLM2-135M (768 tokens of prose, teacher-forced, vs the
    target's distribution): int8 TV 0.032 with the head quantized vs 0.025 exact; int4 0.345 vs
    0.279 (top-1 agreement 0.54 vs 0.69). A 7B's head is 2% of its weights (int4: +5% step bytes kept
    exact), a small model's tied head a fifth of them, and int4 rounding of the head costs the most.
    """
    if quantize_head == "auto":
        return weights == "int8"
    if not isinstance(quantize_head, bool):
        raise ValueError(f"quant_head must be true, false or auto, got {quantize_head!r}")
    return quantize_head


def refuse_quantized_target(weights: str | None) -> None:
    """The target's weights define the output distribution: quantizing them would change it."""
    if weights not in (None, "bf16"):
        raise ValueError(f"the target cannot be quantized (got {weights!r}): its weights define the output "
                         f"distribution that speculation reproduces exactly; only draft tiers may be quantized, "
                         f"with cache.weights (the middle tier) and draft.weights (the tiny tier)")


class QuantLinear(nn.Module):
    """y = x @ dequant(W)^T + bias for a weight quantized once at construction (int8 or int4).

    An int4 weight on a CUDA GPU that tinygemm serves (bf16, sm80+, N a multiple of 8, K of the
    group and of 32) is held only in tinygemm's layout (`tinygemm` True): its one-row step is ~0.65x the bf16
    GEMV's on the H200, where the Triton kernel is ~1.0x; other int4 weights keep our layout."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int = 128):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"QuantLinear supports 8 or 4 bits, got {bits}")
        self.bits, self.group_size = bits, group_size
        self.out_features, self.in_features = weight.shape
        with torch.no_grad():
            if bits == 8:
                q, scale = quantize_int8(weight.detach())
                zero = None
            else:
                q, scale, zero = quantize_int4(weight.detach(), group_size)
        self.tinygemm = bits == 4 and tinygemm_supported(weight, group_size)
        if self.tinygemm:  # scale and zero live on inside tinygemm's [G, N, 2] table
            q, scale = tinygemm_pack(q, scale, zero, self.in_features, group_size)
            zero = None
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("zero", zero, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)  # shared, not copied
        self._cpu_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            # no dequantize kernel on CPU, and dequantizing per call costs ~6x the matmul: CPU runs
            # (tests, studies) keep the dequantized weight; the GPU never does (there bytes matter)
            if self._cpu_weight is None:
                self._cpu_weight = self.dequantize()
            return F.linear(x, self._cpu_weight, self.bias)
        if self.bits == 8:
            return int8_gemv(x, self.qweight, self.scale, self.bias)
        if self.tinygemm:
            return int4_tinygemm(x, self.qweight, self.scale, self.group_size, self.bias)
        return int4_gemv(x, self.qweight, self.scale, self.zero, self.group_size, self.bias)

    def dequantize(self) -> torch.Tensor:
        """The weight this layer computes with, in the compute dtype (tests, error measurements)."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scale)
        if self.tinygemm:  # the identity through the kernel: its rows are the dequantized weight's columns
            eye = torch.eye(self.in_features, dtype=self.scale.dtype, device=self.scale.device)
            return int4_tinygemm(eye, self.qweight, self.scale, self.group_size).t().contiguous()
        return dequantize_int4(self.qweight, self.scale, self.zero, self.in_features, self.group_size)

    @property
    def nbytes(self) -> int:
        """Bytes this layer holds (and a step reads): codes + scales (+ zeros); the shared bias excluded."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero) if t is not None)


def linear_bytes(out_features: int, in_features: int, bits: int, group_size: int, dtype_bytes: int) -> int:
    """Bytes of one QuantLinear from its shape alone (what the memory planner counts)."""
    if bits == 8:
        return out_features * in_features + out_features * dtype_bytes
    groups = math.ceil(in_features / group_size)
    return out_features * groups * group_size // 2 + 2 * out_features * groups * dtype_bytes


def quant_weight_bytes(args: ModelArgs, weights: str, group_size: int = 128, quantize_head: bool | str = "auto",
                       dtype_bytes: int = 2) -> int:
    """Bytes of the quantized copy `quantized_view` makes of a model with shapes `args` (0 for bf16).

    7B (Llama-2), group 128: int4 3.2 GiB (3.3 with the head), int8 6.2 GiB with the head.
    """
    check_weights("weights", weights)
    if weights == "bf16":
        return 0
    quantize_head = quantizes_head(quantize_head, weights)
    bits = int(weights[3:])
    hd, d = args.head_dim, args.dim
    layer = (linear_bytes((args.n_heads + 2 * args.n_kv_heads) * hd, d, bits, group_size, dtype_bytes)
             + linear_bytes(d, args.n_heads * hd, bits, group_size, dtype_bytes)
             + linear_bytes(2 * args.intermediate_size, d, bits, group_size, dtype_bytes)
             + linear_bytes(d, args.intermediate_size, bits, group_size, dtype_bytes))
    head = linear_bytes(args.vocab_size, d, bits, group_size, dtype_bytes) if quantize_head else 0
    return args.n_layers * layer + head


class QuantAttention(Attention):
    """The target's attention layer with quantized copies of its fused q/k/v and o projections."""

    rope_in_projection = False  # its q/k/v projection is a quantized GEMV: the cache rotates and writes

    def __init__(self, attn: Attention, bits: int, group_size: int):
        nn.Module.__init__(self)
        self.tp_group, self.n_heads, self.n_kv_heads, self.head_dim = attn.tp_group, attn.n_heads, attn.n_kv_heads, attn.head_dim
        self.wqkv = QuantLinear(attn.wqkv, attn.wqkv_bias, bits, group_size)
        self.wo = QuantLinear(attn.o_proj.weight, None, bits, group_size)

    def project_qkv(self, x: torch.Tensor, delta: torch.Tensor | None, norm, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, h = add_norm(x, delta, norm)  # the fused-norm GEMVs read bf16 weights; these dequantize
        return x, self.wqkv(h)

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(x)


class QuantFeedForward(FeedForward):
    """The target's MLP with quantized copies of its fused gate/up and down projections."""

    def __init__(self, mlp: FeedForward, bits: int, group_size: int):
        nn.Module.__init__(self)
        self.tp_group = mlp.tp_group
        self.w13 = QuantLinear(mlp.w13, None, bits, group_size)
        self.w2 = QuantLinear(mlp.down_proj.weight, None, bits, group_size)

    def project_gate_up(self, x: torch.Tensor, delta: torch.Tensor | None, norm, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, h = add_norm(x, delta, norm)
        return x, self.w13(h)

    def down(self, gate_up: torch.Tensor, fused: bool = False) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        out = self.w2(swiglu(gate, up))
        if self.tp_group is not None:
            dist.all_reduce(out, group=self.tp_group)
        return out


class QuantTransformer(Transformer):
    """A draft's view of a Transformer: shared embedding, norms and rotary; quantized projections.

    Built by `quantized_view`; never a target (SpeculativeEngine refuses one as tier 0).
    """

    weights: str
    group_size: int

    def project_logits(self, x: torch.Tensor, delta: torch.Tensor, fused: bool) -> torch.Tensor:
        if isinstance(self.lm_head, QuantLinear):
            return self.lm_head(add_norm(x, delta, self.norm)[1]).float()
        return super().project_logits(x, delta, fused)

    def layer_subset(self, keep: list[int]) -> "QuantTransformer":
        draft = super().layer_subset(keep)
        draft.weights, draft.group_size = self.weights, self.group_size
        return draft

    @property
    def quantized_bytes(self) -> int:
        """Bytes of the quantized copies this view holds (shared modules excluded)."""
        return sum(m.nbytes for m in self.modules() if isinstance(m, QuantLinear))

    def step_weight_bytes(self) -> int:
        """Weight bytes one decode step reads: the quantized copies, the norms and an unquantized head."""
        head = 0 if isinstance(self.lm_head, QuantLinear) else self.lm_head.weight.numel() * self.dtype.itemsize
        norms = (2 * len(self.layers) + 1) * self.args.dim * self.dtype.itemsize
        return self.quantized_bytes + head + norms


@torch.no_grad()
def quantized_view(model: Transformer, weights: str, group_size: int = 128,
                   quantize_head: bool | str = "auto") -> Transformer:
    """`model` itself for "bf16"; else a QuantTransformer over quantized copies of its projections
    (and of its LM head as `quantizes_head` says).

    Layer by layer, so the transient float32 of quantization is one projection, not the model.
    """
    check_weights("weights", weights)
    if weights == "bf16":
        return model
    quantize_head = quantizes_head(quantize_head, weights)
    if isinstance(model, QuantTransformer):
        raise ValueError(f"model is already quantized ({model.weights}): quantize the full-precision model")
    bits = int(weights[3:])
    if bits == 4:
        check_group_size(group_size)
    view = QuantTransformer.__new__(QuantTransformer)
    nn.Module.__init__(view)
    view.args, view.context_length, view.tp_group = model.args, model.context_length, model.tp_group
    view.fused_projections = False  # the fused norm-GEMVs read full-precision weights; these dequantize
    view.embed_tokens, view.norm, view.rotary = model.embed_tokens, model.norm, model.rotary
    view.weights, view.group_size = weights, group_size
    blocks = []
    for block in model.layers:
        b = Block.__new__(Block)
        nn.Module.__init__(b)
        b.self_attn = QuantAttention(block.self_attn, bits, group_size)
        b.mlp = QuantFeedForward(block.mlp, bits, group_size)
        b.input_layernorm, b.post_attention_layernorm = block.input_layernorm, block.post_attention_layernorm
        blocks.append(b)
    view.layers = nn.ModuleList(blocks)
    view.lm_head = QuantLinear(model.lm_head.weight, None, bits, group_size) if quantize_head else model.lm_head
    return view.eval()
