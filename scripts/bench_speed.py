"""Speed benchmark on one GPU: each tier's step against its byte floor, and end to end.

Part 1 (Llama-2-7B-128K shape, random bf16 weights, KV filled with random values, CUDA graphs):
copy bandwidth; autoregressive step and verify steps (gamma+1 in 2,4,8,16) at each context vs
bytes/bandwidth; retrieval-tier steps at budgets 1K-8K; tiny-draft step (llama-68m shape);
Hugging Face `generate` (default and static cache) as the peer; end to end with acceptance
decisions INJECTED (benchmark-only switch, random weights accept nothing) against our own
autoregressive decoding at the longest context.
Part 2 (--smollm2 GGUF): real SmolLM2-135M at ~1K and ~7K tokens of prose: autoregressive,
retrieval and triforce pipelines (model draft, and n-gram prompt-lookup draft) vs HF generate
(static cache, prompt lookup), all in one run.
Part qwen (Qwen2.5-1.5B target, Qwen2.5-0.5B tiny draft, random bf16 weights): 0.5B decode over a
streaming cache, 1.5B AR at 8K/32K, verify of 2/4/8 at 32K, retrieval tier at 4K, each vs its floor
and with the fused projections ON and OFF in the same run (A/B); end to end at 32K, acceptance
INJECTED: AR vs draft [target, tiny] vs triforce. About 2-3 minutes on an H200.
Part prefill: time to first token (chunked prefill straight into the KV store, then the first
decode step) for the Llama-2-7B-128K shape at 32K and 128K and the Qwen2.5-Coder-1.5B shape at
32K (random bf16 weights), against the FLOP floor: matmul FLOPs (projections, the first token's
LM head, causal attention 2*2*n^2*d/2 per layer) over the bf16 matrix rate measured in the same
run. Each TTFT is timed twice (the first pays compiles and kernel plans); rows with backend
"sdpa" force SDPA's flash path instead of the cuDNN split, for comparison.

    python scripts/bench_speed.py [--contexts 16384 32768 65536 0] [--smollm2 PATH.gguf] [--part 1 2 qwen prefill]
    python scripts/bench_speed.py --part prefill --smoke    # CPU check of the prefill part's code, toy shapes
Writes results/speed_<gpu>.json (+ .png) with a top-level `summary` of the issue's target ratios.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from triforce.cache import FullCache, RetrievalCache, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.graphs import GraphedModel, graph_sizes
from triforce.models.llama import ModelArgs, build_model

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = ModelArgs(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, intermediate_size=11008,
                      max_position_embeddings=131072)
LLAMA_68M = ModelArgs(vocab_size=32000, dim=768, n_layers=2, n_heads=12, n_kv_heads=12, intermediate_size=3072,
                      max_position_embeddings=2048)
# Qwen2.5 shapes: tied embeddings, q/k/v bias, rope theta 1e6, a 151936-token vocabulary
QWEN05 = ModelArgs(vocab_size=151936, dim=896, n_layers=24, n_heads=14, n_kv_heads=2, head_dim=64,
                   intermediate_size=4864, norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
                   tie_word_embeddings=True, attention_bias=True)
QWEN15 = ModelArgs(vocab_size=151936, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
                   intermediate_size=8960, norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=131072,
                   tie_word_embeddings=True, attention_bias=True)
QWEN_CODER_1_5B = QWEN15  # the prefill part's name for it
DT = torch.bfloat16


def cuda_time(fn, repeats: int = 20, warmup: int = 3, device: torch.device | None = None) -> float:
    """Median milliseconds of fn() between CUDA events (the wall clock when `device` is a CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device is not None and device.type != "cuda":
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy (bytes read + written)."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x), repeats=10)
    del x, y
    return 2 * (2 << 30) / ms / 1e6


def fill_random(cache, length: int) -> None:
    """Stand-in for a prefill: random KV (the step cost depends on sizes, not values)."""
    cache.k[:, :, :length].normal_()
    cache.v[:, :, :length].normal_()
    cache.length = length


def free_graphs(tiers: list) -> None:
    """Drop the tiers' CUDA graphs and give their pools back before the next engine captures its own
    (every run builds new graphs; kept alive, their pools would add up over the runs)."""
    for t in tiers:
        t.graphed = None
    gc.collect()
    torch.cuda.empty_cache()


def gpu_tag(name: str) -> str:
    """Short GPU name for result files: h100, h200, ..."""
    return "h100" if "H100" in name else name.split()[-1].lower()


def random_prompt_prefill(tiers: list[Tier], ctx: int, prefill_s: list[float]):
    """A stand-in for `engine._prefill` over a target KV already filled with random values.

    The target cache takes the prompt's length; tiers reading the target's KV adopt it; a tier
    with its own streaming cache gets one forward of sinks + window random tokens, then is told it
    holds the whole prompt. The seconds it took go to prefill_s[0] (subtracted from e2e timings).
    It refers to the tiers, not the engine: a cycle through the engine would keep every earlier run's
    graphs alive until a garbage-collection pass, which could then run inside a capture.
    """
    device = tiers[0].model.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fake(progress=False):
        sync()
        t0 = time.perf_counter()
        tiers[0].cache.length = ctx - 1
        for t in tiers[1:]:
            if not t.cache.adopt_prefix(ctx - 1):
                n = t.cache.sinks + t.cache.window
                t.model(torch.randint(0, t.model.args.vocab_size, (1, n), device=device), t.cache)
                t.cache.length = ctx - 1
                t.cache.start = ctx - 1 - t.cache.window
        sync()
        prefill_s[0] = time.perf_counter() - t0
    return fake


def step_ms(model, cache, n_new: int, reset, burst: int = 8) -> float:
    """Graphed step of n_new tokens; `reset()` rolls the cache back before each replay.

    Steps are timed in bursts, as a decode loop issues them: the host prepares step i+1 while
    the GPU runs step i, so a step costs max(host, GPU) and no launch latency is counted twice.
    """
    g = GraphedModel(model, cache, {n_new})
    tokens = torch.randint(0, model.args.vocab_size, (1, n_new), device="cuda")

    def run():
        for _ in range(burst):
            reset()
            g(tokens, n_new)
    return cuda_time(run) / burst


def part1(args, out: dict) -> None:
    bw = copy_bandwidth()
    out["bandwidth_gb_s"] = bw
    a = LLAMA2_7B
    wbytes, kvtok = a.weight_bytes(2), a.kv_bytes_per_token(2)
    model = build_model(a, None, "cuda", DT, context_length=131072).eval()
    gc.collect()
    torch.cuda.empty_cache()  # building the fused weights leaves freed blocks cached
    free = torch.cuda.mem_get_info()[0]
    # the KV that fits beside the weights, the tiny draft, graph pools and workspace (6 GiB): the
    # retrieval draft itself holds only its indices (it reads the store in place, scores chunks
    # without storing summaries); the e2e run's cache takes 320 more tokens
    longest = min(int((free - 6 * 2**30) / kvtok) - 320, a.max_position_embeddings - 320) // 1024 * 1024
    contexts = [c if c else longest for c in args.contexts]
    out["longest_context"] = longest
    rows = []
    with torch.inference_mode():
        for ctx in contexts:
            full = FullCache(model, ctx + 64)
            fill_random(full, ctx)
            floor = (wbytes + ctx * kvtok) / bw / 1e6  # ms
            row = {"context": ctx, "floor_ms": floor}
            row["ar_ms"] = step_ms(model, full, 1, lambda: full.truncate(ctx))
            for t in (2, 4, 8, 16):
                row[f"verify{t}_ms"] = step_ms(model, full, t, lambda: full.truncate(ctx))
            for budget in (1024, 2048, 4096, 8192):
                ret = RetrievalCache(full, model, budget, 8)
                ret.adopt_prefix(ctx)
                model(torch.zeros(1, 1, dtype=torch.long, device="cuda"), ret)  # the selection step (eager)
                ret.truncate(ctx)
                ms = step_ms(model, ret, 1, lambda: ret.truncate(ctx))
                rbytes = wbytes + (budget + 8) * kvtok
                row[f"retrieval{budget}_ms"], row[f"retrieval{budget}_floor_ms"] = ms, rbytes / bw / 1e6
                del ret
            rows.append(row)
            print(json.dumps(row), flush=True)
            del full
            gc.collect()
            torch.cuda.empty_cache()
        tiny = build_model(LLAMA_68M, None, "cuda", DT, seed=1).eval()
        stream = StreamingCache(tiny, 16, 496, slack=32, max_forward=512)
        tiny(torch.randint(0, 32000, (1, 512), device="cuda"), stream)
        out["tiny_step_ms"] = step_ms(tiny, stream, 1, lambda: stream.truncate(512))
        out["tiny_floor_ms"] = (LLAMA_68M.weight_bytes(2) + 512 * LLAMA_68M.kv_bytes_per_token(2)) / bw / 1e6
    out["steps"] = rows
    out["e2e_injected"] = e2e_injected(model, tiny, longest, bw)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    out["hf"] = hf_generate(args.hf_contexts)


def engine_run(tiers: list[Tier], inject: dict[int, float], label: str, gamma: int, ctx: int, new: int) -> dict:
    """One timed `generate` of `new` tokens after a `ctx`-token prompt whose KV is random, acceptance injected.

    Graphs are captured by an untimed run first. Decode time only: the stand-in prefill is
    synchronised and subtracted; the retrieval tier's one-off selection over the whole prompt
    stays in (it is paid per prompt). Per-tier GPU time comes from CUDA events around each forward
    (no extra sync), so `host_overhead_ms_per_token` = ms/token - sum of the forwards' GPU times
    per token: what the host (launches, sampling decisions, the round's syncs) adds on top.
    """
    for level, t in enumerate(tiers):
        t.graphed = GraphedModel(t.model, t.cache, graph_sizes(tiers, level))
    eng = SpeculativeEngine(tiers, 0.6, 0.9, injected_acceptance=inject, gpu_timing=True)
    prefill_s = [0.0]
    eng._prefill, eng.prefill_seconds = random_prompt_prefill(tiers, ctx, prefill_s), 0.0
    prompt = torch.randint(0, tiers[0].model.args.vocab_size, (ctx,))
    eng.generate(prompt, 32, seed=0)  # captures graphs
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = len(eng.generate(prompt, new, seed=1))
    torch.cuda.synchronize()
    sec = time.perf_counter() - t0 - prefill_s[0]
    stats = eng.stats(n)
    gpu_ms = sum(v["seconds"] for v in stats.values()) * 1e3
    r = {"label": label, "context": ctx, "gamma": gamma, "injected": {str(k): v for k, v in inject.items()},
         "tokens": n, "ms_per_token": 1e3 * sec / n, "forwards_gpu_ms_per_token": gpu_ms / n,
         "host_overhead_ms_per_token": (1e3 * sec - gpu_ms) / n,
         "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "rounds", "forwards", "ms_per_forward")}
                   for k, v in stats.items()}}
    print(json.dumps(r), flush=True)
    free_graphs(tiers)
    return r


def e2e_injected(model, tiny, ctx: int, bw: float) -> list[dict]:
    """Real engine at the longest context, acceptance decisions injected (benchmark-only): AR,
    [target, retrieval] and [target, retrieval, tiny] (see `engine_run`)."""
    new = 256
    full = FullCache(model, ctx + new + 64)
    ret = RetrievalCache(full, model, 4096, 8)
    stream = StreamingCache(tiny, 16, 496, slack=64, max_forward=512)
    fill_random(full, ctx - 1)
    results = []

    def run(tiers, inject, label, gamma):
        results.append(engine_run(tiers, inject, label, gamma, ctx, new))
        return results[-1]

    with torch.inference_mode():
        ar = run([Tier("target", model, full)], {}, "autoregressive", 0)
        for rate in (0.8, 0.9, 0.95):
            for gamma in (6, 12):
                r = run([Tier("target", model, full, gamma=gamma), Tier("retrieval", model, ret)],
                        {0: rate}, f"retrieval@{rate}", gamma)
                r["speedup_vs_ar"] = ar["ms_per_token"] / r["ms_per_token"]
            for gamma, tiny_gamma in ((8, 4), (8, 6), (12, 4), (12, 6), (16, 6)):
                r = run([Tier("target", model, full, gamma=gamma), Tier("retrieval", model, ret, gamma=tiny_gamma),
                         Tier("tiny", tiny, stream)], {0: rate, 1: 0.8}, f"triforce@{rate}", gamma)
                r["tiny_gamma"] = tiny_gamma
                r["speedup_vs_ar"] = ar["ms_per_token"] / r["ms_per_token"]
    return results


def part_qwen(args, out: dict) -> None:
    """Qwen2.5-1.5B target with a Qwen2.5-0.5B tiny draft (random bf16 weights, CUDA graphs).

    Steps against their byte floor (bytes read / the copy bandwidth measured in this run), each
    with the fused projections (add + RMSNorm and SwiGLU inside the GEMVs) ON and OFF side by side:
    0.5B decode over a streaming cache (16 sinks + 496 recent), 1.5B AR at 8K / 32K, verify of
    2 / 4 / 8 tokens at 32K, retrieval tier at a 4K budget over 32K. Then end to end at 32K with
    acceptance INJECTED (benchmark-only; random weights accept nothing), fused ON: AR vs
    draft [target, tiny] vs triforce [target, retrieval, tiny].
    """
    bw = copy_bandwidth()
    out["qwen_bandwidth_gb_s"] = bw
    ctx, budget = 32768, 4096
    big, small = QWEN15, QWEN05
    wbytes, kvtok = big.weight_bytes(2), big.kv_bytes_per_token(2)
    rows = []
    with torch.inference_mode():
        model = build_model(big, None, "cuda", DT, context_length=big.max_position_embeddings).eval()
        tiny = build_model(small, None, "cuda", DT, seed=1).eval()
        stream = StreamingCache(tiny, 16, 496, slack=32, max_forward=512)
        tiny(torch.randint(0, small.vocab_size, (1, 512), device="cuda"), stream)
        full = FullCache(model, ctx + 512)
        fill_random(full, ctx)
        ret = RetrievalCache(full, model, budget, 8)
        ret.adopt_prefix(ctx)
        model(torch.zeros(1, 1, dtype=torch.long, device="cuda"), ret)  # the selection step (eager)
        ret.truncate(ctx)
        for fused in (True, False):
            model.fused_projections = tiny.fused_projections = fused
            row = {"fused_projections": fused,
                   "tiny05_step_ms": step_ms(tiny, stream, 1, lambda: stream.truncate(512)),
                   "tiny05_floor_ms": (small.weight_bytes(2) + 512 * small.kv_bytes_per_token(2)) / bw / 1e6}
            for c in (8192, ctx):
                row[f"ar{c // 1024}k_ms"] = step_ms(model, full, 1, lambda c=c: full.truncate(c))
                row[f"ar{c // 1024}k_floor_ms"] = (wbytes + c * kvtok) / bw / 1e6
            for t in (2, 4, 8):
                row[f"verify{t}_32k_ms"] = step_ms(model, full, t, lambda: full.truncate(ctx))
            row["retrieval4k_ms"] = step_ms(model, ret, 1, lambda: ret.truncate(ctx))
            row["retrieval4k_floor_ms"] = (wbytes + (budget + 8) * kvtok) / bw / 1e6
            rows.append(row)
            print(json.dumps(row), flush=True)
        model.fused_projections = tiny.fused_projections = True
        out["qwen_steps"] = rows
        del ret, full
        gc.collect()
        torch.cuda.empty_cache()

        new = 256
        full = FullCache(model, ctx + new + 64)
        ret = RetrievalCache(full, model, budget, 8)
        stream = StreamingCache(tiny, 16, 496, slack=64, max_forward=512)
        fill_random(full, ctx - 1)
        e2e = [engine_run([Tier("target", model, full)], {}, "autoregressive", 0, ctx, new)]
        ar = e2e[0]["ms_per_token"]
        for rate in (0.7, 0.8, 0.9):  # the 0.5B draft's acceptance by the 1.5B target
            for gamma in (4, 6):
                e2e.append(engine_run([Tier("target", model, full, gamma=gamma), Tier("tiny", tiny, stream)],
                                      {0: rate}, f"draft@{rate}", gamma, ctx, new))
        for gamma, tiny_gamma in ((8, 4), (12, 4), (12, 6)):  # retrieval tier by the target 0.9, tiny by it 0.8
            e2e.append(engine_run([Tier("target", model, full, gamma=gamma), Tier("retrieval", model, ret, gamma=tiny_gamma),
                                   Tier("tiny", tiny, stream)], {0: 0.9, 1: 0.8}, "triforce@0.9", gamma, ctx, new))
            e2e[-1]["tiny_gamma"] = tiny_gamma
        for r in e2e[1:]:
            r["speedup_vs_ar"] = ar / r["ms_per_token"]
        out["qwen_e2e_injected"] = e2e
    del model, tiny, full, ret, stream
    gc.collect()
    torch.cuda.empty_cache()


def hf_generate(contexts: list[int]) -> list[dict]:
    """Hugging Face generate on the same 7B shape (random weights), default and static cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    a = LLAMA2_7B
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.intermediate_size,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads,
                      max_position_embeddings=131072)
    with torch.device("cuda"):
        hf = LlamaForCausalLM(cfg).to(DT).eval()
    rows = []
    for ctx in contexts:
        ids = torch.randint(0, a.vocab_size, (1, ctx), device="cuda")
        for impl in (None, "static"):
            def gen(n):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation=impl,
                            pad_token_id=0, disable_compile=True)  # else static re-compiles inside the timing
                torch.cuda.synchronize()
                return time.perf_counter() - t0
            try:
                gen(2)
                t1, t17 = gen(1), gen(17)
                rows.append({"context": ctx, "cache": impl or "dynamic", "ms_per_token": (t17 - t1) / 16 * 1e3})
            except torch.OutOfMemoryError as e:
                rows.append({"context": ctx, "cache": impl or "dynamic", "error": f"out of memory: {e}"[:200]})
            print(json.dumps(rows[-1]), flush=True)
            gc.collect()
            torch.cuda.empty_cache()
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def timed_generation(gen, ids: list[int], temperature: float, seed: int = 0) -> tuple:
    """(result, row) of one generation timed after an identical untimed one, so that graph
    captures are not timed: ms/token and, per tier, acceptance, mean accepted length, ms/forward."""
    gen.generate(ids, temperature=temperature, seed=seed)
    r = gen.generate(ids, temperature=temperature, seed=seed)
    s = r.stats
    return r, {"tokens": len(r.token_ids), "ms_per_token": 1e3 / s["tokens_per_second"],
               "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "ms_per_forward")}
                         for k, v in s["tiers"].items()}}


def hf_ms_per_token(hf, x: torch.Tensor, new_tokens: int, warmup: bool = True, **kw) -> float:
    """Hugging Face generate's decode ms/token: (time of 1 + new_tokens tokens - time of 1) / new_tokens,
    so the prefill cancels; `kw` go to generate (cache, assistant, prompt lookup, sampling)."""
    def gen(n):
        if x.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, **kw)
        if x.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0
    if warmup:
        gen(4)
    t1, tn = gen(1), gen(new_tokens + 1)
    return (tn - t1) / new_tokens * 1e3


def hf_model(path, dtype: torch.dtype, device: str):
    """transformers' own model of a checkpoint: a GGUF is dequantized by transformers itself (from its
    directory in our conversion cache), so the peer runs the same weights as triforce."""
    from transformers import AutoModelForCausalLM

    from triforce.models.llama import GGUF_LINK, resolve_checkpoint

    hf_dir = resolve_checkpoint(path)
    gguf = {"gguf_file": GGUF_LINK} if (hf_dir / GGUF_LINK).exists() else {}
    return AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype, **gguf).to(device).eval()


def first_difference(got: list[int], want: list[int]) -> int | None:
    """Index of the first token where a greedy run parts from autoregressive decoding (None: equal).
    In bf16 on a GPU the two part at the first near-tie (a verify step rounds unlike a decode
    step); in float32 they are equal: where they part says which of the two it is."""
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            return i
    return None if len(got) == len(want) else min(len(got), len(want))


def part2(args, out: dict) -> None:
    """Real SmolLM2-135M: our pipelines vs HF generate (static cache, prompt lookup)."""
    import triforce
    from transformers import AutoTokenizer

    from triforce.models.llama import resolve_checkpoint

    text = (ROOT / "data/corpus/botchan.txt").read_text()
    rows = []
    common = ("+model=smollm2-135m", f"model.path={args.smollm2}", "chat=false", "cache.budget=512", "gamma=6", "draft.gamma=4", "max_new_tokens=128",
              "stream=false")
    gens = {p: triforce.load(*common, f"pipeline={p}") for p in ("autoregressive", "retrieval", "triforce")}
    # the bottom tier as n-gram prompt lookup (no weights): a lookup costs no model step, so it
    # drafts more per round (draft.gamma 6)
    gens["triforce+lookup"] = triforce.load(*common, "pipeline=triforce", "model.draft_path=lookup", "draft.gamma=6")
    tok = AutoTokenizer.from_pretrained(str(resolve_checkpoint(args.smollm2)))
    hf = hf_model(args.smollm2, DT, "cuda")
    all_ids = tok(text).input_ids
    for ctx in (1024, 7168):
        ids = all_ids[10000:10000 + ctx]
        for temp in (0.0, 0.6):
            ref = None
            for pipe, gen in gens.items():
                r, timing = timed_generation(gen, ids, temp)
                row = {"context": ctx, "temperature": temp, "system": f"triforce/{pipe}", **timing}
                if temp == 0:
                    ref = r.token_ids if ref is None else ref
                    row["greedy_equal_to_autoregressive"] = r.token_ids == ref
                    row["greedy_first_difference"] = first_difference(r.token_ids, ref)
                ar_ms = next((x["ms_per_token"] for x in rows if x["context"] == ctx and x["temperature"] == temp
                              and x["system"] == "triforce/autoregressive"), None)
                if ar_ms:
                    row["speedup_vs_autoregressive"] = ar_ms / row["ms_per_token"]
                rows.append(row)
                print(json.dumps(row), flush=True)
        x = torch.tensor([ids], device="cuda")
        for label, kw in (("hf/static", {"cache_implementation": "static", "disable_compile": True}), ("hf/dynamic", {}),
                          ("hf/prompt_lookup", {"prompt_lookup_num_tokens": 10})):
            rows.append({"context": ctx, "temperature": 0.0, "system": label,
                         "ms_per_token": hf_ms_per_token(hf, x, 128, do_sample=False, **kw)})
            print(json.dumps(rows[-1]), flush=True)
    out["smollm2"] = rows


def matmul_tflops(n: int = 8192, dtype: torch.dtype = DT) -> float:
    """Dense matrix rate of this GPU in TFLOP/s (an n^3 product, median of 20): the floor's denominator."""
    x = torch.randn(n, n, dtype=dtype, device="cuda")
    y = torch.randn(n, n, dtype=dtype, device="cuda")
    ms = cuda_time(lambda: x @ y)
    return 2 * n ** 3 / ms / 1e9


def prefill_flops(a: ModelArgs, n: int) -> float:
    """Matmul FLOPs of prefilling n tokens and producing the first token: every projection for each
    token, causal attention (QK^T and PV, 2*2*n^2*d/2 per layer, d = heads x head_dim) and one
    LM-head row (the prefill keeps no logits)."""
    proj = a.dim * a.head_dim * (2 * a.n_heads + 2 * a.n_kv_heads) + 3 * a.dim * a.intermediate_size
    attention = a.n_layers * 2 * 2 * n * n * a.n_heads * a.head_dim / 2
    return 2 * n * a.n_layers * proj + attention + 2 * a.dim * a.vocab_size


def time_to_first_token(model, ctx: int, chunk: int) -> tuple[float, float]:
    """Seconds from a ctx-token prompt to its first generated token (prefill in `chunk`-token
    forwards straight into the target's store, then one decode step), cold and warm."""
    cuda = model.device.type == "cuda"
    full = FullCache(model, ctx + 8)
    engine = SpeculativeEngine([Tier("target", model, full)], 0.0, 1.0, prefill_chunk=chunk)
    prompt = torch.randint(0, model.args.vocab_size, (ctx,))
    times = []
    for _ in range(2):  # the first run compiles the fused pieces and builds cuDNN plans per chunk shape
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        assert len(engine.generate(prompt, 1)) == 1
        times.append(time.perf_counter() - t0)
    del engine, full
    return times[0], times[1]


def part_prefill(args, out: dict) -> None:
    """TTFT against the FLOP floor (7B shape at 32K and 128K, Qwen2.5-Coder-1.5B shape at 32K)."""
    import triforce.kernels.prefill_attention as pa

    if args.smoke:  # CPU, float32, toy shapes: the code path, not the numbers
        device, dtype, rate = "cpu", torch.float32, 0.1
        shapes = [("7b", ModelArgs(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=128,
                                   max_position_embeddings=4096), [512]),
                  ("qwen2.5-coder-1.5b", ModelArgs(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                                   head_dim=16, intermediate_size=128, tie_word_embeddings=True,
                                                   attention_bias=True, max_position_embeddings=4096), [512])]
        chunks = [128]
    else:
        device, dtype, rate = "cuda", DT, matmul_tflops()
        shapes = [("7b", LLAMA2_7B, [32768, 131072]), ("qwen2.5-coder-1.5b", QWEN_CODER_1_5B, [32768])]
        chunks = args.prefill_chunks
    out["matmul_tflops"] = rate
    rows = out.setdefault("prefill", [])
    rows.clear()
    for name, a, contexts in shapes:
        model = build_model(a, None, device, dtype, context_length=max(contexts) + 8).eval()
        for ctx in contexts:
            flops = prefill_flops(a, ctx)
            floor = flops / (rate * 1e12)
            for chunk in chunks:
                for backend in ("auto", "sdpa") if a.n_heads == a.n_kv_heads else ("auto",):
                    real = pa.can_use_cudnn
                    if backend == "sdpa":  # benchmark-only: SDPA's flash path for every chunk
                        pa.can_use_cudnn = lambda q, k: False
                    row = {"model": name, "context": ctx, "prefill_chunk": chunk, "attention": backend,
                           "flops": flops, "flop_floor_s": floor}
                    try:
                        cold, warm = time_to_first_token(model, ctx, chunk)
                        row.update(ttft_cold_s=cold, ttft_s=warm, over_flop_floor=warm / floor, tflops=flops / warm / 1e12)
                    except (RuntimeError, torch.OutOfMemoryError) as e:  # record it, measure the other rows
                        row["error"] = f"{type(e).__name__}: {e}"[:300]
                    finally:
                        pa.can_use_cudnn = real
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()


def summarize(out: dict) -> dict:
    s = {}
    steps = out.get("steps")
    if steps:
        longest = max(steps, key=lambda r: r["context"])
        s["ar_over_floor"] = longest["ar_ms"] / longest["floor_ms"]
        big = [r for r in steps if r["context"] >= 65536]
        s["verify_over_ar"] = max(r[f"verify{t}_ms"] / r["ar_ms"] for r in big for t in (2, 4, 8)) if big else None
        s["retrieval_over_floor"] = longest["retrieval4096_ms"] / longest["retrieval4096_floor_ms"]
        s["tiny_step_ms"] = out["tiny_step_ms"]
        hf32 = [h for h in out.get("hf", []) if h["context"] == 32768 and h["cache"] == "dynamic" and "ms_per_token" in h]
        own32 = [r for r in steps if r["context"] == 32768]
        if hf32 and own32:
            s["ar_speedup_vs_hf"] = hf32[0]["ms_per_token"] / own32[0]["ar_ms"]
        inj = [r for r in out.get("e2e_injected", []) if r["injected"].get("0") == 0.9 and "speedup_vs_ar" in r]
        if inj:
            s["e2e_speedup_injected"] = max(r["speedup_vs_ar"] for r in inj)
            # rounds are geometric, so one run of 256 tokens is noisy: the same runs rescaled to the
            # expected tokens per target round, (1 - a^(g+1)) / (1 - a), instead of the drawn ones
            s["e2e_speedup_injected_expected_length"] = max(
                r["speedup_vs_ar"] * (1 - 0.9 ** (r["gamma"] + 1)) / 0.1 / r["tiers"]["target"]["mean_accepted_length"]
                for r in inj)
        best = max(inj, key=lambda r: r["speedup_vs_ar"]) if inj else {}
        if "host_overhead_ms_per_token" in best:  # ms/token beyond the forwards' GPU time, in the best 0.9 run
            s["e2e_host_overhead_ms_per_token"] = best["host_overhead_ms_per_token"]
    q = out.get("qwen_steps") or []
    on = next((r for r in q if r["fused_projections"]), None)
    off = next((r for r in q if not r["fused_projections"]), None)
    if on:
        s["tiny05_step_over_floor"] = on["tiny05_step_ms"] / on["tiny05_floor_ms"]
        s["q15_ar_over_floor_32k"] = on["ar32k_ms"] / on["ar32k_floor_ms"]
        s["q15_ar_over_floor_8k"] = on["ar8k_ms"] / on["ar8k_floor_ms"]
        s["q15_verify_over_ar_32k"] = max(on[f"verify{t}_32k_ms"] / on["ar32k_ms"] for t in (2, 4, 8))
        s["q15_retrieval4k_over_floor"] = on["retrieval4k_ms"] / on["retrieval4k_floor_ms"]
    if on and off:  # A/B in one run: ms with the fused projections / without (below 1: fused is faster)
        s["fused_over_unfused"] = {k.removesuffix("_ms"): on[k] / off[k] for k in on
                                   if k.endswith("_ms") and not k.endswith("floor_ms")}
    qe = out.get("qwen_e2e_injected") or []
    if qe:
        best = {}
        for r in qe:
            kind = r["label"].split("@")[0]
            if kind not in best or r["ms_per_token"] < best[kind]["ms_per_token"]:
                best[kind] = r
        s["q15_e2e_injected_ms_per_token"] = {k: r["ms_per_token"] for k, r in best.items()}
        s["q15_e2e_speedup_injected"] = {k: r.get("speedup_vs_ar") for k, r in best.items() if k != "autoregressive"}
        s["q15_e2e_host_overhead_ms_per_token"] = {k: r["host_overhead_ms_per_token"] for k, r in best.items()}
    pre = out.get("prefill") or []
    for name, ctx, key in (("7b", 131072, "prefill_7b_128k_over_flop_floor"), ("7b", 32768, "prefill_7b_32k_over_flop_floor"),
                           ("qwen2.5-coder-1.5b", 32768, "prefill_qwen1.5b_32k_over_flop_floor")):
        rs = [r for r in pre if r["model"] == name and r["context"] == ctx and r["attention"] == "auto" and "ttft_s" in r]
        if rs:
            best = min(rs, key=lambda r: r["ttft_s"])
            s[key] = best["over_flop_floor"]
            s[key.replace("over_flop_floor", "ttft_s")] = best["ttft_s"]
    smol = out.get("smollm2") or []
    if smol:  # real SmolLM2-135M: best speculative pipeline vs own AR, own AR vs HF static cache (greedy)
        s["smollm2_best_speedup_vs_ar"] = max((r.get("speedup_vs_autoregressive") or 0) for r in smol)
        s["smollm2_best_pipeline"] = max(smol, key=lambda r: r.get("speedup_vs_autoregressive") or 0)["system"]
        ratios = []
        for r in smol:
            if r["system"] == "hf/static":
                own = [x for x in smol if x["context"] == r["context"] and x["temperature"] == 0.0
                       and x["system"] == "triforce/autoregressive"]
                ratios += [r["ms_per_token"] / own[0]["ms_per_token"]] if own else []
        if ratios:
            s["smollm2_ar_speedup_vs_hf_static"] = min(ratios)
    return s


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = out.get("steps")
    if not steps:
        return
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    ctx = [r["context"] // 1024 for r in steps]
    ax[0].plot(ctx, [r["floor_ms"] for r in steps], "k--", label="byte floor")
    ax[0].plot(ctx, [r["ar_ms"] for r in steps], "o-", label="AR step")
    for t in (4, 16):
        ax[0].plot(ctx, [r[f"verify{t}_ms"] for r in steps], "s-", label=f"verify {t} tokens")
    ax[0].plot(ctx, [r["retrieval4096_ms"] for r in steps], "^-", label="retrieval step (4K budget)")
    ax[0].set(xlabel="context (K tokens)", ylabel="ms per step", title="Llama-2-7B shape, bf16, CUDA graphs")
    ax[0].legend()
    inj = [r for r in out.get("e2e_injected", []) if "speedup_vs_ar" in r]
    labels = [f"{r['label']} g{r['gamma']}" + (f"/{r['tiny_gamma']}" if "tiny_gamma" in r else "") for r in inj]
    ax[1].barh(labels, [r["speedup_vs_ar"] for r in inj])
    ax[1].set(xlabel="speedup over own autoregressive", title=f"end to end at {out.get('longest_context', 0) // 1024}K (injected acceptance)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536, 0], help="0 = longest that fits")
    ap.add_argument("--hf-contexts", type=int, nargs="+", default=[32768])
    ap.add_argument("--smollm2", default=None, help="SmolLM2 GGUF (or HF dir) for part 2")
    ap.add_argument("--part", nargs="+", default=["1", "2"], choices=["1", "2", "qwen", "prefill"],
                    help="1: Llama-2-7B shape; 2: real SmolLM2 (--smollm2); qwen: Qwen2.5-1.5B/0.5B shapes, fused A/B; "
                         "prefill: time to first token vs the FLOP floor")
    ap.add_argument("--prefill-chunks", type=int, nargs="+", default=[4096],
                    help="prefill_chunk values timed by --part prefill")
    ap.add_argument("--smoke", action="store_true", help="--part prefill only: toy shapes on the CPU, no GPU needed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        if args.part != ["prefill"]:
            raise SystemExit("--smoke checks --part prefill only: run `bench_speed.py --part prefill --smoke`")
        out = {"gpu": "none (smoke)", "torch": torch.__version__}
        part_prefill(args, out)
        out["summary"] = summarize(out)
        path = Path(args.out or "/tmp/triforce_speed_smoke.json")
        path.write_text(json.dumps(out, indent=1))
        print(json.dumps(out["summary"], indent=1))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_speed.py needs a CUDA GPU (it measures GPU steps against their byte floor)")
    import triton
    import transformers

    name = torch.cuda.get_device_name()
    out = {"gpu": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "settings": {"dtype": "bfloat16", "model": "Llama-2-7B shape, random weights", "tiny": "llama-68m shape",
                        "retrieval_chunk": 8, "streaming": "16 sinks + 496 recent", "cuda_graphs": True,
                        "injected_acceptance": "benchmark-only switch: accept/reject decisions drawn at the given rate"}}
    path = Path(args.out or ROOT / f"results/speed_{gpu_tag(name)}.json")
    if path.exists():
        out.update({k: v for k, v in json.loads(path.read_text()).items() if k not in out})
    torch.manual_seed(0)
    if "1" in args.part:
        part1(args, out)
    if "2" in args.part and args.smollm2:
        part2(args, out)
    if "qwen" in args.part:
        part_qwen(args, out)
    if "prefill" in args.part:
        part_prefill(args, out)
    out["summary"] = summarize(out)
    path.write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
