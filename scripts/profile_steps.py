"""Where a small model's decode step goes: kernels per layer, GPU busy vs wall time, top kernels, host per round.

Small steps sit 3-4x above their byte floor while a 7B step is at it; the suspicion is kernel
count (launch, tail and ramp of ~10 kernels per layer under CUDA graphs), not bytes. This script
measures that directly, with random weights of the exact shapes and CUDA graphs, as decode runs:

  steps   Qwen2.5-0.5B tiny-draft decode over a streaming cache (16 sinks + 496 recent);
          Qwen2.5-1.5B autoregressive at 32K and retrieval tier (4K budget) over it;
          Llama-2-7B autoregressive at the longest context up to 128K that fits, retrieval tier at 4K.
          Per step: kernels (per layer = sum over kernel names of calls // n_layers, the rest per
          step), GPU busy time (kernel intervals merged), wall time (bursts of 8 replays between
          CUDA events, without the profiler), the gap between them, and the top kernels by time.
          With the fused-projection switch present in the model, every step is profiled with it
          on and off.
  rounds  a real engine round: SpeculativeEngine over [target, retrieval, tiny] with acceptance
          decisions INJECTED (benchmark-only switch; random weights accept nothing): wall time per
          target round, GPU busy in it, host time blocked in synchronisation (profiled), and so the
          host's own share.

    python scripts/profile_steps.py            # one H200 call, ~2-3 minutes -> results/profile_<gpu>.json
    python scripts/profile_steps.py --smoke    # CPU, tiny shapes, no CUDA: exercises the code paths only
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from collections import Counter
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from bench_speed import (LLAMA2_7B, LLAMA_68M, QWEN05, QWEN15, copy_bandwidth, cuda_time, fill_random, gpu_tag,
                         random_prompt_prefill)
from triforce.cache import FullCache, RetrievalCache, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.graphs import GraphedModel, graph_sizes
from triforce.models.llama import ModelArgs, build_model

ROOT = Path(__file__).resolve().parents[1]
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
TINY = ModelArgs(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=96,
                 max_position_embeddings=4096, tie_word_embeddings=True, attention_bias=True)


def size_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 else str(n)


def device_spans(prof, on_cuda: bool) -> list[tuple[str, float, float]]:
    """(name, start_us, end_us) of every GPU activity (kernels, memcpy, memset) in a profile.

    On CPU (--smoke) the top-level aten ops stand in for kernels, so the same accounting runs.
    """
    spans = []
    for e in prof.events():
        if on_cuda:
            if e.device_type != DeviceType.CUDA:
                continue
        elif e.device_type != DeviceType.CPU or e.cpu_parent is not None or not e.name.startswith("aten::"):
            continue
        spans.append((e.name, e.time_range.start, e.time_range.end))
    return spans


def merged_us(spans: list[tuple[str, float, float]]) -> float:
    """Length of the union of the spans' intervals (concurrent kernels counted once)."""
    total, end = 0.0, float("-inf")
    for _, a, b in sorted(spans, key=lambda s: s[1]):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def account(spans: list[tuple[str, float, float]], steps: int, n_layers: int, top: int = 8) -> dict:
    """Per-step kernel counts (total, per layer, per step outside the layer loop) and times.

    A kernel name called c times per step contributes c // n_layers to the per-layer count and
    the remainder to the per-step count (e.g. the GEMV: 4 per layer + the LM head).
    """
    calls = Counter(name for name, _, _ in spans)
    us = Counter()
    for name, a, b in spans:
        us[name] += b - a
    per_step = {name: round(c / steps) for name, c in calls.items()}
    per_layer = sum(c // n_layers for c in per_step.values())
    total = sum(per_step.values())
    busy = merged_us(spans) / steps
    return {
        "kernels_per_step": total, "kernels_per_layer": per_layer, "kernels_outside_layers": total - per_layer * n_layers,
        "gpu_busy_ms": busy / 1e3,
        "profiled_span_ms": (max(b for _, _, b in spans) - min(a for _, a, _ in spans)) / steps / 1e3 if spans else 0.0,
        "top_kernels": [{"name": name[:90], "calls_per_step": per_step[name], "us_per_step": t / steps,
                         "share_of_busy": t / steps / busy if busy else None}
                        for name, t in us.most_common(top)],
    }


def profile_calls(fn, steps: int, on_cuda: bool, cpu: bool = False):
    """Run fn() `steps` times under torch.profiler (CUDA activity; CPU too with `cpu` or off-GPU)."""
    acts = ([ProfilerActivity.CUDA] if on_cuda else []) + ([ProfilerActivity.CPU] if cpu or not on_cuda else [])
    sync()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync()
    return prof


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def wall_ms(fn, on_cuda: bool, burst: int = 8) -> float:
    """Milliseconds per call, calls issued back to back in bursts (a decode loop's rhythm)."""
    def run():
        for _ in range(burst):
            fn()
    if on_cuda:
        return cuda_time(run, repeats=10) / burst
    run()
    t0 = time.perf_counter()
    run()
    return (time.perf_counter() - t0) * 1e3 / burst


def has_switch(model) -> bool:
    return hasattr(model, "fused_projections")


def profile_step(name: str, model, cache, reset, on_cuda: bool, steps: int) -> list[dict]:
    """One decode step (1 token) of `model` over `cache`: graphed on CUDA, eager on CPU; fused on/off."""
    rows = []
    settings = (True, False) if has_switch(model) else (None,)
    for fused in settings:
        if fused is not None:
            model.fused_projections = fused
        tokens = torch.randint(0, model.args.vocab_size, (1, 1), device=model.device)
        if on_cuda:
            graphed = GraphedModel(model, cache, {1})

            def step():
                reset()
                graphed(tokens, 1)
        else:
            def step():
                reset()
                model(tokens, cache, last=1)
        for _ in range(3):
            step()  # captures the graph (and compiles the elementwise pieces) outside the timing
        wall = wall_ms(step, on_cuda)
        prof = profile_calls(step, steps, on_cuda)
        row = {"step": name, "fused_projections": fused, "n_layers": model.args.n_layers, "wall_ms": wall}
        row.update(account(device_spans(prof, on_cuda), steps, model.args.n_layers))
        row["gap_ms"] = wall - row["gpu_busy_ms"]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_kernels"}), flush=True)
        del prof
    if has_switch(model):
        model.fused_projections = True
    return rows


def profile_round(label: str, target, tiny, ctx: int, gammas: tuple[int, int], on_cuda: bool, tokens: int) -> dict:
    """Steady-state rounds of a real three-tier engine, acceptance injected (retrieval 0.9, tiny 0.8).

    Two runs with the same seed, of `tokens` and 3 x `tokens` new tokens, share their first
    rounds, so their difference is pure steady state: no graph capture, no stand-in prefill and
    no retrieval selection over the prompt (paid once per prompt). Per target round: wall time,
    GPU busy (kernels merged), the GPU's idle time, and from profiled runs the host's time blocked
    in synchronisation (the host's own share is the rest; the profiler inflates it).
    """
    full = FullCache(target, ctx + 3 * tokens + 64)
    fill_random(full, ctx - 1)
    ret = RetrievalCache(full, target, 4096 if on_cuda else 16, 8 if on_cuda else 4)
    stream = StreamingCache(tiny, 16 if on_cuda else 4, 496 if on_cuda else 12, slack=64, max_forward=512)
    tiers = [Tier("target", target, full, gamma=gammas[0]), Tier("retrieval", target, ret, gamma=gammas[1]),
             Tier("tiny", tiny, stream)]
    if on_cuda:
        for level, t in enumerate(tiers):
            t.graphed = GraphedModel(t.model, t.cache, graph_sizes(tiers, level))
    eng = SpeculativeEngine(tiers, 0.6, 0.9, injected_acceptance={0: 0.9, 1: 0.8})
    prefill_s = [0.0]
    eng._prefill, eng.prefill_seconds = random_prompt_prefill(tiers, ctx, prefill_s), 0.0
    prompt = torch.randint(0, target.args.vocab_size, (ctx,))
    eng.generate(prompt, tokens, seed=0)  # captures every graph the timed runs use

    def run(n: int) -> dict:
        sync()
        t0 = time.perf_counter()
        got = len(eng.generate(prompt, n, seed=1))
        sync()
        wall = time.perf_counter() - t0 - prefill_s[0]
        stats = eng.stats(got)
        prof = profile_calls(lambda: eng.generate(prompt, n, seed=1), 1, on_cuda, cpu=True)
        cpu = [e for e in prof.events() if e.device_type == DeviceType.CPU]
        spans = device_spans(prof, on_cuda)
        span_us = max(e.time_range.end for e in cpu) - min(e.time_range.start for e in cpu)
        blocked = sum(e.time_range.end - e.time_range.start for e in cpu if e.name.startswith(SYNC_CALLS))
        return {"wall_ms": 1e3 * wall, "rounds": stats["target"]["rounds"], "tokens": got,
                "forwards": {k: v["forwards"] for k, v in stats.items()}, "busy_ms": merged_us(spans) / 1e3,
                "kernels": len(spans), "profiled_ms": span_us / 1e3 - 1e3 * prefill_s[0], "blocked_ms": blocked / 1e3}

    a, b = run(tokens), run(3 * tokens)
    rounds = b["rounds"] - a["rounds"]
    if rounds < 1:
        raise RuntimeError(f"{label}: the longer run added no target round ({a['rounds']} vs {b['rounds']})")

    def per_round(key):
        return (b[key] - a[key]) / rounds
    row = {
        "round": label, "context": ctx, "gamma": gammas[0], "tiny_gamma": gammas[1],
        "injected": {"retrieval": 0.9, "tiny": 0.8}, "target_rounds": rounds, "tokens": b["tokens"] - a["tokens"],
        "forwards_per_round": {k: (b["forwards"][k] - a["forwards"][k]) / rounds for k in b["forwards"]},
        "wall_ms_per_round": per_round("wall_ms"),
        "gpu_busy_ms_per_round": per_round("busy_ms"),
        "gpu_idle_ms_per_round": per_round("wall_ms") - per_round("busy_ms"),
        "profiled_wall_ms_per_round": per_round("profiled_ms"),
        "host_blocked_ms_per_round": per_round("blocked_ms"),
        "host_active_ms_per_round_profiled": per_round("profiled_ms") - per_round("blocked_ms"),
        "kernels_per_round": per_round("kernels"),
    }
    row["tokens_per_round"] = row["tokens"] / rounds
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: exercise the code paths, measure nothing")
    ap.add_argument("--steps", type=int, default=None, help="graph replays per profile (20; 2 with --smoke)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    on_cuda = not args.smoke
    args.steps = args.steps or (20 if on_cuda else 2)
    if on_cuda and not torch.cuda.is_available():
        raise SystemExit("profile_steps.py needs a CUDA GPU (or --smoke for a CPU dry run of the code paths)")
    dev, dt = ("cuda", torch.bfloat16) if on_cuda else ("cpu", torch.float32)
    name = torch.cuda.get_device_name() if on_cuda else "cpu-smoke"
    out = {"gpu": name, "torch": torch.__version__, "python": platform.python_version(),
           "settings": {"dtype": str(dt).removeprefix("torch."), "weights": "random", "cuda_graphs": on_cuda,
                        "steps_profiled": args.steps,
                        "injected_acceptance": "benchmark-only switch: accept/reject decisions drawn at the given rate"}}
    if on_cuda:
        import triton
        out["triton"], out["cuda"] = triton.__version__, torch.version.cuda
        out["bandwidth_gb_s"] = copy_bandwidth()
    steps, rounds = [], []
    q05, q15, big = (QWEN05, QWEN15, LLAMA2_7B) if on_cuda else (TINY, TINY, TINY)
    ctx_q15 = 32768 if on_cuda else 256
    budget, chunk = (4096, 8) if on_cuda else (16, 4)
    with torch.inference_mode():
        tiny = build_model(q05, None, dev, dt, seed=1).eval()
        sinks, window = (16, 496) if on_cuda else (4, 12)
        stream = StreamingCache(tiny, sinks, window, slack=32, max_forward=512)
        tiny(torch.randint(0, q05.vocab_size, (1, sinks + window), device=dev), stream)
        steps += profile_step("q05_tiny_decode_streaming", tiny, stream, lambda: stream.truncate(sinks + window),
                              on_cuda, args.steps)

        model = build_model(q15, None, dev, dt, context_length=q15.max_position_embeddings).eval()
        full = FullCache(model, ctx_q15 + 64)
        fill_random(full, ctx_q15)
        steps += profile_step(f"q15_ar_{size_label(ctx_q15)}", model, full, lambda: full.truncate(ctx_q15), on_cuda,
                              args.steps)
        ret = RetrievalCache(full, model, budget, chunk)
        ret.adopt_prefix(ctx_q15)
        model(torch.zeros(1, 1, dtype=torch.long, device=dev), ret)  # the selection step (eager)
        ret.truncate(ctx_q15)
        steps += profile_step(f"q15_retrieval_{size_label(budget)}", model, ret, lambda: ret.truncate(ctx_q15),
                              on_cuda, args.steps)
        del ret, full
        gc.collect()
        rounds.append(profile_round("q15+q05 triforce", model, tiny, ctx_q15, (12, 6), on_cuda, 64 if on_cuda else 8))
        del model, tiny
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()

        model = build_model(big, None, dev, dt, context_length=big.max_position_embeddings).eval()
        if on_cuda:
            gc.collect()
            torch.cuda.empty_cache()
            free = torch.cuda.mem_get_info()[0]
            kvtok = big.kv_bytes_per_token(2)
            ctx = min(int((free - 6 * 2**30) / kvtok) - 320, 131072 - 1024) // 1024 * 1024
        else:
            ctx = 256
        full = FullCache(model, ctx + 64)
        fill_random(full, ctx)
        steps += profile_step(f"7b_ar_{size_label(ctx)}", model, full, lambda: full.truncate(ctx), on_cuda, args.steps)
        ret = RetrievalCache(full, model, budget, chunk)
        ret.adopt_prefix(ctx)
        model(torch.zeros(1, 1, dtype=torch.long, device=dev), ret)
        ret.truncate(ctx)
        steps += profile_step(f"7b_retrieval_{size_label(budget)}", model, ret, lambda: ret.truncate(ctx),
                              on_cuda, args.steps)
        del ret, full
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        tiny = build_model(LLAMA_68M if on_cuda else TINY, None, dev, dt, seed=1).eval()
        # the round's target cache: the context shrinks by what the round's own cache needs on top
        rounds.append(profile_round("7b+68m triforce", model, tiny, ctx - 1024 if on_cuda else ctx, (12, 6), on_cuda,
                                    64 if on_cuda else 8))
    out["steps"], out["rounds"] = steps, rounds
    out["summary"] = {f"{r['step']}{'' if r['fused_projections'] is None else ('_fused' if r['fused_projections'] else '_unfused')}":
                      {k: r[k] for k in ("kernels_per_layer", "kernels_per_step", "wall_ms", "gpu_busy_ms", "gap_ms")}
                      for r in steps}
    path = Path(args.out or ROOT / f"results/profile_{gpu_tag(name) if on_cuda else 'smoke'}.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"\n{'step':34s} {'fused':>6s} {'k/layer':>8s} {'k/step':>7s} {'wall ms':>8s} {'busy ms':>8s} {'gap ms':>7s}  top kernel")
    for r in steps:
        top = r["top_kernels"][0] if r["top_kernels"] else {"name": "-", "share_of_busy": 0}
        print(f"{r['step']:34s} {str(r['fused_projections']):>6s} {r['kernels_per_layer']:8d} {r['kernels_per_step']:7d} "
              f"{r['wall_ms']:8.3f} {r['gpu_busy_ms']:8.3f} {r['gap_ms']:7.3f}  {top['name'][:40]} "
              f"({100 * (top['share_of_busy'] or 0):.0f}%)")
    for r in rounds:
        print(f"{r['round']}: {r['wall_ms_per_round']:.2f} ms/round wall, GPU busy {r['gpu_busy_ms_per_round']:.2f}, "
              f"idle {r['gpu_idle_ms_per_round']:.2f}, host blocked {r['host_blocked_ms_per_round']:.2f} "
              f"(profiled), {r['kernels_per_round']:.0f} kernels/round")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
