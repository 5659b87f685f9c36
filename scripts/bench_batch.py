"""Batched speculation on one GPU: B long sequences at once, against batched autoregressive decoding.

One sequence of a 1.5B model at 32K reads 3.1 GB of weights and 0.94 GB of KV per step; a batch
of B reads the weights once and B times the KV, so the step becomes KV-bound and a sparse-KV or
small draft pays (the MagicDec regime). For each shape, context and batch size B (as memory
allows; random bf16 weights, KV filled with random values, CUDA graphs):
- the batched autoregressive step against its byte floor (weights + B x context x KV per token,
  over the copy bandwidth measured in the same run);
- end to end through the public engine (`SpeculativeEngine.generate_batch`): batched
  autoregressive decoding, the classic draft pipeline [target, 0.5B tiny over a StreamingLLM
  cache], the self-speculative retrieval pipeline [target, target weights over a 2K retrieval
  budget] and TriForce's three tiers, with acceptance decisions INJECTED (a benchmark-only
  switch: random weights accept nothing) at 0.8 and 0.9: throughput (tokens/s over all rows)
  and per-token latency (ms per step of one row); per-tier GPU time from CUDA events, and the rest
  of the wall time (`outside_forwards_ms`: host work, eager steps);
- Hugging Face batched `generate` with a static cache at B=16 (same shape, random weights);
- with `--continuous`: 4 x B jobs of mixed lengths (new/4 to 2 x new tokens after really prefilled
  prompts) on B rows, static batches (each group waits for its longest job) against continuous
  batching (a waiting job takes a finished row), for batched AR and the draft pair.
- with `--real`: the real pair instead (Qwen2.5-Coder-1.5B-Instruct over its 0.5B, their Q4_K_M
  GGUFs dequantized to bf16, `+model=qwen2.5-coder-1.5b`), B different repository-level code
  completion prompts (`triforce.corpus.code_tasks`, really prefilled), real acceptance: batched
  AR, the draft pair and the retrieval self-draft through the Generator's tiers.
Sampling: temperature 0.6, top_p 1 (every row of every pipeline draws; no nucleus sort).

    python scripts/bench_batch.py [--batches 1 4 16 32 64] [--shapes q15_8k q15_32k llama7b_32k]
    python scripts/bench_batch.py --continuous --shapes q15_8k --batches 8 32   # + mixed-length jobs, continuous vs static
    python scripts/bench_batch.py --real --real-contexts 32768 --batches 1 4 16 32   # the real pair, real text
    python scripts/bench_batch.py --smoke      # CPU: toy shapes, every part runs, numbers mean nothing
    python scripts/bench_batch.py --smoke --real   # CPU: the real-pair part on the embedded SmolLM2
    python scripts/bench_batch.py --merge A.json B.json --out results/batch_h200.json   # runs of other shapes, one file
Writes results/batch_<gpu>.json (+ .png, speedup against batch size) with a `summary`.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

from bench_speed import LLAMA2_7B, QWEN05, QWEN15, copy_bandwidth, cuda_time, gpu_tag
from triforce.cache import FullCache, RetrievalCache, Rows, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.generator import resolve_prefill_chunk
from triforce.graphs import GraphedModel, graph_sizes
from triforce.models.llama import ModelArgs, build_model

ROOT = Path(__file__).resolve().parents[1]
DT = torch.bfloat16
SHAPES = {"q15_32k": ("qwen", 32768), "llama7b_32k": ("llama7b", 32768), "q15_8k": ("qwen", 8192)}
SMOKE_TARGET = ModelArgs(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                         max_position_embeddings=1024)
SMOKE_TINY = ModelArgs(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=64,
                       max_position_embeddings=1024)


def pipelines(family: str) -> list[tuple[str, float, int, int]]:
    """(pipeline, injected acceptance of the target, gamma, tiny gamma) runs of one batch point."""
    runs = [("autoregressive", 0.0, 0, 0)]
    kinds = ["retrieval"] if family == "llama7b" else ["draft", "retrieval"]
    for kind in kinds:
        runs += [(kind, 0.8, 6, 0), (kind, 0.9, 4, 0), (kind, 0.9, 8, 0)]
    if family == "qwen":
        runs.append(("triforce", 0.9, 8, 4))
    return runs


def make_tiers(model, tiny, pipeline: str, batch: int, capacity: int, gamma: int, tiny_gamma: int,
               budget: int, graphs: bool, prefill_chunk: int = 512) -> list[Tier]:
    full = Rows.build(lambda b: FullCache(model, capacity), batch)
    tiers = [Tier("target", model, full, gamma=gamma)]
    if pipeline in ("retrieval", "triforce"):
        tiers.append(Tier("retrieval", model, Rows.build(lambda b: RetrievalCache(full.rows[b], model, budget, 8), batch),
                          gamma=tiny_gamma))
    if pipeline in ("draft", "triforce"):
        tiers.append(Tier("tiny", tiny, Rows.build(lambda b: StreamingCache(tiny, 16, 496, slack=64, max_forward=max(512, prefill_chunk)),
                                                   batch)))
    if graphs:
        for level, t in enumerate(tiers):
            t.graphed = GraphedModel(t.model, t.cache, graph_sizes(tiers, level))
    return tiers


def fill_random(full, ctx: int) -> None:
    """Stand-in for the rows' prefills: random KV in every row (step costs depend on sizes, not values)."""
    shared = full.rows[0].batch  # a batch's rows share batch-major tensors; a single row has its own
    k = shared["k"] if shared is not None else full.k[:, None]
    v = shared["v"] if shared is not None else full.v[:, None]
    k[..., :ctx, :].normal_()
    v[..., :ctx, :].normal_()


def fake_prefill(tiers: list[Tier], ctx: int, device, seconds: list[float]):
    """Replaces the engine's prefill: every row's target KV is already random; caches reading it
    adopt it, a streaming draft gets one forward of sinks + window random tokens per row. Its time
    goes to seconds[0], which the caller subtracts (a prefill, not decoding)."""
    def prefill(progress=False):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for c in tiers[0].cache.rows:
            c.length = ctx - 1
        for t in tiers[1:]:
            for c in t.cache.rows:
                if not c.adopt_prefix(ctx - 1):
                    n = c.sinks + c.window
                    t.model(torch.randint(0, t.model.args.vocab_size, (1, n), device=device), c)
                    c.length, c.start = ctx - 1, ctx - 1 - c.window
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[0] = time.perf_counter() - t0
    return prefill


def injected_rates(pipeline: str, rate: float) -> dict[int, float]:
    """The benchmark-only acceptance switch per verifying tier: the target's at `rate`, and in
    three tiers the retrieval tier accepting the tiny's at 0.8."""
    return {} if pipeline == "autoregressive" else ({0: rate, 1: 0.8} if pipeline == "triforce" else {0: rate})


def engine_run(tiers: list[Tier], pipeline: str, rate: float, batch: int, ctx: int, new: int, device) -> dict:
    """One timed `generate_batch` of `new` tokens per row after `ctx`-token prompts (random KV),
    after an identical untimed run that captures the graphs. Decode time only: the stand-in
    prefill (the tiny's window, per row) is subtracted."""
    inject = injected_rates(pipeline, rate)
    # per-tier GPU time from CUDA events around each forward (read once at the end, no extra sync)
    eng = SpeculativeEngine(tiers, 0.6, 1.0, injected_acceptance=inject, gpu_timing=device.type == "cuda")
    prefill_s = [0.0]
    eng._prefill, eng.prefill_seconds = fake_prefill(tiers, ctx, device, prefill_s), 0.0
    prompts = [torch.randint(0, tiers[0].model.args.vocab_size, (ctx,)) for _ in range(batch)]
    eng.generate_batch(prompts, new, seeds=list(range(batch)))  # captures graphs
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = eng.generate_batch(prompts, new, seeds=list(range(batch, 2 * batch)))
    sync()
    sec = time.perf_counter() - t0 - prefill_s[0]  # the drafts' one-off selection stays in: it is paid per prompt
    n = sum(len(o) for o in out)
    stats = eng.stats(n)
    gpu_ms = sum(v["seconds"] for v in stats.values()) * 1e3
    row = {"pipeline": pipeline, "batch": batch, "context": ctx, "injected": rate if inject else None,
           "gamma": tiers[0].gamma if len(tiers) > 1 else 0, "tiny_gamma": tiers[1].gamma if len(tiers) > 2 else None,
           "tokens": n, "tokens_per_second": n / sec, "ms_per_step_per_row": 1e3 * sec / new,
           # what the host (launches, per-row bookkeeping, the rounds' syncs) and eager steps add beyond the forwards
           "forwards_gpu_ms": gpu_ms, "outside_forwards_ms": 1e3 * sec - gpu_ms,
           "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "forwards", "ms_per_forward")}
                     for k, v in stats.items()}}
    print(json.dumps(row), flush=True)
    for t in tiers:
        t.graphed = None
    return row


def ar_step(model, batch: int, ctx: int, bw: float, device) -> dict:
    """The batched autoregressive step (graphed) against its byte floor."""
    full = Rows.build(lambda b: FullCache(model, ctx + 64), batch)
    fill_random(full, ctx)
    g = GraphedModel(model, full, {1}) if device.type == "cuda" else (lambda tokens, last: model(tokens, full, last=last))
    tokens = torch.randint(0, model.args.vocab_size, (batch, 1), device=device)

    def step():
        for _ in range(4):
            for c in full.rows:
                c.length = ctx
            g(tokens, 1)
    ms = cuda_time(step, repeats=10, device=device) / 4
    a = model.args
    floor = (a.weight_bytes(2) + batch * ctx * a.kv_bytes_per_token(2)) / bw / 1e6 if bw else None
    row = {"batch": batch, "context": ctx, "ar_step_ms": ms, "floor_ms": floor,
           "over_floor": ms / floor if floor else None}
    print(json.dumps(row), flush=True)
    del g, full
    return row


def hf_batched(args: ModelArgs, batch: int, ctx: int, new: int = 16) -> dict:
    """Hugging Face batched generate (static cache, greedy) on the same shape: decode ms per step."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.intermediate_size,
                      num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                      num_key_value_heads=args.n_kv_heads, max_position_embeddings=ctx + new + 8,
                      rope_theta=args.rope_theta, tie_word_embeddings=args.tie_word_embeddings)
    with torch.device("cuda"):
        hf = Qwen2ForCausalLM(cfg).to(DT).eval()
    ids = torch.randint(0, args.vocab_size, (batch, ctx), device="cuda")

    def gen(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    cache_implementation="static", pad_token_id=0, disable_compile=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0
    try:
        gen(2)
        t1, tn = gen(1), gen(new + 1)
        row = {"batch": batch, "context": ctx, "cache": "static", "ms_per_step": (tn - t1) / new * 1e3}
        row["tokens_per_second"] = batch * 1e3 / row["ms_per_step"]
    except torch.OutOfMemoryError as e:
        row = {"batch": batch, "context": ctx, "cache": "static", "error": f"out of memory: {e}"[:200]}
    print(json.dumps(row), flush=True)
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return row


def fits(family: str, a: ModelArgs, batch: int, ctx: int) -> bool:
    """Whether a batch point leaves room on the GPU: B rows of KV plus graph pools and workspace."""
    free, _ = torch.cuda.mem_get_info()
    rows = batch * (ctx + 320) * a.kv_bytes_per_token(2)
    heads = 8 * batch * 10 * a.vocab_size * 4 * 3  # logits and sampling copies of the verify graphs, 3 tiers
    return rows + heads + (8 << 30) < free


def run_shape(name: str, batches: list[int], new: int, bw: float, device, smoke: bool) -> dict:
    family, ctx = SHAPES[name]
    if smoke:
        a, ta, ctx = SMOKE_TARGET, SMOKE_TINY, 96
    else:
        a, ta = (QWEN15, QWEN05) if family == "qwen" else (LLAMA2_7B, None)
    dtype = torch.float32 if smoke else DT
    out = {"shape": name, "context": ctx, "steps": [], "e2e": []}
    with torch.inference_mode():
        model = build_model(a, None, device, dtype, context_length=max(a.max_position_embeddings, ctx + 1024)).eval()
        tiny = build_model(ta, None, device, dtype, seed=1).eval() if ta is not None else None
        for batch in batches:
            if device.type == "cuda" and not fits(family, a, batch, ctx):
                out.setdefault("skipped", []).append({"batch": batch, "reason": "does not fit the GPU"})
                continue
            out["steps"].append(ar_step(model, batch, ctx, bw, device))
            for pipeline, rate, gamma, tiny_gamma in pipelines(family):
                if tiny is None and pipeline in ("draft", "triforce"):
                    continue
                tiers = make_tiers(model, tiny, pipeline, batch, ctx + new + 64, gamma, tiny_gamma,
                                   32 if smoke else 2048, device.type == "cuda")
                fill_random(tiers[0].cache, ctx)
                out["e2e"].append(engine_run(tiers, pipeline, rate, batch, ctx, new, device))
                del tiers
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if not smoke and family == "qwen" and ctx == 32768:
            del model, tiny
            gc.collect()
            torch.cuda.empty_cache()
            out["hf"] = hf_batched(a, 16, ctx)
    return out


def continuous_run(model, tiny, pipeline: str, rate: float, batch: int, ctx: int, new: int, gamma: int,
                   device) -> dict:
    """Mixed-length jobs on `batch` rows, two ways, side by side: static batches (each group of
    `batch` jobs runs to its longest; finished rows ride along masked) and continuous batching (a
    waiting job takes a finished row between target rounds). 4 x batch jobs of `ctx`-token random
    prompts (really prefilled: a job's prefill is part of serving it) asking new/4 .. 2 x new
    tokens. Throughput over the whole set, wall time with prefills and without."""
    g = torch.Generator().manual_seed(batch)
    n_jobs = 4 * batch
    choices = [max(1, new // 4), max(1, new // 2), new, 2 * new]
    maxes = [choices[int(i)] for i in torch.randint(0, len(choices), (n_jobs,), generator=g)]
    vocab = model.args.vocab_size
    prompts = [torch.randint(0, vocab, (ctx,), generator=g) for _ in range(n_jobs)]
    inject = injected_rates(pipeline, rate)
    chunk = resolve_prefill_chunk("auto", device)  # what a Generator prefills with on this device
    tiers = make_tiers(model, tiny, pipeline, batch, ctx + 2 * new + 64, gamma, 0, 2048, device.type == "cuda", chunk)
    eng = SpeculativeEngine(tiers, 0.6, 1.0, chunk, injected_acceptance=inject)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    eng.generate_batch(prompts[:batch], min(new, 8), seeds=list(range(batch)))  # untimed: captures graphs
    ways = {}
    for way in ("static", "continuous"):
        sync()
        t0, prefill, tokens = time.perf_counter(), 0.0, 0
        groups = [range(i, i + batch) for i in range(0, n_jobs, batch)] if way == "static" else [range(n_jobs)]
        for grp in groups:
            out = eng.generate_batch([prompts[i] for i in grp], [maxes[i] for i in grp], seeds=list(grp),
                                     rows=batch)
            tokens += sum(len(o) for o in out)
            prefill += eng.prefill_seconds + eng.refill_seconds
        sync()
        sec = time.perf_counter() - t0
        ways[way] = {"seconds": sec, "tokens": tokens, "prefill_seconds": prefill, "tokens_per_second": tokens / sec,
                     "decode_tokens_per_second": tokens / max(1e-9, sec - prefill)}
    for t in tiers:
        t.graphed = None
    row = {"pipeline": pipeline, "batch": batch, "context": ctx, "jobs": n_jobs, "injected": rate if inject else None,
           "gamma": gamma, "prefill_chunk": chunk, "new_tokens": sorted(set(maxes)), "tokens_asked": sum(maxes), **ways,
           "continuous_over_static": ways["continuous"]["tokens_per_second"] / ways["static"]["tokens_per_second"],
           "continuous_over_static_decode": (ways["continuous"]["decode_tokens_per_second"]
                                             / ways["static"]["decode_tokens_per_second"])}
    print(json.dumps(row), flush=True)
    return row


def run_continuous(batches: list[int], new: int, ctx: int, device, smoke: bool) -> list[dict]:
    """The continuous-batching part on the Qwen2.5 1.5B + 0.5B shapes: batched AR and the draft
    pair at injected 0.9 (gamma 4), per batch size."""
    a, ta = (SMOKE_TARGET, SMOKE_TINY) if smoke else (QWEN15, QWEN05)
    dtype = torch.float32 if smoke else DT
    rows = []
    with torch.inference_mode():
        model = build_model(a, None, device, dtype, context_length=max(a.max_position_embeddings, ctx + 4 * new)).eval()
        tiny = build_model(ta, None, device, dtype, seed=1).eval()
        for batch in batches:
            for pipeline, rate, gamma in (("autoregressive", 0.0, 0), ("draft", 0.9, 4)):
                rows.append(continuous_run(model, tiny, pipeline, rate, batch, ctx, new, gamma, device))
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


REAL_PIPELINES = (("autoregressive", 0), ("draft", 6), ("retrieval", 6))  # (pipeline, gamma): real_h200's best fixed
REAL_OVERRIDES = ["+model=qwen2.5-coder-1.5b"]
SMOKE_REAL = ["+model=smollm2-135m", "model.context_length=2048", "device=cpu"]


def real_generator(overrides: list[str], pipeline: str, gamma: int, budget: int):
    """A Generator of the real pair for one fixed pipeline (nothing left to `auto`)."""
    from hydra import compose, initialize_config_module

    from triforce.generator import Generator

    with initialize_config_module(config_module="triforce.conf", version_base=None):
        cfg = compose(config_name="config", overrides=[*overrides, f"pipeline={pipeline}", f"gamma={max(gamma, 1)}",
                                                       "draft.gamma=4", f"cache.budget={budget}", "stream=false",
                                                       "chat=false"])
    return Generator(cfg)


def real_run(gen, pipeline: str, ctx: int, prompts: list[list[int]], names: list[str], new: int,
             warm_tokens: int) -> dict:
    """B real prompts in one batch through the Generator's tiers and the public engine: an untimed
    run on the prompts' first `warm_tokens` tokens captures the graphs on the same caches, then the
    timed run (prefill excluded: decode time only). EOS does not stop a row (every row generates
    `new` tokens, as the injected rows do)."""
    batch = len(prompts)
    capacity = max(map(len, prompts)) + new + gen.auto.depth
    tiers = gen._ready_tiers(capacity, new, min(map(len, prompts)), batch)
    sync = torch.cuda.synchronize if gen.device.type == "cuda" else (lambda: None)

    def run(ids: list[list[int]], n: int, seed0: int) -> tuple[SpeculativeEngine, list, float]:
        eng = SpeculativeEngine(tiers, 0.6, 1.0, gen.cfg.prefill_chunk, gpu_timing=gen.device.type == "cuda")
        sync()
        t0 = time.perf_counter()
        out = eng.generate_batch([torch.tensor(x) for x in ids], n, set(), list(range(seed0, seed0 + batch)), rows=batch)
        sync()
        return eng, out, time.perf_counter() - t0 - eng.prefill_seconds - eng.refill_seconds
    run([x[:warm_tokens] for x in prompts], min(new, 48), 1000)
    eng, out, sec = run(prompts, new, 0)
    n = sum(len(o) for o in out)
    stats = eng.stats(n)
    gpu_ms = sum(v["seconds"] for v in stats.values()) * 1e3
    verifier = eng.tiers[0].stats
    row_acc = [a / p if p else None for a, p in zip(verifier.row_accepted, verifier.row_proposed)] \
        if pipeline != "autoregressive" else None
    row = {"pipeline": pipeline, "real": True, "batch": batch, "context": ctx,
           "prompt_tokens": [len(x) for x in prompts], "documents": names, "gamma": tiers[0].gamma if len(tiers) > 1 else 0, "tokens": n,
           "tokens_per_second": n / sec, "ms_per_step_per_row": 1e3 * sec / new, "prefill_seconds": eng.prefill_seconds,
           "forwards_gpu_ms": gpu_ms, "outside_forwards_ms": 1e3 * sec - gpu_ms, "row_acceptance": row_acc,
           "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "forwards", "ms_per_forward")}
                     for k, v in stats.items()}}
    print(json.dumps({k: v for k, v in row.items() if k not in ("documents", "row_acceptance", "prompt_tokens")}),
          flush=True)
    return row


def run_real(args, smoke: bool) -> dict:
    """Every real pipeline x context x batch size; one Generator (one model load) per pipeline."""
    from triforce.corpus import code_tasks

    overrides = args.real_overrides or (SMOKE_REAL if smoke else REAL_OVERRIDES)
    budget = 64 if smoke else 2048
    out: dict = {"overrides": overrides, "budget": budget, "draft_gamma": 4, "temperature": 0.6, "top_p": 1.0,
                 "prompts": "triforce.corpus.code_tasks (repository-level code completion), a different task per row",
                 "rows": [], "skipped": []}
    tasks: dict[int, list] = {}
    for pipeline, gamma in REAL_PIPELINES:
        gen = real_generator(overrides, pipeline, gamma, budget)
        gen.stop_ids = set()
        out["model"] = gen.cfg.model.name
        if not tasks:
            room = args.new_tokens + 128  # the new tokens and a round's drafts must fit the model's context
            for c in args.real_contexts:
                ctx = min(c, gen.context_length - room)
                tasks[ctx] = code_tasks(gen.tokenizer, [ctx], max(args.batches), args.corpus_dir)
        for ctx, ts in tasks.items():
            for batch in args.batches:
                try:
                    out["rows"].append(real_run(gen, pipeline, ctx, [t.prompt_ids for t in ts[:batch]],
                                                [t.id for t in ts[:batch]], args.new_tokens, 256 if smoke else 2560))
                except (ValueError, torch.OutOfMemoryError) as e:  # the planner's "does not fit" or a real OOM
                    out["skipped"].append({"pipeline": pipeline, "batch": batch, "context": ctx, "reason": str(e)[:300]})
                    print(json.dumps(out["skipped"][-1]), flush=True)
                gc.collect()
                if gen.device.type == "cuda":
                    torch.cuda.empty_cache()
        gen._tiers = None
        del gen
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def real_speedups(real: dict) -> dict:
    """Per context and pipeline: throughput over batched AR of the same rows, per batch size."""
    res: dict = {}
    for row in real["rows"]:
        if row["pipeline"] == "autoregressive":
            continue
        ar = next((r for r in real["rows"] if r["pipeline"] == "autoregressive" and r["batch"] == row["batch"]
                   and r["context"] == row["context"]), None)
        if ar is not None:
            res.setdefault(str(row["context"]), {}).setdefault(row["pipeline"], {})[str(row["batch"])] = \
                row["tokens_per_second"] / ar["tokens_per_second"]
    return res


def speedups(shape: dict) -> dict:
    """Best speculative throughput over batched AR, per batch size and injected rate."""
    res: dict = {}
    for row in shape["e2e"]:
        if row["pipeline"] == "autoregressive":
            continue
        ar = next(r for r in shape["e2e"] if r["pipeline"] == "autoregressive" and r["batch"] == row["batch"])
        x = row["tokens_per_second"] / ar["tokens_per_second"]
        key = str(row["injected"])
        best = res.setdefault(key, {}).get(str(row["batch"]))
        if best is None or x > best["speedup"]:
            res[key][str(row["batch"])] = {"speedup": x, "pipeline": row["pipeline"], "gamma": row["gamma"]}
    return res


def summarize(out: dict) -> dict:
    s: dict = {}
    for shape in out["shapes"]:
        sp = speedups(shape)
        s[f"speedup_by_batch_{shape['shape']}"] = {r: {b: v["speedup"] for b, v in d.items()} for r, d in sp.items()}
        s[f"best_by_batch_{shape['shape']}"] = sp
        for st in shape["steps"]:
            s.setdefault(f"batch_ar_over_floor_{shape['shape']}", {})[str(st["batch"])] = st["over_floor"]
    q = next((x for x in out["shapes"] if x["shape"] == "q15_32k"), None)
    if q is not None:
        sp = speedups(q).get("0.9", {})
        s["batch32_speedup_vs_batched_ar_q15_32k"] = sp.get("32", {}).get("speedup")
        s["batch_ar_over_floor_q15_32k_b32"] = next((st["over_floor"] for st in q["steps"] if st["batch"] == 32), None)
        s["speedup_grows_b4_to_b32"] = (sp["32"]["speedup"] > sp["4"]["speedup"]) if "4" in sp and "32" in sp else None
        hf = q.get("hf") or {}
        ar16 = next((r for r in q["e2e"] if r["pipeline"] == "autoregressive" and r["batch"] == 16), None)
        if "ms_per_step" in hf and ar16:
            s["batch_ar_speedup_vs_hf_b16"] = hf["ms_per_step"] / ar16["ms_per_step_per_row"]
        best = sp.get("32")
        row = best and next((r for r in q["e2e"] if r["batch"] == 32 and r["pipeline"] == best["pipeline"]
                             and r["gamma"] == best["gamma"] and r["injected"] == 0.9), None)
        if row is not None:  # what bounds the best B=32 run: its steps, and rounds lost to the batch's slowest row
            tiers, new = row["tiers"], row["tokens"] // row["batch"]
            draft = next(k for k in tiers if k != "target")
            s["batch32_best_breakdown_q15_32k"] = {
                "pipeline": row["pipeline"], "gamma": row["gamma"], "wall_ms": row["tokens"] / row["tokens_per_second"] * 1e3,
                "draft_step_ms": tiers[draft]["ms_per_forward"], "verify_step_ms": tiers["target"]["ms_per_forward"],
                "target_rounds": tiers["target"]["forwards"],
                "mean_row_rounds": new / tiers["target"]["mean_accepted_length"],
                "outside_forwards_ms": row["outside_forwards_ms"]}
        s["targets"] = targets(s)
    if out.get("real"):  # the real pair: speedup per context, pipeline and B, the best at B=32, real acceptance
        sp = real_speedups(out["real"])
        s["real_speedup_by_batch"] = sp
        s["real_acceptance_by_batch"] = {}
        for r in out["real"]["rows"]:
            if r["pipeline"] != "autoregressive":
                s["real_acceptance_by_batch"].setdefault(str(r["context"]), {}).setdefault(r["pipeline"], {})[
                    str(r["batch"])] = r["tiers"]["target"]["acceptance_rate"]
        longest = max(sp, key=int) if sp else None
        at32 = {p: d["32"] for p, d in sp.get(longest, {}).items() if "32" in d}
        if at32:
            best = max(at32, key=at32.get)
            s["real_batch32_speedup_vs_batched_ar_q15_32k"] = {"speedup": at32[best], "pipeline": best,
                                                               "context": int(longest)}
    if out.get("continuous"):  # per pipeline, at the largest batch measured
        for pipe in sorted({r["pipeline"] for r in out["continuous"]}):
            row = max((r for r in out["continuous"] if r["pipeline"] == pipe), key=lambda r: r["batch"])
            s[f"continuous_over_static_{pipe}"] = {"batch": row["batch"], "wall": row["continuous_over_static"],
                                                   "decode": row["continuous_over_static_decode"]}
    return s


def targets(s: dict) -> dict:
    """Each target of the batched-speculation work, met or missed by how much."""
    def check(value, ok: bool) -> str:
        return "not measured" if value is None else f"{'met' if ok else 'missed'} ({value:.2f})"
    x, f, h = (s.get(k) for k in ("batch32_speedup_vs_batched_ar_q15_32k", "batch_ar_over_floor_q15_32k_b32",
                                  "batch_ar_speedup_vs_hf_b16"))
    grows = s.get("speedup_grows_b4_to_b32")
    return {"batch32_speedup_vs_batched_ar_q15_32k >= 2.5": check(x, x is not None and x >= 2.5),
            "speedup grows from B=4 to B=32": "not measured" if grows is None else ("met" if grows else "missed"),
            "batch_ar_over_floor_q15_32k_b32 <= 1.2": check(f, f is not None and f <= 1.2),
            "batch_ar_speedup_vs_hf_b16 >= 5": check(h, h is not None and h >= 5)}


def merge(paths: list[Path], out_path: Path) -> dict:
    """One file from runs of different shapes (the first run's header; a later run's shape replaces an earlier one)."""
    runs = [json.loads(p.read_text()) for p in paths]
    out = {k: v for k, v in runs[0].items() if k not in ("shapes", "summary")}
    shapes: dict = {}
    for r in runs:
        for shape in r["shapes"]:
            shapes[shape["shape"]] = shape
    out["shapes"] = list(shapes.values())
    for r in runs:  # the last run with a real-pair part supplies it
        if r.get("real"):
            out["real"] = r["real"]
    out["merged_from"] = [{"file": p.name, "shapes": [x["shape"] for x in r["shapes"]],
                           "real": bool(r.get("real")), "bandwidth_gb_s": r["bandwidth_gb_s"]}
                          for p, r in zip(paths, runs)]
    out["summary"] = summarize(out)
    out_path.write_text(json.dumps(out, indent=1))
    plot(out, out_path.with_suffix(".png"))
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for shape in out["shapes"]:
        for rate, d in speedups(shape).items():
            bs = sorted(int(b) for b in d)
            ax.plot(bs, [d[str(b)]["speedup"] for b in bs], "o-" if rate == "0.9" else "s--",
                    label=f"{shape['shape']} @ {rate}")
    for ctx, pipes in (real_speedups(out["real"]) if out.get("real") else {}).items():
        for pipe, d in pipes.items():
            bs = sorted(int(b) for b in d)
            ax.plot(bs, [d[str(b)] for b in bs], "^:", label=f"real Qwen pair {pipe} @ {ctx} (real acceptance)")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set(xscale="log", xlabel="batch size B", ylabel="throughput over batched autoregressive",
           title="Batched speculation: injected acceptance (best pipeline) and the real pair")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--smoke", action="store_true", help="CPU (or GPU) at toy sizes: every part runs, numbers mean nothing")
    ap.add_argument("--continuous", action="store_true",
                    help="also: mixed-length jobs, continuous batching against static batches (1.5B + 0.5B shapes)")
    ap.add_argument("--continuous-context", type=int, default=4096, help="prompt length of the continuous part")
    ap.add_argument("--real", action="store_true",
                    help="the real Qwen2.5-Coder pair on real code prompts (real acceptance) instead of random shapes")
    ap.add_argument("--real-contexts", type=int, nargs="+", default=[8192, 32768], help="prompt lengths of --real")
    ap.add_argument("--real-overrides", nargs="+", default=None,
                    help="Hydra overrides choosing the real model (default: +model=qwen2.5-coder-1.5b)")
    ap.add_argument("--corpus-dir", default=str(ROOT / "data/code"), help="the code corpus (scripts/fetch_code_corpus.py)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON", help="join runs of other shapes (needs --out)")
    args = ap.parse_args(argv)
    if args.merge:
        if args.out is None:
            ap.error("--merge needs --out")
        out = merge(args.merge, args.out)
        print(json.dumps(out["summary"], indent=1))
        return out
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("error: bench_batch.py measures GPU steps; on a CPU run it with --smoke")
    if args.smoke:
        args.batches, args.shapes, args.new_tokens = [1, 3], ["q15_8k"], 6
        if args.real:
            args.real_contexts = [600]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out = {"gpu": name, "torch": torch.__version__, "python": platform.python_version(),
           "settings": {"dtype": "float32 (smoke)" if args.smoke else "bfloat16", "weights": "random",
                        "retrieval_budget": 2048, "retrieval_chunk": 8, "streaming": "16 sinks + 496 recent",
                        "temperature": 0.6, "top_p": 1.0, "new_tokens_per_row": args.new_tokens, "cuda_graphs": device.type == "cuda",
                        "injected_acceptance": "benchmark-only switch: the target's accept/reject decisions drawn at the given "
                                               "rate (triforce: the retrieval tier accepts the tiny's at 0.8)"}}
    if device.type == "cuda":
        import triton
        import transformers
        out.update(triton=triton.__version__, cuda=torch.version.cuda, transformers=transformers.__version__)
    bw = copy_bandwidth() if device.type == "cuda" else None
    out["bandwidth_gb_s"] = bw
    torch.manual_seed(0)
    path = args.out or (Path("/tmp/triforce_batch_smoke.json") if args.smoke else ROOT / f"results/batch_{gpu_tag(name)}.json")
    out["shapes"] = []
    if args.real:
        path = args.out or (Path("/tmp/triforce_batch_real_smoke.json") if args.smoke
                            else ROOT / f"results/batch_real_{gpu_tag(name)}.json")
        out["settings"].update(weights="real (the real pair's GGUFs, dequantized)", injected_acceptance=None)
        out["real"] = run_real(args, args.smoke)
        out["summary"] = summarize(out)
        path.write_text(json.dumps(out, indent=1))
        print(json.dumps(out["summary"], indent=1))
        return out
    for s in args.shapes:  # written after each shape: a run cut short keeps what it measured
        out["shapes"].append(run_shape(s, args.batches, args.new_tokens, bw, device, args.smoke))
        out["summary"] = summarize(out)
        path.write_text(json.dumps(out, indent=1))
    if args.continuous or args.smoke:
        out["continuous"] = run_continuous([b for b in args.batches if b > 1], args.new_tokens,
                                           64 if args.smoke else args.continuous_context, device, args.smoke)
        out["summary"] = summarize(out)
        path.write_text(json.dumps(out, indent=1))
    if not args.smoke:
        plot(out, path.with_suffix(".png"))
    print(json.dumps(out["summary"], indent=1))
    return out


if __name__ == "__main__":
    main()
