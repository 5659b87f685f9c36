"""Offloaded target KV on an emulated 24 GB GPU (issue 5): steps against the PCIe floor, and end to end.

Llama-2-7B-128K shape, random bf16 weights, a ~120K-token context. The memory planner decides
from `--gpu-memory-gb` (default 24, enforced with torch.cuda.set_per_process_memory_fraction)
how many target KV layers stay on the GPU and which retrieval budget fits; the rest of the
target's KV lives in pinned host memory and streams through two staging slots per target
forward. Measured in one run:
  * host<->device copy bandwidth (pinned), and HBM copy bandwidth;
  * offloaded target steps for 1 (autoregressive) and gamma+1 in 8, 16, 32 tokens against the
    floor = offloaded KV bytes / host-to-device bandwidth;
  * the retrieval tier's step (CUDA graph over the store's device mirror) and a tiny-draft step;
  * end to end with acceptance decisions INJECTED (benchmark-only switch: random weights accept
    nothing) at 0.8 / 0.9 / 0.95 for the retrieval tier, 2 tiers and 3 tiers (tiny draft at
    `--tiny-acceptance`), against offloaded autoregressive decoding; plus a model of the speedup
    over gamma from the measured step times, which names the best gamma.

  * time to first token of a prompt of `--context` tokens prefilled with the target's KV
    offloaded, against its PCIe floor (every chunk streams the prefix of each offloaded layer
    back from host memory: context^2 / (2 prefill_chunk) tokens per layer) and its FLOP floor.
    `--prefill-chunk` (default 4096): 8x less PCIe traffic than the engine's 512 (about 1 TB
    instead of 7.7 at 120K for a 7B), and its workspace still fits the 24 GB plan with the full
    retrieval budget (8192 would halve that budget).

    python scripts/bench_offload.py [--context 122880] [--gpu-memory-gb 24] [--out results/offload_h100.json]
    python scripts/bench_offload.py --prefill-only      # setup, plan and the offloaded prefill alone
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bench_speed import DT, LLAMA2_7B, LLAMA_68M, copy_bandwidth, cuda_time, matmul_tflops, prefill_flops
from triforce.cache import RetrievalCache, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.graphs import GraphedModel, graph_sizes
from triforce.models.llama import build_model
from triforce.offload import OffloadedFullCache
from triforce.planner import GiB, host_available_bytes, plan_memory

ROOT = Path(__file__).resolve().parents[1]
START = time.perf_counter()
RATES = (0.8, 0.9, 0.95)


def host_bandwidth() -> dict:
    """GB/s of pinned host->device and device->host copies of 1 GiB."""
    h = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    d = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    h2d = cuda_time(lambda: d.copy_(h, non_blocking=True), repeats=8)
    d2h = cuda_time(lambda: h.copy_(d, non_blocking=True), repeats=8)
    return {"h2d_gb_s": (1 << 30) / h2d / 1e6, "d2h_gb_s": (1 << 30) / d2h / 1e6}


def fill_random(cache: OffloadedFullCache, length: int) -> None:
    """Stand-in for a prefill: random KV on the GPU, copied into every offloaded layer's host memory."""
    cache.dev_k[:, :, :length].normal_()
    cache.dev_v[:, :, :length].normal_()
    block = torch.randn(16384, cache.n_kv_heads, cache.head_dim, dtype=cache.dtype, device="cuda")
    for j in range(cache.host_k.shape[0]):
        for a in range(0, length, block.shape[0]):
            b = min(length, a + block.shape[0])
            cache.host_k[j, a:b].copy_(block[:b - a], non_blocking=True)
            cache.host_v[j, a:b].copy_(block[:b - a].flip(0), non_blocking=True)
    torch.cuda.synchronize()
    adopt_random(cache, length)


def adopt_random(cache: OffloadedFullCache, length: int) -> None:
    """Pretend a prefill of `length` tokens just ran (the KV is already in place)."""
    cache.length = cache.high = length
    cache.tail_start = None


def offloaded_steps(model, cache, ctx: int, sizes, floor_ms: float) -> list[dict]:
    """Eager offloaded target forwards of T tokens at ctx (rolled back before each)."""
    rows = []
    for t in sizes:
        tokens = torch.randint(0, model.args.vocab_size, (1, t), device="cuda")

        def run():
            cache.truncate(ctx)
            model(tokens, cache)
        ms = cuda_time(run, repeats=3, warmup=1)
        rows.append({"tokens": t, "ms": ms, "floor_ms": floor_ms, "over_floor": ms / floor_ms})
        print(json.dumps(rows[-1]), flush=True)
    cache.truncate(ctx)
    return rows


def graphed_step(model, cache, n_new: int, ctx: int) -> float:
    g = GraphedModel(model, cache, {n_new})
    tokens = torch.randint(0, model.args.vocab_size, (1, n_new), device="cuda")

    def run():
        cache.truncate(ctx)
        g(tokens, n_new)
    return cuda_time(run)


def offloaded_prefill(model, full: OffloadedFullCache, ctx: int, chunk: int, h2d_gb_s: float, tflops: float) -> dict:
    """Time to first token of a ctx-token prompt, the target's KV offloaded: chunked prefill (each
    chunk streams the prefix of every offloaded layer from host memory), then one decode step."""
    engine = SpeculativeEngine([Tier("target", model, full)], 0.0, 1.0, prefill_chunk=chunk)
    prompt = torch.randint(0, model.args.vocab_size, (ctx,))
    engine.generate(prompt[:2 * chunk + 1], 1)  # compiles and kernel plans, outside the timing
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    assert len(engine.generate(prompt, 1)) == 1
    ttft = time.perf_counter() - t0
    a = model.args
    token_layer = a.kv_bytes_per_token(2) // a.n_layers
    streamed = full.host_k.shape[0] * token_layer * sum(range(0, ctx - 1, chunk))  # prefix bytes read back per chunk
    pcie = streamed / (h2d_gb_s * 1e9)
    flop = prefill_flops(a, ctx) / (tflops * 1e12)
    row = {"context": ctx, "prefill_chunk": chunk, "ttft_s": ttft, "streamed_gb": streamed / 1e9,
           "pcie_floor_s": pcie, "flop_floor_s": flop, "over_floor": ttft / max(pcie, flop)}
    print(json.dumps(row), flush=True)
    return row


def predicted(rate: float, gamma: int, steps: dict, tiny_rate: float | None, gamma2: int) -> float:
    """Speedup over offloaded AR from step times: expected tokens per target round / round cost.

    2 tiers: a round is gamma retrieval steps + one verify. 3 tiers: the retrieval tier
    produces its gamma tokens in rounds of (gamma2 tiny steps + one retrieval verify of gamma2+1).
    """
    tokens = (1 - rate ** (gamma + 1)) / (1 - rate)
    verify = steps["verify_ms"](gamma + 1)
    if tiny_rate is None:
        draft = gamma * steps["retrieval_ms"]
    else:
        per_round = (1 - tiny_rate ** (gamma2 + 1)) / (1 - tiny_rate)
        draft = gamma / per_round * (steps["retrieval_verify_ms"] + gamma2 * steps["tiny_ms"])
    return tokens * steps["ar_ms"] / (verify + draft)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=122880)
    ap.add_argument("--gpu-memory-gb", type=float, default=24.0)
    ap.add_argument("--budget", type=int, default=4096, help="retrieval budget asked of the planner")
    ap.add_argument("--gammas", type=int, nargs="+", default=[24, 32])
    ap.add_argument("--gamma2", type=int, default=4, help="tiny-draft tokens per retrieval verification")
    ap.add_argument("--tiny-acceptance", type=float, default=0.8,
                    help="injected tiny-draft acceptance (measured on SmolLM2: results/cpu_pipelines_smollm2.json)")
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--no-enforce", action="store_true", help="do not cap the allocator at --gpu-memory-gb")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds after which remaining e2e runs are skipped")
    ap.add_argument("--prefill-chunk", type=int, default=4096,
                    help="prefill_chunk of the timed offloaded prefill (PCIe traffic grows as context^2 / this)")
    ap.add_argument("--prefill-only", action="store_true", help="time the offloaded prefill only")
    ap.add_argument("--out", default=None)
    ap.add_argument("--summarize-only", metavar="JSON", help="recompute the summary and plot of an earlier run")
    args = ap.parse_args()
    if args.summarize_only:
        path = Path(args.summarize_only)
        out = json.loads(path.read_text())
        out["summary"] = summarize(out)
        path.write_text(json.dumps(out, indent=1))
        plot(out, path.with_suffix(".png"))
        print(json.dumps(out["summary"], indent=1))
        return
    if not torch.cuda.is_available():
        raise SystemExit("bench_offload.py needs a CUDA GPU (it measures PCIe streaming of the target's KV)")
    import triton

    name = torch.cuda.get_device_name()
    total = torch.cuda.get_device_properties(0).total_memory
    out = {"gpu": name, "gpu_total_gib": total / GiB, "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "settings": {"dtype": "bfloat16", "model": "Llama-2-7B-128K shape, random weights", "tiny": "llama-68m shape",
                        "context": args.context, "gpu_memory_gb": args.gpu_memory_gb, "enforced": not args.no_enforce,
                        "retrieval_chunk": 8, "streaming": "16 sinks + 496 recent", "gamma2": args.gamma2,
                        "tiny_acceptance_injected": args.tiny_acceptance, "new_tokens": args.new_tokens,
                        "injected_acceptance": "benchmark-only switch: accept/reject decisions drawn at the given rate"}}
    path = Path(args.out or ROOT / f"results/offload_{'h100' if 'H100' in name else name.split()[-1].lower()}.json")

    def save():
        path.write_text(json.dumps(out, indent=1))

    torch.manual_seed(0)
    out["hbm_copy_gb_s"] = copy_bandwidth()
    out.update(host_bandwidth())
    out["matmul_tflops"] = matmul_tflops()
    print(json.dumps({k: out[k] for k in ("hbm_copy_gb_s", "h2d_gb_s", "d2h_gb_s", "matmul_tflops")}), flush=True)
    a, ctx = LLAMA2_7B, args.context
    capacity = ctx + args.new_tokens + max(args.gammas) * 2 + 64
    plan = plan_memory(a, capacity, args.budget, max(args.gammas), LLAMA_68M, 2, int(args.gpu_memory_gb * GiB),
                       host_available_bytes(), "auto", new_tokens=args.new_tokens + 2 * max(args.gammas),
                       draft_cache_tokens=16 + 496 + 32 + 512, draft_gamma=args.gamma2, prefill_chunk=args.prefill_chunk)
    out["plan"] = plan.describe()
    out["resident_layers"], out["budget"] = plan.resident_layers, plan.budget
    print(plan.describe(), flush=True)
    if not args.no_enforce:  # the run must really fit the emulated card
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gb * GiB / total))
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = build_model(a, None, "cuda", DT, context_length=131072).eval()
    tiny = build_model(LLAMA_68M, None, "cuda", DT, seed=1).eval()
    full = OffloadedFullCache(model, capacity, plan.resident_layers, plan.transfer_chunk)
    if args.prefill_only:
        with torch.inference_mode():
            out["offload_prefill"] = offloaded_prefill(model, full, ctx, args.prefill_chunk, out["h2d_gb_s"],
                                                       out["matmul_tflops"])
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GiB
        out["summary"] = summarize(out)
        save()
        print(json.dumps(out["summary"], indent=1))
        return
    fill_random(full, ctx)
    out["setup_seconds"] = time.perf_counter() - t0
    n_off = plan.offloaded_layers
    token_layer = a.kv_bytes_per_token(2) // a.n_layers
    floor = n_off * ctx * token_layer / out["h2d_gb_s"] / 1e6
    out["offloaded_kv_gib"], out["floor_ms"] = n_off * ctx * token_layer / GiB, floor

    with torch.inference_mode():
        out["target_steps"] = offloaded_steps(model, full, ctx, (1, 8, 16, 32), floor)
        save()
        ret = RetrievalCache(full, model, plan.budget, 8)
        ret.adopt_prefix(ctx)
        t1 = time.perf_counter()
        model(torch.zeros(1, 1, dtype=torch.long, device="cuda"), ret)  # selection (reads host keys once)
        torch.cuda.synchronize()
        out["selection_seconds"] = time.perf_counter() - t1
        ret.truncate(ctx)
        stream = StreamingCache(tiny, 16, 496, slack=32 + 2 * max(args.gammas), max_forward=512)
        tiny(torch.randint(0, 32000, (1, 512), device="cuda"), stream)
        steps = {"retrieval_ms": graphed_step(model, ret, 1, ctx),
                 "retrieval_verify_ms": graphed_step(model, ret, args.gamma2 + 1, ctx),
                 "tiny_ms": graphed_step(tiny, stream, 1, 512)}
        out["draft_steps"] = steps
        print(json.dumps(steps), flush=True)
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GiB
        del ret
        save()

        measured = {r["tokens"]: r["ms"] for r in out["target_steps"]}

        def verify_ms(t):  # piecewise-linear in the tokens verified (flat in practice: PCIe-bound)
            xs = sorted(measured)
            lo = max([x for x in xs if x <= t], default=xs[0])
            hi = min([x for x in xs if x >= t], default=xs[-1])
            return measured[lo] if hi == lo else measured[lo] + (measured[hi] - measured[lo]) * (t - lo) / (hi - lo)
        model_steps = dict(steps, ar_ms=measured[1], verify_ms=verify_ms)
        grid = []
        for rate in RATES:
            for tiers in (2, 3):
                for gamma in range(4, 129, 4):
                    grid.append({"rate": rate, "tiers": tiers, "gamma": gamma,
                                 "predicted_speedup": predicted(rate, gamma, model_steps,
                                                                args.tiny_acceptance if tiers == 3 else None,
                                                                args.gamma2)})
        out["predicted"] = grid
        out["e2e_injected"] = e2e_injected(args, model, tiny, full, ctx, plan.budget, save, out)
        out["offload_prefill"] = offloaded_prefill(model, full, ctx, args.prefill_chunk, out["h2d_gb_s"],
                                                   out["matmul_tflops"])  # last: it overwrites the random KV
    out["summary"] = summarize(out)
    save()
    plot(out, path.with_suffix(".png"))
    print(json.dumps(out["summary"], indent=1))


def e2e_injected(args, model, tiny, full, ctx: int, budget: int, save, out: dict) -> list[dict]:
    """The real engine (offloaded target, graphed drafts), acceptance decisions injected."""
    prompt = torch.randint(0, 32000, (ctx + 1,))
    results: list[dict] = []
    out["e2e_injected"] = results
    ret = RetrievalCache(full, model, budget, 8)
    stream = StreamingCache(tiny, 16, 496, slack=32 + 2 * max(args.gammas), max_forward=512)
    warm_tiny = torch.randint(0, 32000, (1, 512), device="cuda")

    def fake_prefill(tiers):
        def prefill(progress=False):  # the KV of the prompt is already in the store
            adopt_random(full, ctx)
            for t in tiers[1:]:  # the tiers, not the engine: no reference cycle keeps dead graphs alive
                if not t.cache.adopt_prefix(ctx):
                    tiny(warm_tiny, t.cache)
                    t.cache.length, t.cache.start = ctx, ctx - 496
        return prefill

    graphs: dict[tuple, GraphedModel] = {}

    def run(label, tiers, inject, gamma, n_new, warm):
        for level, t in enumerate(tiers):
            if level:
                sizes = graph_sizes(tiers, level)
                key = (id(t.cache), tuple(sorted(sizes)))
                t.graphed = graphs.setdefault(key, GraphedModel(t.model, t.cache, sizes))
        eng = SpeculativeEngine(tiers, 0.6, 0.9, injected_acceptance=inject)
        eng._prefill, eng.prefill_seconds = fake_prefill(tiers), 0.0
        if warm:
            eng.generate(prompt, 8, seed=0)  # captures the drafts' graphs
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = len(eng.generate(prompt, n_new, seed=1))
        torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        r = {"label": label, "tiers": len(tiers), "context": ctx, "gamma": gamma, "budget": budget,
             "injected": {str(k): v for k, v in inject.items()}, "tokens": n, "ms_per_token": 1e3 * sec / n,
             "per_tier": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "ms_per_forward", "forwards")}
                          for k, v in eng.stats(n).items()}}
        results.append(r)
        print(json.dumps(r), flush=True)
        save()
        return r

    skipped = []
    with torch.inference_mode():
        ar = run("offloaded autoregressive", [Tier("target", model, full)], {}, 0, 4, False)
        for i, rate in enumerate((0.9, 0.95, 0.8)):  # the target rate first
            for gamma in args.gammas:
                if time.perf_counter() - START > args.deadline:
                    skipped.append({"rate": rate, "gamma": gamma})
                    out["e2e_skipped_for_time"] = skipped
                    continue
                for label in ("retrieval", "triforce"):
                    tiers = [Tier("target", model, full, gamma=gamma), Tier("retrieval", model, ret, gamma=args.gamma2)]
                    inject = {0: rate}
                    if label == "triforce":
                        tiers.append(Tier("tiny", tiny, stream))
                        inject[1] = args.tiny_acceptance
                    r = run(f"{label}@{rate}", tiers, inject, gamma, args.new_tokens, i == 0)
                    r["speedup_vs_offloaded_ar"] = ar["ms_per_token"] / r["ms_per_token"]
    return results


def summarize(out: dict) -> dict:
    s = {}
    pre = out.get("offload_prefill")
    if pre:
        s["offload_prefill_ttft_s"] = pre["ttft_s"]
        s["offload_prefill_over_floor"] = pre["over_floor"]
    steps = out.get("target_steps", [])
    verify = [r for r in steps if r["tokens"] in (8, 16, 32)]
    if verify:
        s["offload_step_over_floor"] = max(r["over_floor"] for r in verify)
        s["offload_ar_over_floor"] = next(r["over_floor"] for r in steps if r["tokens"] == 1)
    inj = [r for r in out.get("e2e_injected", []) if "speedup_vs_offloaded_ar" in r]
    at9 = [r for r in inj if r["injected"].get("0") == 0.9]
    if at9:
        best = max(at9, key=lambda r: r["speedup_vs_offloaded_ar"])
        s["e2e_speedup_vs_offloaded_ar"] = best["speedup_vs_offloaded_ar"]
        s["best_at_0.9"] = {"pipeline": best["label"].split("@")[0], "gamma": best["gamma"], "budget": best["budget"]}
    for rate in RATES:
        rs = [r for r in inj if r["injected"].get("0") == rate]
        if rs:
            s[f"e2e_speedup_at_{rate}"] = max(r["speedup_vs_offloaded_ar"] for r in rs)
    # rounds are geometric, so a 192-token run is noisy (a 0.9 run at gamma 32 saw 8.0 tokens per
    # round against 9.7 expected): also rescale each run to its expected tokens per round
    for r in inj:
        rate, rounds = r["injected"]["0"], r["per_tier"]["target"]["forwards"]
        expected = (1 - rate ** (r["gamma"] + 1)) / (1 - rate)
        ms_round = r["ms_per_token"] * r["tokens"] / rounds
        r["speedup_at_expected_length"] = r["speedup_vs_offloaded_ar"] * (r["ms_per_token"] / (ms_round / expected))
    if at9:
        s["e2e_speedup_at_0.9_expected_length"] = {f"{r['label'].split('@')[0]} g{r['gamma']}": r["speedup_at_expected_length"]
                                                   for r in at9}
    pred = [p for p in out.get("predicted", []) if p["rate"] == 0.9]
    if pred:
        best = max(pred, key=lambda p: p["predicted_speedup"])
        s["predicted_best_at_0.9"] = best
    return s


def plot(out: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = out.get("target_steps", [])
    if steps:
        ax[0].bar([str(r["tokens"]) for r in steps], [r["ms"] for r in steps], label="offloaded target step")
        ax[0].axhline(out["floor_ms"], color="k", ls="--", label="floor: offloaded KV / H2D bandwidth")
        ax[0].set(xlabel="tokens per target forward", ylabel="ms",
                  title=f"{out['settings']['context'] // 1024}K context, {out['settings']['gpu_memory_gb']:.0f} GB GPU")
        ax[0].legend(loc="lower right")
    for rate, color in zip(RATES, ("C0", "C1", "C2")):
        for tiers, ls in ((2, ":"), (3, "-")):
            pts = [p for p in out.get("predicted", []) if p["rate"] == rate and p["tiers"] == tiers]
            ax[1].plot([p["gamma"] for p in pts], [p["predicted_speedup"] for p in pts], ls, color=color,
                       label=f"model, {tiers} tiers, acc {rate}")
        meas = [r for r in out.get("e2e_injected", []) if r["injected"].get("0") == rate and "speedup_vs_offloaded_ar" in r]
        for r in meas:
            ax[1].plot(r["gamma"], r["speedup_vs_offloaded_ar"], "o" if r["tiers"] == 3 else "s", color=color)
    ax[1].set(xlabel="gamma (target verification size - 1)", ylabel="speedup over offloaded AR",
              title="end to end, injected acceptance (markers: measured)")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
