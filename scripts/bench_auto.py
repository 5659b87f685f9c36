"""Adaptive speculation vs every fixed configuration, on one GPU (or `--smoke` on CPU).

Part 1 (7B shape, random bf16 weights, CUDA graphs, acceptance decisions INJECTED: a
benchmark-only switch, random weights accept nothing): at one context, for target-accepts-middle
rates 0.8 / 0.9 / 0.95 (middle accepts tiny 0.8, target accepts tiny directly 0.5), the engine
runs autoregressive, retrieval, draft ([target, tiny]) and triforce at several gammas, and the
adaptive chooser (triforce/auto.py: pipeline and gammas auto, budget 4096), which learns the
injected rates online from the same counters it reads in a real run.
Part 3 (the same, offloaded): the 7B shape at `--offload-context` on an emulated `--offload-gib`
GPU (24: the memory planner keeps what fits, the rest of the target's KV streams from pinned host
memory every target step), injected 0.9, against offloaded autoregressive and the fixed pipelines
worth running there (large gammas); the regime where the best gamma moves to 24-40.
Part 2 (real weights through the Generator API; the embedded SmolLM2-135M unless overrides such
as `+model=qwen2.5-coder-1.5b` are given): prose prompts of 1K and 7K tokens, greedy and T=0.6,
fixed pipelines vs `pipeline=auto` (each timed run follows an identical untimed one, so graph
captures and the first-use cost measurement are not timed).

    python scripts/bench_auto.py [--part 1 2 3] [--context 65536] [--new 256] [HYDRA_OVERRIDES ...]
    python scripts/bench_auto.py --smoke     # CPU: tiny shapes, a few tokens, checks the script runs

Scenarios of a `scripts/bench_real.py` run with its `auto` rows (the real Qwen2.5-Coder pair on code,
results/real_<gpu>.json, or `--real-json`) join the summary; `--summarize-only JSON` recomputes it.
Writes results/auto_<gpu>.json (raw rows + `summary`: `auto_worst_vs_best_fixed`,
`auto_worst_vs_ar`, the worst over scenarios of auto's tokens/s over the best fixed config's and
over autoregressive's) and prints each row as it is measured. About 4-5 minutes on an H200.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

from triforce import auto
from bench_offload import fill_random as fill_offloaded
from bench_speed import LLAMA2_7B, LLAMA_68M, first_difference
from triforce.cache import FullCache, RetrievalCache, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.graphs import GraphedModel
from triforce.models.llama import ModelArgs, build_model
from triforce.offload import OffloadedFullCache
from triforce.planner import GiB, host_available_bytes, plan_memory

ROOT = Path(__file__).resolve().parents[1]
SMOKE_BIG = ModelArgs(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=256,
                      max_position_embeddings=4096)
SMOKE_TINY = ModelArgs(vocab_size=512, dim=64, n_layers=1, n_heads=4, n_kv_heads=2, intermediate_size=128,
                       max_position_embeddings=4096)
RATES = (0.8, 0.9, 0.95)
TINY_RATE, TINY_DIRECT_RATE = 0.8, 0.5  # middle accepts tiny / target accepts tiny (injected)
REPEATS = 5  # timed runs per real-text row (the median is reported)
FIXED = [("autoregressive", ()), ("retrieval", (6,)), ("retrieval", (12,)), ("draft", (4,)), ("draft", (8,)),
         ("triforce", (8, 4)), ("triforce", (12, 4)), ("triforce", (12, 6)), ("triforce", (16, 6)), ("triforce", (24, 6))]
# offloaded: a target step streams the KV over the host link (~1 s at 120K), so only large gammas are worth a run
FIXED_OFFLOADED = [("autoregressive", ()), ("retrieval", (24,)), ("triforce", (16, 6)), ("triforce", (24, 6)),
                   ("triforce", (32, 6))]


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def injected(args, out: dict, offloaded: bool = False) -> None:
    """Part 1 (on-chip) or part 3 (`offloaded`): fixed configurations and auto at injected rates."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    big, small = (SMOKE_BIG, SMOKE_TINY) if args.smoke else (LLAMA2_7B, LLAMA_68M)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    ctx, new = (args.offload_context, args.offload_new) if offloaded else (args.context, args.new)
    budget = 64 if args.smoke else 4096
    rates, fixed = ((0.9,), FIXED_OFFLOADED) if offloaded else (RATES, FIXED)
    capacity = ctx + new + 96
    if offloaded and not args.smoke:  # what the planner keeps on an emulated card; the run must fit it
        plan = plan_memory(big, capacity, budget, max(auto.GAMMAS), small, 2, int(args.offload_gib * GiB),
                           host_available_bytes(), "true", new_tokens=new + 2 * max(auto.GAMMAS),
                           draft_cache_tokens=16 + 496 + 48 + 512, draft_gamma=max(auto.DRAFT_GAMMAS))
        budget = plan.budget
        out["offload_plan"] = plan.describe()
        print(plan.describe(), flush=True)
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.offload_gib * GiB / torch.cuda.mem_get_info()[1]))
    model = build_model(big, None, device, dtype, context_length=capacity + 32).eval()
    tiny = build_model(small, None, device, dtype, seed=1).eval()
    if offloaded:
        full = (OffloadedFullCache(model, capacity, 1, 64) if args.smoke
                else OffloadedFullCache(model, capacity, plan.resident_layers, plan.transfer_chunk))
    else:
        full = FullCache(model, capacity)
    ret = RetrievalCache(full, model, budget, 8)
    sinks, window = (4, 60) if args.smoke else (16, 496)
    stream = StreamingCache(tiny, sinks, window, slack=48, max_forward=512)
    target, middle, draft = Tier("target", model, full), Tier("retrieval", model, ret), Tier("tiny", tiny, stream)
    settings = auto.AutoSettings(tuple(auto.ROLES), auto.GAMMAS, auto.DRAFT_GAMMAS, (budget,))
    if device.type == "cuda":
        if not offloaded:  # an offloaded target's steps depend on host-side lengths: no graphs
            target.graphed = GraphedModel(model, full, auto.graph_sizes(settings, "target"))
        middle.graphed = GraphedModel(model, ret, auto.graph_sizes(settings, "middle"))
        draft.graphed = GraphedModel(tiny, stream, auto.graph_sizes(settings, "draft"))
    prompt = torch.randint(0, big.vocab_size, (ctx,))
    # stand-in prefill: random KV (step costs depend on sizes, not values)
    if offloaded and device.type == "cuda":
        fill_offloaded(full, ctx)  # a random device block copied into every host layer: no CPU RNG over 30 GB
    elif offloaded:
        for t in (full.dev_k, full.dev_v):
            t[:, :, :ctx].normal_()
        for t in (full.host_k, full.host_v):
            t[:, :ctx].normal_()
    else:
        full.k[:, :, :ctx].normal_()
        full.v[:, :, :ctx].normal_()
    costs = auto.CostModel(Path(args.cost_table)) if args.cost_table else auto.CostModel()
    by_role = {"target": target, "middle": middle, "draft": draft}

    def stand_in_tiny() -> None:  # the tiny draft's window as if it had read the prompt (no 64K-token prefill)
        stream.reset()
        tiny(prompt[None, -(sinks + window):].to(device), stream, last=0)
        stream.length = ctx - 1
        stream.start = ctx - 1 - window

    def fake_prefill(engine):
        """Replaces the engine's prefill for every tier, used now or switched in later: the KV is
        already random; the retrieval tier adopts it, the tiny draft gets its window."""
        def prefill(progress=False):
            sync(device)
            t0 = time.perf_counter()
            full.length = ctx - 1
            if offloaded:
                full.high, full.tail_start = ctx - 1, None
            ret.reset()
            ret.adopt_prefix(ctx - 1)
            stand_in_tiny()
            sync(device)
            engine.prefill_seconds = time.perf_counter() - t0
        return prefill

    rows = []
    for rate in rates:
        inject = {("target", "retrieval"): rate, ("retrieval", "tiny"): TINY_RATE, ("target", "tiny"): TINY_DIRECT_RATE}

        def run(label, make):
            times = []
            # the first captures graphs (and measures costs for auto); offloaded AR: ~1 s a token, 16 are enough
            for n in ((4, 16) if offloaded and label == "autoregressive" else (min(32, new), new)):
                eng, chooser = make()
                eng._prefill = fake_prefill(eng)
                sync(device)
                t0 = time.perf_counter()
                got = len(eng.generate(prompt, n, seed=1))
                sync(device)
                sec = time.perf_counter() - t0 - eng.prefill_seconds - (chooser.measure_seconds if chooser else 0.0)
                times.append((got, sec, eng, chooser))
            got, sec, eng, chooser = times[-1]
            row = {"rate": rate, "config": label, "tokens": got, "ms_per_token": 1e3 * sec / got, "context": ctx,
                   "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "forwards")}
                             for k, v in eng.stats(got).items()}}
            if chooser is not None:
                rep = chooser.report(eng, got, sec)
                row["auto"] = {k: rep[k] for k in ("choice", "why", "sequence", "switches", "predicted_tokens_per_second",
                                                   "acceptance", "catch_up_seconds", "switch_in_ms", "host_ms_per_forward",
                                                   "capture_seconds", "configs", "step_costs_ms")}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "auto"} | ({"auto": row["auto"]["sequence"]}
                             if "auto" in row else {})), flush=True)
            return row

        with torch.inference_mode():
            for pipeline, gammas in fixed:
                tiers = [by_role[r] for r in auto.ROLES[pipeline]]

                def make(tiers=tiers, gammas=gammas):
                    for t, g in zip(tiers, gammas):
                        t.gamma = g
                    return SpeculativeEngine(tiers, 0.6, 0.9, injected_acceptance=inject), None
                run(auto.Config(pipeline, gammas).label, make)

            def make_auto():
                chooser = auto.Chooser(settings, target, {budget: middle}, draft,
                                       f"{auto.device_name(device)}|{str(dtype).removeprefix('torch.')}|bench", costs,
                                       prompt_len=ctx, new_tokens=new)
                return SpeculativeEngine([target, middle, draft], 0.6, 0.9, injected_acceptance=inject,
                                         chooser=chooser), chooser
            run("auto", make_auto)
    out["offloaded" if offloaded else "injected"] = rows
    del model, tiny, full, ret
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def part2(args, overrides: list[str], out: dict) -> None:
    import triforce
    from triforce.generator import PIPELINES

    text = (ROOT / "data/corpus/botchan.txt").read_text()
    new = 16 if args.smoke else 128
    common = ["chat=false", f"max_new_tokens={new}", "stream=false", *overrides]
    if args.smoke and not any(o.startswith("+model=") for o in overrides):
        common.insert(0, "+model=tiny-random")
    pinned = ["draft.gamma=4", "cache.budget=512"]  # every auto key explicit: no chooser in the fixed runs
    fixed = {"autoregressive": ["pipeline=autoregressive"],
             "retrieval g=6 B=512": ["pipeline=retrieval", "gamma=6", *pinned],
             "retrieval g=12 B=512": ["pipeline=retrieval", "gamma=12", *pinned],
             "triforce g=6/4 B=512": ["pipeline=triforce", "gamma=6", *pinned],
             "triforce g=12/4 B=512": ["pipeline=triforce", "gamma=12", *pinned]}
    if "draft" in PIPELINES:  # the classic two-tier draft-model pipeline, where this version has it
        fixed["draft g=4"] = ["pipeline=draft", "gamma=4", *pinned]
    gens = {k: triforce.load(*common, *v) for k, v in fixed.items()}
    gens["auto"] = triforce.load(*common, "pipeline=auto", "gamma=auto", "draft.gamma=auto", "cache.budget=auto")
    all_ids = gens["autoregressive"].encode(text, chat=False)
    rows = []
    for ctx in ((300, 900) if args.smoke else (1024, 7168)):
        ids = all_ids[10000:10000 + ctx]
        for temp in (0.0, 0.6):
            ref = None
            for gen in gens.values():  # untimed twins: graph captures, first-use cost measurement
                gen.generate(ids, temperature=temp, seed=0)
            # a run is ~0.1 s at this size and one timing moved 20% between identical configurations
            # on the H200: each row is the median of REPEATS, taken round-robin over the configurations
            # so that a slow stretch of the machine hits them all alike
            timed = {label: [] for label in gens}
            for _ in range(REPEATS):
                for label, gen in gens.items():
                    timed[label].append(gen.generate(ids, temperature=temp, seed=0))
            for label, runs in timed.items():
                r = sorted(runs, key=lambda x: x.stats["tokens_per_second"])[len(runs) // 2]
                s = r.stats
                row = {"context": ctx, "temperature": temp, "config": label, "tokens": len(r.token_ids),
                       "tokens_per_second": s["tokens_per_second"],
                       "tokens_per_second_runs": [x.stats["tokens_per_second"] for x in runs],
                       "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "ms_per_forward")}
                                 for k, v in s["tiers"].items()}}
                if "auto" in s:
                    row["auto"] = {k: s["auto"][k] for k in ("choice", "why", "sequence", "budget", "switches",
                                                             "predicted_tokens_per_second", "acceptance", "host_ms_per_forward")}
                if temp == 0:
                    ref = r.token_ids if ref is None else ref
                    row["greedy_equal_to_autoregressive"] = r.token_ids == ref
                    row["greedy_first_difference"] = first_difference(r.token_ids, ref)
                rows.append(row)
                print(json.dumps(row), flush=True)
    out["real"] = rows
    out["real_model"] = gens["autoregressive"].cfg.model.name


def scenario_ratios(rows: list[dict], keys: tuple[str, ...], speed) -> list[dict]:
    """Per scenario: auto's speed over the best fixed config's and over autoregressive's."""
    out = []
    for scen in sorted({tuple(r[k] for k in keys) for r in rows}):
        group = [r for r in rows if tuple(r[k] for k in keys) == scen]
        fixed = [r for r in group if r["config"] != "auto"]
        a = next(r for r in group if r["config"] == "auto")
        ar = next(r for r in group if r["config"] == "autoregressive")
        best = max(fixed, key=speed)
        out.append({**dict(zip(keys, scen)), "best_fixed": best["config"], "auto_choice": a.get("auto", {}).get("choice"),
                    "auto_vs_best_fixed": speed(a) / speed(best), "auto_vs_ar": speed(a) / speed(ar),
                    "best_fixed_vs_ar": speed(best) / speed(ar)})
    return out


def real_pair_rows(path: Path) -> tuple[str, list[dict]]:
    """A `scripts/bench_real.py` run (its fixed pipelines and `auto` on real code, side by side) as
    scenario rows: per (context, temperature), each pipeline's ms per token, mean over the tasks."""
    res = json.loads(path.read_text())
    ours = [r for r in res["rows"] if r["system"].startswith("triforce/")]
    if not any(r["pipeline"] == "auto" for r in ours):
        raise SystemExit(f"{path}: no pipeline=auto rows (run bench_real.py with its default pipelines)")
    groups: dict[tuple, list[float]] = {}
    for r in ours:
        groups.setdefault((r["context"], r["temperature"], r["pipeline"]), []).append(r["ms_per_token"])
    return res["settings"].get("model", "real pair"), [
        {"context": c, "temperature": t, "config": p, "ms_per_token": sum(v) / len(v), "tasks": len(v)}
        for (c, t, p), v in sorted(groups.items())]


def summarize(out: dict) -> dict:
    scen = []
    if out.get("injected"):
        scen += [{"part": "7B injected", **s} for s in scenario_ratios(out["injected"], ("rate",),
                                                                        lambda r: 1.0 / r["ms_per_token"])]
    if out.get("offloaded"):
        scen += [{"part": f"7B injected, offloaded at {out['settings'].get('offload_gib', 24)} GB", **s}
                 for s in scenario_ratios(out["offloaded"], ("rate",), lambda r: 1.0 / r["ms_per_token"])]
    if out.get("real"):
        scen += [{"part": out.get("real_model", "real"), **s}
                 for s in scenario_ratios(out["real"], ("context", "temperature"), lambda r: r["tokens_per_second"])]
    if out.get("real_pair"):
        scen += [{"part": f"{out['real_pair_model']} (bench_real)", **s} for s in
                 scenario_ratios(out["real_pair"], ("context", "temperature"), lambda r: 1.0 / r["ms_per_token"])]
    if not scen:
        return {}
    out = {"auto_worst_vs_best_fixed": min(s["auto_vs_best_fixed"] for s in scen),
           "auto_worst_vs_ar": min(s["auto_vs_ar"] for s in scen)}
    own = [s for s in scen if not s["part"].endswith("(bench_real)")]
    if own and len(own) < len(scen):  # the real pair's rows come from another run, maybe of older code
        out["this_run"] = {"auto_worst_vs_best_fixed": min(s["auto_vs_best_fixed"] for s in own),
                           "auto_worst_vs_ar": min(s["auto_vs_ar"] for s in own)}
    return {**out, "scenarios": scen}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--context", type=int, default=65536, help="part 1 context (7B shape)")
    ap.add_argument("--new", type=int, default=256, help="part 1 tokens per timed run")
    ap.add_argument("--offload-context", type=int, default=122880, help="part 3 context (7B shape, offloaded)")
    ap.add_argument("--offload-new", type=int, default=128, help="part 3 tokens per timed run")
    ap.add_argument("--offload-gib", type=float, default=24.0, help="part 3: the GPU memory emulated")
    ap.add_argument("--smoke", action="store_true", help="CPU-sized run that checks the script end to end")
    ap.add_argument("--cost-table", default=None, help="step-cost JSON (default: cache_dir()/step_costs.json)")
    ap.add_argument("--real-json", type=Path, default=None,
                    help="a bench_real.py run to add as scenarios (default results/real_<gpu>.json when it has auto rows)")
    ap.add_argument("--summarize-only", type=Path, default=None, metavar="JSON",
                    help="recompute the summary of an earlier run (with --real-json), no GPU")
    ap.add_argument("--out", default=None)
    args, overrides = ap.parse_known_args()
    if args.summarize_only:
        out = json.loads(args.summarize_only.read_text())
        if args.real_json:
            out["real_pair_model"], out["real_pair"] = real_pair_rows(args.real_json)
        out["summary"] = summarize(out)
        args.summarize_only.write_text(json.dumps(out, indent=1))
        print(json.dumps({k: v for k, v in out["summary"].items() if k != "scenarios"}, indent=1))
        return
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"unknown arguments {bad}: Hydra overrides look like key=value or +model=NAME")
    if args.smoke:
        args.context, args.new = min(args.context, 512), min(args.new, 24)
        args.offload_context, args.offload_new = min(args.offload_context, 300), min(args.offload_new, 24)
    elif not torch.cuda.is_available():
        raise SystemExit("bench_auto.py measures GPU speed; on a CPU run it with --smoke")
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tag = "smoke" if args.smoke else ("h200" if "H200" in name else "h100" if "H100" in name else name.split()[-1].lower())
    out = {"device": name, "torch": torch.__version__, "python": platform.python_version(), "smoke": args.smoke,
           "settings": {"context": args.context, "new_tokens": args.new, "rates": RATES, "tiny_rate": TINY_RATE,
                        "offload_context": args.offload_context, "offload_new_tokens": args.offload_new,
                        "offload_gib": args.offload_gib,
                        "tiny_direct_rate": TINY_DIRECT_RATE, "overrides": overrides,
                        "injected_acceptance": "benchmark-only switch (parts 1 and 3), rate per (verifier, drafter) "
                                               "pair: the target's decisions fixed per position by the seed (every "
                                               "configuration meets the same hard positions), lower tiers' drawn per "
                                               "round; part 2 is real"}}
    torch.manual_seed(0)
    if 1 in args.part:
        injected(args, out)
    if 2 in args.part:
        part2(args, overrides, out)
    if 3 in args.part:  # last: it caps this process's GPU memory
        injected(args, out, offloaded=True)
    real = args.real_json or ROOT / f"results/real_{tag}.json"
    if real.is_file() and (args.real_json or '"triforce/auto"' in real.read_text()):
        out["real_pair_model"], out["real_pair"] = real_pair_rows(real)
        out["settings"]["real_pair_from"] = str(real)
    out["summary"] = summarize(out)
    path = Path(args.out or ROOT / f"results/auto_{tag}.json")
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out["summary"].items() if k != "scenarios"}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
