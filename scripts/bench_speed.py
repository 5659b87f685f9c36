"""Speed benchmark on one GPU (issue 4): each tier's step against its byte floor, and end to end.

Part 1 (Llama-2-7B-128K shape, random bf16 weights, KV filled with random values, CUDA graphs):
copy bandwidth; autoregressive step and verify steps (gamma+1 in 2,4,8,16) at each context vs
bytes/bandwidth; retrieval-tier steps at budgets 1K-8K; tiny-draft step (llama-68m shape);
Hugging Face `generate` (default and static cache) as the peer; end to end with acceptance
decisions INJECTED (benchmark-only switch, random weights accept nothing) against our own
autoregressive decoding at the longest context.
Part 2 (--smollm2 GGUF): real SmolLM2-135M at ~1K and ~7K tokens of prose: autoregressive,
retrieval and triforce pipelines (model draft, and n-gram prompt-lookup draft) vs HF generate
(static cache, prompt lookup), all in one run.

    python scripts/bench_speed.py [--contexts 16384 32768 65536 0] [--smollm2 PATH.gguf] [--part 1 2]
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
DT = torch.bfloat16


def cuda_time(fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of fn() between CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
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


def e2e_injected(model, tiny, ctx: int, bw: float) -> list[dict]:
    """Real engine at the longest context, acceptance decisions injected (benchmark-only).

    Decode time only: the stand-in prefill (random KV) is synchronised and subtracted; the
    retrieval tier's one-off selection over the whole prompt stays in (it is paid per prompt).
    """
    new = 256
    full = FullCache(model, ctx + new + 64)
    ret = RetrievalCache(full, model, 4096, 8)
    stream = StreamingCache(tiny, 16, 496, slack=64, max_forward=512)
    prompt = torch.randint(0, 32000, (ctx,))
    fill_random(full, ctx - 1)
    results = []
    prefill_s = [0.0]

    def prefill(engine):  # replaces the engine's prefill: the KV is already random, as in the step benches
        def fake(progress=False):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            full.length = ctx - 1
            ret.reset()
            stream.reset()
            for t in engine.tiers[1:]:
                if not t.cache.adopt_prefix(ctx - 1):
                    tiny(torch.randint(0, 32000, (1, 512), device="cuda"), t.cache)
                    t.cache.length = ctx - 1
                    t.cache.start = ctx - 1 - 496
            torch.cuda.synchronize()
            prefill_s[0] = time.perf_counter() - t0
            engine.prefill_seconds = 0.0
        return fake

    def run(tiers, inject, label, gamma):
        for level, t in enumerate(tiers):
            t.graphed = GraphedModel(t.model, t.cache, graph_sizes(tiers, level))
        eng = SpeculativeEngine(tiers, 0.6, 0.9, injected_acceptance=inject)
        eng._prefill = prefill(eng)
        eng.generate(prompt, 32, seed=0)  # captures graphs
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        n = len(eng.generate(prompt, new, seed=1))
        torch.cuda.synchronize()
        sec = time.perf_counter() - t0 - prefill_s[0]
        r = {"label": label, "context": ctx, "gamma": gamma, "injected": {str(k): v for k, v in inject.items()},
             "tokens": n, "ms_per_token": 1e3 * sec / n,
             "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "rounds", "forwards")}
                       for k, v in eng.stats(n).items()}}
        results.append(r)
        print(json.dumps(r), flush=True)
        return r

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


def part2(args, out: dict) -> None:
    """Real SmolLM2-135M: our pipelines vs HF generate (static cache, prompt lookup)."""
    import triforce
    from transformers import AutoTokenizer, LlamaForCausalLM

    from triforce.models.llama import resolve_checkpoint

    text = (ROOT / "data/corpus/botchan.txt").read_text()
    rows = []
    common = ("+model=smollm2-135m", f"model.path={args.smollm2}", "chat=false", "cache.budget=512", "gamma=6", "draft.gamma=4", "max_new_tokens=128",
              "stream=false")
    gens = {p: triforce.load(*common, f"pipeline={p}") for p in ("autoregressive", "retrieval", "triforce")}
    # the bottom tier as n-gram prompt lookup (no weights): a lookup costs no model step, so it
    # drafts more per round (draft.gamma 6)
    gens["triforce+lookup"] = triforce.load(*common, "pipeline=triforce", "model.draft_path=lookup", "draft.gamma=6")
    hf_dir = resolve_checkpoint(args.smollm2)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    hf = LlamaForCausalLM.from_pretrained(str(hf_dir), dtype=DT).cuda().eval()
    all_ids = tok(text).input_ids
    for ctx in (1024, 7168):
        ids = all_ids[10000:10000 + ctx]
        for temp in (0.0, 0.6):
            ref = None
            for pipe, gen in gens.items():
                gen.generate(ids, temperature=temp, seed=0)  # the same run untimed: captures every graph it needs
                r = gen.generate(ids, temperature=temp, seed=0)
                s = r.stats
                row = {"context": ctx, "temperature": temp, "system": f"triforce/{pipe}", "tokens": len(r.token_ids),
                       "ms_per_token": 1e3 / s["tokens_per_second"],
                       "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "ms_per_forward")}
                                 for k, v in s["tiers"].items()}}
                if temp == 0:
                    ref = r.token_ids if ref is None else ref
                    row["greedy_equal_to_autoregressive"] = r.token_ids == ref
                ar_ms = next((x["ms_per_token"] for x in rows if x["context"] == ctx and x["temperature"] == temp
                              and x["system"] == "triforce/autoregressive"), None)
                if ar_ms:
                    row["speedup_vs_autoregressive"] = ar_ms / row["ms_per_token"]
                rows.append(row)
                print(json.dumps(row), flush=True)
        x = torch.tensor([ids], device="cuda")
        for label, kw in (("hf/static", {"cache_implementation": "static", "disable_compile": True}), ("hf/dynamic", {}),
                          ("hf/prompt_lookup", {"prompt_lookup_num_tokens": 10})):
            def gen(n):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                hf.generate(x, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
                torch.cuda.synchronize()
                return time.perf_counter() - t0
            gen(4)
            t1, t129 = gen(1), gen(129)
            rows.append({"context": ctx, "temperature": 0.0, "system": label, "ms_per_token": (t129 - t1) / 128 * 1e3})
            print(json.dumps(rows[-1]), flush=True)
    out["smollm2"] = rows


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
    ap.add_argument("--part", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
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
    path = Path(args.out or ROOT / f"results/speed_{'h100' if 'H100' in name else name.split()[-1].lower()}.json")
    if path.exists():
        out.update({k: v for k, v in json.loads(path.read_text()).items() if k not in out})
    torch.manual_seed(0)
    if 1 in args.part:
        part1(args, out)
    if 2 in args.part and args.smollm2:
        part2(args, out)
    out["summary"] = summarize(out)
    path.write_text(json.dumps(out, indent=1))
    plot(out, path.with_suffix(".png"))
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
