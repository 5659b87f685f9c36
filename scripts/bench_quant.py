#!/usr/bin/env python3
"""Weight-quantized middle tier on one GPU: its step cost (bf16 vs int8 vs int4) and end to end.

Llama-2-7B-128K shape, random bf16 weights, KV filled with random values, CUDA graphs:
1. the decode-step GEMVs of every projection shape, bf16 vs int8 vs int4 (1 and 8 rows);
2. the middle (retrieval) tier's step at a 4K budget with the target's bf16 weights and with int8 /
   int4 views of them (models/quant.py), 1 token and a 5-token verify, against each one's byte floor
   (its weight bytes + the selected KV, over the measured copy bandwidth);
3. end to end at the longest context (128K on an H200) with acceptance decisions INJECTED (a
   benchmark-only switch: random weights accept nothing): the middle tier at 0.9 with bf16
   weights and at 0.9 - --drop with int4 weights (what quantization costs in acceptance; measure
   it with the study and pass it here), the tiny draft (llama-68m shape) at 0.8, vs own AR;
4. from shapes (the planner) and results/offload_h100.json's measured steps: at a 24 GiB cap and
   120K context (target KV offloaded), does an int4 middle-tier copy beat the KV layers it displaces?

    python scripts/bench_quant.py [--drop 0.05] [--acceptance-csv results/acceptance_quant.csv]
                                  [--real results/real_q4_h200.json]      # bench_real.py with int4 tiers
    python scripts/bench_quant.py --smoke      # CPU, toy shapes: checks every part runs (numbers mean nothing)

Writes results/quant_<gpu>.json (JSON lines of every measurement on stdout as it goes) with a
`summary`: q4_middle_step_over_bf16, e2e_speedup_q4_7b_128k (and the bf16 middle tier's
e2e_speedup_bf16_7b_128k beside it), plus q4_middle_acceptance_drop (from --acceptance-csv: the
study's bf16 - int4 acceptance, matched run for run) and real_q4_speedup_vs_ar_32k (from --real: a
bench_real.py run of the real pair with int4 tiers, its fastest int4 pipeline over its own AR, side
by side), null when not given. `--summarize-only results/quant_h200.json` recomputes the summary.
"""
from __future__ import annotations

import argparse
import csv
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from bench_speed import LLAMA2_7B, LLAMA_68M, cuda_time
from triforce.cache import FullCache, RetrievalCache, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.graphs import GraphedModel, graph_sizes
from triforce.kernels.gemv import gemv_triton
from triforce.kernels.quant_gemv import (int4_gemv_triton, int4_tinygemm, int8_gemv_triton, quantize_int4, quantize_int8,
                                         tinygemm_pack)
from triforce.models.llama import ModelArgs, build_model
from triforce.models.quant import quant_weight_bytes, quantized_view, quantizes_head

ROOT = Path(__file__).resolve().parents[1]
TOY = ModelArgs(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=256,
                max_position_embeddings=4096)
TOY_TINY = ModelArgs(vocab_size=512, dim=64, n_layers=1, n_heads=2, n_kv_heads=2, intermediate_size=128,
                     max_position_embeddings=4096)
FORMATS = ("bf16", "int8", "int4")


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def timed(fn, device: torch.device, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn(): CUDA events on the GPU, the wall clock on CPU."""
    return cuda_time(fn, repeats, warmup, device)


def copy_bandwidth(device: torch.device) -> float:
    """GB/s of a device-to-device copy (bytes read + written)."""
    n = (2 << 30) if device.type == "cuda" else (64 << 20)
    x = torch.empty(n, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), device, repeats=10)
    del x, y
    return 2 * n / ms / 1e6


def step_ms(model, cache, n_new: int, reset, device: torch.device, burst: int = 8) -> float:
    """A step of n_new tokens (graphed on the GPU, in bursts as a decode loop issues them)."""
    tokens = torch.randint(0, model.args.vocab_size, (1, n_new), device=device)
    if device.type == "cuda":
        g = GraphedModel(model, cache, {n_new})

        def run():
            for _ in range(burst):
                reset()
                g(tokens, n_new)
        return timed(run, device) / burst

    def eager():
        reset()
        model(tokens, cache, last=n_new)
    return timed(eager, device, repeats=5, warmup=1)


def fill_random(cache: FullCache, length: int) -> None:
    """Stand-in for a prefill: random KV (a step's cost depends on sizes, not values)."""
    cache.k[:, :, :length].normal_()
    cache.v[:, :, :length].normal_()
    cache.length = length


# ----------------------------------------------------------------------------------- 1. GEMVs

def gemv_rows(a: ModelArgs, device: torch.device) -> list[dict]:
    """Each projection shape of a decode step: bf16 GEMV vs int8 vs int4 (group 128: tinygemm, what a
    GPU int4 tier runs, and the Triton kernel), 1 and 8 rows.

    Several copies of each weight are cycled so that L2 holds none of them (as in a real step)."""
    if device.type != "cuda":
        return []
    shapes = {"qkv": ((a.n_heads + 2 * a.n_kv_heads) * a.head_dim, a.dim), "o": (a.dim, a.n_heads * a.head_dim),
              "gate_up": (2 * a.intermediate_size, a.dim), "down": (a.dim, a.intermediate_size),
              "lm_head": (a.vocab_size, a.dim)}
    rows = []
    for name, (n, k) in shapes.items():
        copies = [torch.randn(n, k, device=device).to(torch.bfloat16) for _ in range(4)]
        q8 = [quantize_int8(w) for w in copies]
        q4 = [quantize_int4(w, 128) for w in copies]
        tg = [tinygemm_pack(*q, k, 128) for q in q4]
        for m in (1, 8):
            x = torch.randn(m, k, device=device).to(torch.bfloat16)
            fns = {"bf16": lambda i: gemv_triton(x, copies[i]), "int8": lambda i: int8_gemv_triton(x, *q8[i]),
                   "int4": lambda i: int4_tinygemm(x, *tg[i], 128), "int4_triton": lambda i: int4_gemv_triton(x, *q4[i], 128)}
            row = {"shape": name, "n": n, "k": k, "rows": m}
            for fmt, fn in fns.items():
                graph = torch.cuda.CUDAGraph()
                for i in range(4):
                    fn(i)
                with torch.cuda.graph(graph):
                    for i in range(16):
                        fn(i % 4)
                row[f"{fmt}_us"] = timed(graph.replay, device) / 16 * 1e3
            rows.append(emit(row))
        del copies, q8, q4, tg
    return rows


# ----------------------------------------------------------------------------------- 2. middle-tier step

def middle_steps(model, views: dict, full: FullCache, ctx: int, budget: int, bw: float, device) -> list[dict]:
    """The retrieval tier's 1-token step and 5-token verify with each weight format, vs its floor."""
    a = model.args
    kv = (budget + 8) * a.kv_bytes_per_token(2)
    rows = []
    for fmt, m in views.items():
        ret = RetrievalCache(full, model, budget, 8)
        ret.adopt_prefix(ctx)
        m(torch.zeros(1, 1, dtype=torch.long, device=device), ret)  # the selection step (eager)
        ret.truncate(ctx)
        weights = a.weight_bytes(2) if fmt == "bf16" else m.step_weight_bytes()
        row = {"weights": fmt, "context": ctx, "budget": budget, "weight_bytes": weights,
               "floor_ms": (weights + kv) / bw / 1e6}
        row["step_ms"] = step_ms(m, ret, 1, lambda: ret.truncate(ctx), device)
        row["verify5_ms"] = step_ms(m, ret, 5, lambda: ret.truncate(ctx), device)
        row["step_over_floor"] = row["step_ms"] / row["floor_ms"]
        rows.append(emit(row))
        del ret
    return rows


# ----------------------------------------------------------------------------------- 3. end to end

def e2e_injected(model, views: dict, tiny, full: FullCache, ctx: int, budget: int, rate: float, drops: dict,
                 new: int, gammas: list[tuple[int, int]], device) -> list[dict]:
    """Real engine at `ctx`, acceptance decisions injected (benchmark-only), decode time only."""
    stream = StreamingCache(tiny, 16, 496, slack=64, max_forward=512)
    prompt = torch.randint(0, model.args.vocab_size, (ctx,))
    fill_random(full, ctx - 1)
    results, prefill_s = [], [0.0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def fake_prefill(engine):  # the KV is already random, as in the step benches
        def prefill(progress=False):
            sync()
            t0 = time.perf_counter()
            full.length = ctx - 1
            for t in engine.tiers[1:]:
                t.cache.reset()
                if not t.cache.adopt_prefix(ctx - 1):
                    tiny(torch.randint(0, tiny.args.vocab_size, (1, 512), device=device), t.cache)
                    t.cache.length, t.cache.start = ctx - 1, ctx - 1 - 496
            sync()
            prefill_s[0] = time.perf_counter() - t0
            engine.prefill_seconds = 0.0
        return prefill

    def run(tiers, inject, label, **info):
        if device.type == "cuda":
            for level, t in enumerate(tiers):
                t.graphed = GraphedModel(t.model, t.cache, graph_sizes(tiers, level))
        eng = SpeculativeEngine(tiers, 0.6, 0.9, injected_acceptance=inject)
        eng._prefill = fake_prefill(eng)
        eng.generate(prompt, 32, seed=0)  # captures the graphs
        sync()
        t0 = time.perf_counter()
        n = len(eng.generate(prompt, new, seed=1))
        sync()
        sec = time.perf_counter() - t0 - prefill_s[0]
        r = {"label": label, "context": ctx, "injected": {str(k): v for k, v in inject.items()}, "tokens": n,
             "ms_per_token": 1e3 * sec / n, **info,
             "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "rounds", "forwards",
                                             "ms_per_forward")} for k, v in eng.stats(n).items()}}
        results.append(r)
        return r

    with torch.inference_mode():
        ar = emit(run([Tier("target", model, full)], {}, "autoregressive"))
        for fmt, m in views.items():
            ret = RetrievalCache(full, model, budget, 8)
            a = rate - drops.get(fmt, 0.0)
            for gamma, tiny_gamma in gammas:
                r = run([Tier("target", model, full, gamma=gamma), Tier("retrieval", m, ret, gamma=tiny_gamma),
                         Tier("tiny", tiny, stream)], {0: a, 1: 0.8},
                        f"triforce/{fmt}@{a:.2f} (INJECTED)", weights=fmt, gamma=gamma, tiny_gamma=tiny_gamma,
                        middle_acceptance=a)
                r["speedup_vs_ar"] = ar["ms_per_token"] / r["ms_per_token"]
                # rounds are geometric: also the run rescaled to the expected tokens per target round
                r["speedup_vs_ar_expected_length"] = r["speedup_vs_ar"] * (1 - a ** (gamma + 1)) / (1 - a) / \
                    r["tiers"]["target"]["mean_accepted_length"]
                emit(r)
            del ret
    return results


# ----------------------------------------------------------------------------------- 4. 24 GB, offloaded

def offload_trade(step_ratio: float | None, offload_json: Path, ctx: int = 122880, gamma: int = 24,
                  tiny_gamma: int = 4, rate: float = 0.9, tiny_rate: float = 0.8) -> dict:
    """At a 24 GiB cap (7B, target KV offloaded): an int4 middle-tier copy vs the KV layers it displaces.

    The planner decides resident layers and budget for each format; a round's cost is modelled from
    the offloaded steps measured by bench_offload.py (results/offload_*.json): the target's step
    scales with its offloaded layers (PCIe-bound), the middle tier verifies ~gamma / L times per round
    (L = (1 - p^(g+1)) / (1 - p) tokens per middle round at the tiny tier's rate p), each costing its
    measured step times `step_ratio` (int4 over bf16: this run's measurement, and the ideal byte ratio).
    """
    from triforce.planner import GiB, plan_memory

    plans = {}
    for fmt in ("bf16", "int4"):
        p = plan_memory(LLAMA2_7B, ctx + 256, 4096, gamma, LLAMA_68M, 2, 24 * GiB, 400 * GiB, "auto",
                        new_tokens=256, draft_cache_tokens=1056, selection_copies=False, chunk_summaries=False,
                        quantized_bytes=quant_weight_bytes(LLAMA2_7B, fmt))
        plans[fmt] = {"resident_layers": p.resident_layers, "budget": p.budget, "plan": p.describe()}
    out = {"context": ctx, "plans": plans}
    if not offload_json.is_file():
        return out
    measured = json.loads(offload_json.read_text())
    target_ms = measured["target_steps"][0]["ms"]  # all 32 layers offloaded
    mid_ms, tiny_ms = measured["draft_steps"]["retrieval_verify_ms"], measured["draft_steps"]["tiny_ms"]
    kv = 4096 * LLAMA2_7B.kv_bytes_per_token(2)
    head = 0 if quantizes_head("auto", "int4") else LLAMA2_7B.vocab_size * LLAMA2_7B.dim * 2  # read exact
    ideal = (quant_weight_bytes(LLAMA2_7B, "int4") + head + kv) / (LLAMA2_7B.weight_bytes(2) + kv)
    per_mid_round = (1 - tiny_rate ** (tiny_gamma + 1)) / (1 - tiny_rate)
    tokens = (1 - rate ** (gamma + 1)) / (1 - rate)
    rounds = {}
    for label, fmt, ratio in (("bf16", "bf16", 1.0), ("int4 (this kernel)", "int4", step_ratio),
                              ("int4 (at its byte floor)", "int4", ideal)):
        if ratio is None:
            continue
        offloaded = LLAMA2_7B.n_layers - plans[fmt]["resident_layers"]
        ms = target_ms * offloaded / LLAMA2_7B.n_layers + gamma / per_mid_round * mid_ms * ratio + gamma * tiny_ms
        rounds[label] = {"round_ms": ms, "ms_per_token": ms / tokens, "resident_layers": plans[fmt]["resident_layers"],
                         "middle_step_ratio": ratio}
    out.update(model=f"injected-style model: middle {rate}, tiny {tiny_rate}, gamma {gamma}/{tiny_gamma}, "
                     f"steps from {offload_json.name}", rounds=rounds,
               winner=min(rounds, key=lambda k: rounds[k]["ms_per_token"]))
    return out


# ----------------------------------------------------------------------------------- summary

def acceptance_drop(path: Path | None, model: str | None = None) -> float | None:
    """Mean bf16 - int4 middle-tier acceptance over study runs matched on every other setting
    (of one `model` when given: a small model loses far more to int4 than a large one)."""
    if path is None or not path.is_file():
        return None
    rows = [r for r in csv.DictReader(path.open()) if model is None or r["model"] == model]
    key = ("model", "document", "prompt_tokens", "temperature", "policy", "budget", "gamma", "seed")
    by = {}
    for r in rows:
        if r.get("accept_rate") and (r.get("tiny_weights") or "bf16") == "bf16":
            by[(r.get("weights") or "bf16",) + tuple(r[k] for k in key)] = float(r["accept_rate"])
    drops = [v - by[("int4",) + k[1:]] for k, v in by.items() if k[0] == "bf16" and ("int4",) + k[1:] in by]
    return sum(drops) / len(drops) if drops else None


def acceptance_drop_per_model(path: Path | None) -> dict:
    if path is None or not path.is_file():
        return {}
    return {m: acceptance_drop(path, m) for m in sorted({r["model"] for r in csv.DictReader(path.open())})}


def real_speedup(path: Path | None) -> dict | None:
    """Per temperature: own autoregressive ms/token over the fastest int4-tier pipeline's, mean over
    documents at the longest context, from a `scripts/bench_real.py` run whose overrides quantize
    the draft tiers (`cache.weights=int4 draft.weights=int4`): both measured side by side."""
    if path is None or not path.is_file():
        return None
    res = json.loads(path.read_text())
    if not any("weights=int4" in o for o in res["settings"]["overrides"]):
        raise SystemExit(f"{path}: its bench_real overrides quantize no tier (cache.weights=int4 / draft.weights=int4)")
    rows = [r for r in res["rows"] if r["system"].startswith("triforce/")]
    ctx = max(r["context"] for r in rows)
    out = {}
    for t in sorted({r["temperature"] for r in rows}):
        sub = [r for r in rows if r["context"] == ctx and r["temperature"] == t]
        ms = {p: statistics.mean(r["ms_per_token"] for r in sub if r["pipeline"] == p) for p in {r["pipeline"] for r in sub}}
        quantized = {p: v for p, v in ms.items() if p != "autoregressive"}
        if "autoregressive" in ms and quantized:
            best = min(quantized, key=quantized.get)
            out[str(t)] = {"speedup": ms["autoregressive"] / quantized[best], "pipeline": best, "context": ctx}
    return out or None


def summarize(out: dict, args) -> dict:
    steps = {r["weights"]: r for r in out.get("middle_steps", [])}
    s = {"q4_middle_step_over_bf16": steps["int4"]["step_ms"] / steps["bf16"]["step_ms"] if steps else None,
         "q8_middle_step_over_bf16": steps["int8"]["step_ms"] / steps["bf16"]["step_ms"] if steps else None,
         "q4_middle_step_over_floor": steps["int4"]["step_over_floor"] if steps else None}
    for fmt in ("int4", "int8", "bf16"):
        runs = [r for r in out.get("e2e_injected", []) if r.get("weights") == fmt]
        if not runs:
            continue
        key = {"int4": "e2e_speedup_q4_7b_128k", "int8": "e2e_speedup_q8_7b_128k", "bf16": "e2e_speedup_bf16_7b_128k"}[fmt]
        s[key] = max((r["speedup_vs_ar"] for r in runs), default=None)
        s[key + "_expected_length"] = max((r["speedup_vs_ar_expected_length"] for r in runs), default=None)
    s["e2e_context"] = out.get("context")
    ran = {r.get("weights") for r in out.get("e2e_injected", [])}
    rates = {"bf16": args.rate, "int8": args.rate - args.drop8, "int4": args.rate - args.drop}
    s["e2e_injected_acceptance"] = ("middle " + " / ".join(f"{rates[f]:.2f} ({f})" for f in FORMATS if f in ran)
                                    + ", tiny 0.8: INJECTED")
    trade = out.get("offload_24gb", {})
    s["offload_24gb_120k_winner"] = trade.get("winner")
    s["q4_middle_acceptance_drop"] = acceptance_drop(args.acceptance_csv)
    s["q4_middle_acceptance_drop_per_model"] = acceptance_drop_per_model(args.acceptance_csv)
    s["real_q4_speedup_vs_ar_32k"] = real_speedup(args.real)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=0, help="end-to-end context (0: the longest that fits, <= 128K)")
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--rate", type=float, default=0.9, help="injected acceptance of the bf16 middle tier")
    ap.add_argument("--drop", type=float, default=0.05, help="int4 middle tier's injected acceptance is rate - drop")
    ap.add_argument("--drop8", type=float, default=0.0, help="int8 middle tier's injected acceptance is rate - drop8")
    ap.add_argument("--e2e-formats", default="bf16,int8,int4", help="middle-tier weights of the end-to-end runs")
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--gammas", default="12:6,16:6", help="target:tiny gamma pairs of the end-to-end runs")
    ap.add_argument("--acceptance-csv", type=Path, default=ROOT / "results/acceptance_quant.csv")
    ap.add_argument("--real", type=Path, default=None,
                    help="bench_real.py JSON of the real pair with int4 tiers (default results/real_q4_<gpu>.json)")
    ap.add_argument("--summarize-only", type=Path, default=None, metavar="JSON",
                    help="recompute the summary of an earlier run (with --acceptance-csv / --real), no GPU")
    ap.add_argument("--smoke", action="store_true", help="CPU (or GPU) at toy sizes: every part runs, numbers mean nothing")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not 0 < args.rate - args.drop <= args.rate < 1:
        raise SystemExit(f"--rate ({args.rate}) and --drop ({args.drop}) must give 0 < rate - drop <= rate < 1")
    gammas = [tuple(int(g) for g in pair.split(":")) for pair in args.gammas.split(",")]
    if args.summarize_only:
        out = json.loads(args.summarize_only.read_text())
        if args.real is None:
            args.real = ROOT / f"results/real_q4_{args.summarize_only.stem.removeprefix('quant_')}.json"
        out["summary"] = summarize(out, args)
        args.summarize_only.write_text(json.dumps(out, indent=1))
        print(json.dumps(out["summary"], indent=1))
        return
    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        raise SystemExit("bench_quant.py measures GPU steps against their byte floor: run it on a GPU, or --smoke")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    a, tiny_args = (TOY, TOY_TINY) if args.smoke else (LLAMA2_7B, LLAMA_68M)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    gpu = "h100" if "H100" in name else "h200" if "H200" in name else name.split()[-1].lower()
    path = args.out or ROOT / f"results/quant_{gpu}{'_smoke' if args.smoke else ''}.json"
    if args.real is None:
        args.real = ROOT / f"results/real_q4_{gpu}.json"
    import triton

    out = {"gpu": name, "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version(),
           "settings": {"dtype": str(dtype).removeprefix("torch."), "model": "Llama-2-7B shape, random weights"
                        if not args.smoke else "toy shape (smoke)", "tiny": "llama-68m shape", "int4_group": 128,
                        "quant_head": "auto (int8 quantized, int4 exact)", "budget": args.budget, "retrieval_chunk": 8, "cuda_graphs": cuda,
                        "injected_acceptance": "benchmark-only switch: accept/reject decisions drawn at the given rate"}}
    t_start = time.perf_counter()
    torch.manual_seed(0)
    bw = copy_bandwidth(device)
    out["bandwidth_gb_s"] = bw
    out["gemv"] = gemv_rows(a, device)
    model = build_model(a, None, device, dtype, context_length=a.max_position_embeddings).eval()
    views = {fmt: quantized_view(model, fmt) for fmt in FORMATS}
    out["quantized_gib"] = {fmt: quant_weight_bytes(a, fmt) / 2**30 for fmt in FORMATS}
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        e2e = args.e2e_formats.split(",")
        free = torch.cuda.mem_get_info()[0] + sum(views[f].quantized_bytes for f in FORMATS[1:] if f not in e2e)
        fit = int((free - 6 * 2**30) / a.kv_bytes_per_token(2)) - args.new_tokens - 128
    else:
        fit = 2048
    ctx = args.context or min(fit, a.max_position_embeddings - args.new_tokens - 128) // 1024 * 1024
    budget = min(args.budget, 256) if args.smoke else args.budget
    out["context"] = ctx
    with torch.inference_mode():
        full = FullCache(model, ctx + args.new_tokens + 64)
        fill_random(full, ctx)
        out["middle_steps"] = middle_steps(model, views, full, ctx, budget, bw, device)
        for fmt in [f for f in views if f not in args.e2e_formats.split(",")]:
            del views[fmt]  # only the formats asked for run end to end

        gc.collect()
        tiny = build_model(tiny_args, None, device, dtype, seed=1).eval()
        out["e2e_injected"] = e2e_injected(model, views, tiny, full, ctx, budget, args.rate,
                                           {"int8": args.drop8, "int4": args.drop},
                                           16 if args.smoke else args.new_tokens,
                                           gammas[:1] if args.smoke else gammas, device)
    steps = {r["weights"]: r["verify5_ms"] for r in out["middle_steps"]}
    out["offload_24gb"] = emit(offload_trade(steps["int4"] / steps["bf16"] if cuda else None,
                                             ROOT / "results/offload_h100.json"))
    out["seconds"] = time.perf_counter() - t_start
    out["summary"] = summarize(out, args)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"], indent=1))
    print(f"wrote {path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
