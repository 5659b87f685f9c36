"""What lives on the GPU: weights, how many target KV layers, the retrieval budget (GitHub issue 5).

Decided from shapes alone, before anything is allocated, so a run that cannot fit fails at once
with the numbers instead of an out-of-memory error mid-prefill. Weights (target + draft) must be
on the GPU; the target's KV is resident layer by layer while it fits (TriForce's `--on_chip`),
the rest goes to pinned host memory (`triforce.offload.OffloadedFullCache`) and streams through
two staging slots per forward. The retrieval draft (selected KV, chunk summaries) always stays on
the GPU, since it is read every draft step; its budget shrinks if that is what fits.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from triforce.graphs import graph_memory
from triforce.models.llama import ModelArgs
from triforce.offload import SCORE_BLOCK

GiB = 2 ** 30
MARGIN = GiB // 2  # allocator fragmentation, cuBLAS/compile workspaces: not modelled below
SELECT_BLOCK = 8192  # tokens of one layer's keys a selection reads at once (chunk summaries)


def gib(n: int | float) -> str:
    return f"{n / GiB:.1f}"


@dataclass
class MemoryPlan:
    """Where each part lives; byte counts so a run summary can say why."""

    context: int  # tokens the target's cache holds
    n_layers: int
    offload: bool  # target KV in an OffloadedFullCache
    resident_layers: int  # target KV layers on the GPU (the first ones)
    transfer_chunk: int | None  # tokens per host->GPU copy (None: whole layers)
    budget: int  # retrieval budget after fitting (0: no retrieval tier)
    requested_budget: int
    gpu_available: int
    host_available: int
    gpu_parts: dict[str, int] = field(default_factory=dict)  # GPU bytes by purpose
    host_needed: int = 0  # pinned host bytes for the offloaded layers
    notes: list[str] = field(default_factory=list)
    graph_steps: dict[str, int] = field(default_factory=dict)  # CUDA-graph step sizes counted per tier

    @property
    def offloaded_layers(self) -> int:
        return self.n_layers - self.resident_layers

    @property
    def gpu_needed(self) -> int:
        return sum(self.gpu_parts.values())

    def describe(self) -> str:
        """One paragraph for the run summary."""
        parts = ", ".join(f"{name} {gib(b)}" for name, b in self.gpu_parts.items() if b and name != "graphs")
        text = (f"Memory plan for {self.context} tokens: GPU {gib(self.gpu_needed)} of {gib(self.gpu_available)} GiB "
                f"({parts}).")
        if self.gpu_parts.get("graphs"):
            steps = ", ".join(f"{tier} {n}" for tier, n in self.graph_steps.items())
            text += (f" CUDA graph pools {self.gpu_parts['graphs'] / 2**20:.0f} MiB ({sum(self.graph_steps.values())} "
                     f"step graphs: {steps}; logits, sampling, activations and split-K workspace of each step).")
        if self.offload:
            how = f"{self.transfer_chunk}-token copies" if self.transfer_chunk else "whole-layer copies"
            text += (f" Target KV: {self.resident_layers} of {self.n_layers} layers on the GPU, {self.offloaded_layers} "
                     f"in pinned host memory ({gib(self.host_needed)} of {gib(self.host_available)} GiB), "
                     f"streamed per target forward in {how} through two staging slots.")
        else:
            text += f" Target KV: all {self.n_layers} layers on the GPU, no offloading."
        if self.budget:
            text += f" Retrieval budget {self.budget} tokens on the GPU."
        return " ".join([text] + self.notes)


def weight_memory(args: ModelArgs, dtype_bytes: int) -> int:
    """Bytes the weights occupy: what a step reads plus the embedding table (untied)."""
    return args.weight_bytes(dtype_bytes) + (0 if args.tie_word_embeddings else args.vocab_size * args.dim * dtype_bytes)


def retrieval_memory(args: ModelArgs, context: int, budget: int, chunk_size: int, dtype_bytes: int,
                     copies: bool = True, summaries: bool = True) -> int:
    """Selection indices + copies of the selected KV (`copies`) + stored chunk summaries, one mean
    key per chunk (`summaries`), all layers. A graph-ready draft over a resident store reads it in
    place (no copies); one that selects once per prompt stores no summaries."""
    if not budget:
        return 0
    selected = budget * args.kv_bytes_per_token(dtype_bytes) if copies else 0
    stored = (context // chunk_size) * args.kv_bytes_per_token(dtype_bytes) // 2 if summaries else 0
    indices = args.n_layers * args.n_kv_heads * budget * 4
    return selected + stored + indices


def _mode(offload: str | bool) -> str:
    mode = str(offload).lower()
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"offload must be auto, true or false, got {offload!r}")
    return mode


def plan_memory(args: ModelArgs, context: int, budget: int, gamma: int, draft_args: ModelArgs | None,
                dtype_bytes: int, gpu_bytes: int, host_bytes: int, offload: str | bool = "auto", *,
                chunk_size: int = 8, prefill_chunk: int = 512, new_tokens: int = 256,
                draft_cache_tokens: int = 1600, draft_owns_weights: bool = True,
                transfer_chunk: int = 16384, max_resident: int | None = None,
                selection_copies: bool = True, chunk_summaries: bool = True,
                cuda_graphs: bool = True, draft_gamma: int | None = None, quantized_bytes: int = 0,
                batch: int = 1) -> MemoryPlan:
    """Fit a run of `context` tokens into `gpu_bytes` of GPU and `host_bytes` of pinned host memory.

    offload: "false" (all KV on the GPU or refuse), "true" (offloaded cache, at least one layer
    in host memory), "auto" (offload only if the KV does not fit). budget: retrieval tokens (0 if
    the pipeline has no retrieval tier). draft_args: the tiny draft (its weights count unless
    `draft_owns_weights` is False, as for a layer-subset self-draft; its streaming cache holds
    `draft_cache_tokens`). new_tokens: generated tokens, for the tail mirror a retrieval draft
    reads every step. selection_copies: the draft copies its selected KV even over a resident
    store (False for a graph-ready policy on the GPU; an offloaded store always needs them);
    chunk_summaries: it stores chunk summaries (retrieval with reselect != "once", Quest).
    cuda_graphs: count the graph pools of each tier's captured steps (`triforce.graphs.graph_sizes`);
    draft_gamma: the retrieval tier's gamma when a tier below drafts for it (None: it is the bottom).
    quantized_bytes: the drafts' quantized weight copies (`cache.weights` / `draft.weights` int8 or
    int4; `triforce.models.quant.quant_weight_bytes`), on the GPU beside the target's weights: with
    offloading every byte of them is a byte less for resident target KV layers.
    batch: rows decoded together (every row has its own target KV, draft caches and graph rows of
    `context` tokens; weights are shared). Only offload="true" offloads a batch (every row's layers
    past the resident ones, each row with its own staging slots and mirror): a batch's target step
    then reads every row's KV over the host link, so "auto" fits rows on the GPU instead.
    Raises ValueError naming the GiB needed and available and what to change.
    """
    mode = _mode(offload)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if batch > 1 and mode == "auto":
        mode = "false"
    if context < 1 or gpu_bytes <= 0:
        raise ValueError(f"context ({context}) and gpu_bytes ({gpu_bytes}) must be positive")
    n_layers = args.n_layers
    token_layer = args.kv_bytes_per_token(dtype_bytes) // n_layers  # K+V of one token in one layer
    layer_kv = token_layer * (context + 1) * batch  # +1: FullCache's scratch slot
    weights = weight_memory(args, dtype_bytes)
    draft = 0
    if draft_args is not None:
        draft = (weight_memory(draft_args, dtype_bytes) if draft_owns_weights else 0) \
            + batch * draft_cache_tokens * draft_args.kv_bytes_per_token(dtype_bytes)
    width = 4 * args.dim + 3 * args.intermediate_size + (args.n_heads + 2 * args.n_kv_heads) * args.head_dim
    # float32 logits (and the sampling head's copies) only for the rows a step keeps: a prefill
    # chunk's forward stops before the LM head
    workspace = ((gamma + 2) * batch * args.vocab_size * (4 * 4 + 8)
                 + 2 * prefill_chunk * width * dtype_bytes  # one prefill chunk's activations
                 + (SELECT_BLOCK * args.n_kv_heads * args.head_dim * (dtype_bytes + 4) if budget else 0)
                 + MARGIN)
    # graph pools: the steps graph_sizes picks for each tier (the bottom tier decodes 1-3 tokens, a
    # verifier its gamma + 1 or + 2); a weightless lookup draft captures nothing
    steps: dict[str, tuple[ModelArgs, set[int]]] = {}
    if cuda_graphs:
        bottom = {1, 2, 3}
        steps["target"] = (args, {gamma + 1, gamma + 2} if budget or draft_args is not None else bottom)
        if budget:
            steps["retrieval"] = (args, {draft_gamma + 1, draft_gamma + 2} if draft_gamma else bottom)
        if draft_args is not None:
            steps["tiny"] = (draft_args, bottom)
    graphs = sum(graph_memory(a, sizes, dtype_bytes, batch) for a, sizes in steps.values())
    fixed = weights + draft + quantized_bytes + workspace + graphs
    if fixed > gpu_bytes:
        quant = (f", {gib(quantized_bytes)} GiB for the quantized draft weights (cache.weights / draft.weights=bf16 "
                 f"drop them)" if quantized_bytes else "")
        raise ValueError(f"the target's weights alone need {gib(weights)} GiB (plus {gib(draft)} GiB for the draft{quant} and "
                         f"{gib(workspace + graphs)} GiB of workspace and CUDA graph pools) but the GPU has {gib(gpu_bytes)} GiB: use a bigger GPU "
                         f"or a smaller model (offloading moves only the KV cache)")

    tail_tokens = new_tokens + 2 * gamma + 2 + chunk_size

    def plan(offloaded: bool, resident: int, piece: int | None, fitted: int, extra: dict[str, int]) -> MemoryPlan:
        # per offloaded layer, the device mirror a graphed retrieval draft reads: its selected KV + the tail
        mirror = batch * (fitted + tail_tokens) * token_layer * (n_layers - resident) if offloaded and fitted else 0
        parts = {"weights": weights, "draft": draft, "quantized drafts": quantized_bytes, "target KV": resident * layer_kv,
                 "retrieval": batch * retrieval_memory(args, context, fitted, chunk_size, dtype_bytes,
                                                       offloaded or selection_copies, chunk_summaries), **extra,
                 "mirror": mirror, "workspace": workspace, "graphs": graphs}
        host = (n_layers - resident) * layer_kv if offloaded else 0
        return MemoryPlan(context, n_layers, offloaded, resident, piece, fitted, budget, gpu_bytes, host_bytes,
                          parts, host, graph_steps={tier: len(sizes) for tier, (_, sizes) in steps.items()})

    everything = plan(False, n_layers, None, budget, {})
    if mode != "true" and everything.gpu_needed <= gpu_bytes:
        return everything
    if batch > 1 and mode == "false":
        per_row = (everything.gpu_needed - weights - quantized_bytes) / batch
        raise ValueError(f"a batch of {batch} rows of up to {context} tokens needs {gib(everything.gpu_needed)} GiB of GPU "
                         f"memory (weights {gib(weights)} GiB, about {gib(per_row)} GiB per row) but {gib(gpu_bytes)} GiB "
                         f"is available: lower batch_size (or use batch_size=auto), or shorten the prompts / max_new_tokens")
    if mode == "false":
        raise ValueError(f"{context} tokens need {gib(everything.gpu_needed)} GiB of GPU memory (target KV "
                         f"{gib(n_layers * layer_kv)} GiB) but {gib(gpu_bytes)} GiB is available: set offload=auto "
                         f"(or true) to keep KV in host memory, or shorten the prompt / max_new_tokens")

    # offloading: two staging slots (+ merged-attention scores when a layer comes in pieces) and the
    # mirror a retrieval draft reads every step; then the retrieval budget, then resident layers
    piece = min(transfer_chunk, context + 1)
    chunked = piece < context + 1
    extra = {"staging": batch * (2 * piece * token_layer + (3 * 4 * SCORE_BLOCK if chunked else 0))}
    fitted = budget
    while fitted and plan(True, 0, None, fitted, extra).gpu_needed > gpu_bytes:
        smaller = max(chunk_size, (fitted // 2) // chunk_size * chunk_size)
        if smaller == fitted:
            least = plan(True, 0, None, fitted, extra)
            summaries = (context // chunk_size) * args.kv_bytes_per_token(dtype_bytes) // 2
            what = (f"retrieval chunk summaries {gib(summaries)}" if chunk_summaries
                    else f"retrieval draft {gib(least.gpu_parts['retrieval'])}")
            raise ValueError(
                f"even with the whole target KV in host memory, {context} tokens need "
                f"{gib(least.gpu_needed)} GiB of GPU memory (weights {gib(weights)}, "
                f"{what}) but {gib(gpu_bytes)} GiB is available: raise "
                f"cache.chunk_size, shorten the prompt, or use a bigger GPU")
        fitted = smaller
    spare = gpu_bytes - plan(True, 0, None, fitted, extra).gpu_needed
    limit = n_layers - 1 if mode == "true" else n_layers
    if max_resident is not None:
        limit = min(limit, max_resident)
    result = plan(True, max(0, min(limit, spare // layer_kv)), piece if chunked else None, fitted, extra)
    if fitted != budget:
        result.notes.append(f"Retrieval budget lowered from {budget} to {fitted} tokens to fit the GPU.")
    if result.host_needed > host_bytes:
        raise ValueError(f"offloading {result.offloaded_layers} of {n_layers} target layers needs "
                         f"{gib(result.host_needed)} GiB of pinned host memory but {gib(host_bytes)} GiB is available: "
                         f"shorten the prompt or max_new_tokens, free host memory, or use a bigger GPU")
    return result


def rows_that_fit(plan, most: int) -> int:
    """The largest batch (at most `most`) for which `plan(batch)` (a `plan_memory` call) fits; 0 if none."""
    lo, hi = 0, most
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            plan(mid)
            lo = mid
        except ValueError:
            hi = mid - 1
    return lo


def gpu_available_bytes(device=None) -> int:
    """GPU memory this process can use: free plus what PyTorch already holds (weights, cached blocks)."""
    import torch

    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def host_available_bytes(fraction: float = 0.8) -> int:
    """A safe share of the host's available memory for pinned KV (pinning all of it starves the OS)."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        available = info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError):
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(available * fraction)
