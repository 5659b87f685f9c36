"""End to end on real weights (H200): our pipelines vs Hugging Face peers on code completion prompts.

Pipelines autoregressive, retrieval, draft ([target, tiny draft]) and triforce at each context and
temperature over `--docs` repository-level completion tasks (`triforce.corpus.code_tasks`),
`--new-tokens` tokens each (no stop at EOS, so every run measures as many), CUDA graphs; each timed
run follows an identical untimed one (`bench_speed.timed_generation`), so graph captures are not
timed. Peers on the same GPU and weights at `--hf-contexts`: transformers `generate` with a static
cache, assisted generation with the tiny draft as `assistant_model` (greedy and sampled) and prompt
lookup (greedy). The model comes from Hydra overrides (`--overrides`), as for `python -m triforce.generate`.

    python scripts/bench_real.py                                   # +model=qwen2.5-coder-1.5b, the full sweep
    python scripts/bench_real.py --overrides +model=smollm2-135m model.name=qwen2.5-coder-1.5b \\
        model.path=T.gguf model.draft_path=D.gguf model.context_length=32768
    python scripts/bench_real.py --smoke                           # CPU, tiny sizes (the test runs this)
    python scripts/bench_real.py --replay results/real_h200.json   # random weights, recorded accept counts
    python scripts/bench_real.py --merge results/real_h200.json real16.json --out results/real_h200.json

`--replay` is for when the real weights cannot reach the GPU: it builds random weights of the
recorded shapes and replays, round by round, the accept counts a real run recorded (a
benchmark-only engine switch; rows are labelled "replayed"), so step costs are real and acceptance
is the real run's. Writes the raw rows as they come (stdout, and `<out>.raw.jsonl`) and
results/real_<gpu>.json with a `summary`. `--merge A.json B.json ... --out X.json` joins runs of one
sweep made separately (e.g. one context each): rows and raw rows concatenated, summary recomputed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from bench_speed import hf_ms_per_token, hf_model, timed_generation
from triforce.corpus import code_tasks
from triforce.engine import SpeculativeEngine
from triforce.generator import PIPELINES, Generator, model_file

ROOT = Path(__file__).resolve().parents[1]
ALL_PIPELINES = ("autoregressive", "retrieval", "draft", "triforce", "auto")
PINNED = ("cache.budget=", "gamma=", "draft.gamma=")  # what `auto` chooses itself
SMOKE = ["+model=smollm2-135m", "model.context_length=2048", "cache.budget=64", "device=cpu"]


class ReplayEngine(SpeculativeEngine):
    """BENCHMARK ONLY: verification at level k accepts, round by round, the counts a real run
    recorded (random weights accept nothing). The forwards still run, with their real costs."""

    def __init__(self, tiers, counts: dict[int, list[int]], *args, **kwargs):
        super().__init__(tiers, *args, injected_acceptance={level: 0.0 for level in counts}, **kwargs)
        self.counts = {level: list(c) for level, c in counts.items()}
        self.position = {level: 0 for level in counts}

    def _injected(self, level: int, rate: float, g: int, start) -> torch.Tensor:
        i, c = self.position[level], self.counts[level]
        self.position[level] = i + 1
        n = min(g, c[i]) if i < len(c) else 0  # past the recorded rounds: reject (never seen in practice)
        return torch.full((self.batch,), n, device=self.device)  # one recorded run: every row (of one) the same


def compose_cfg(overrides: list[str]):
    with initialize_config_module(config_module="triforce.conf", version_base=None):
        return compose(config_name="config", overrides=overrides)


def load(overrides: list[str], pipeline: str) -> Generator:
    """A Generator for `pipeline`."""
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; valid: {', '.join(ALL_PIPELINES)}")
    if pipeline == "auto":  # the adaptive chooser picks tiers, gammas and budget itself
        overrides = [o for o in overrides if not o.startswith(PINNED)] + ["cache.budget=auto", "gamma=auto",
                                                                          "draft.gamma=auto"]
    gen = Generator(compose_cfg([*overrides, f"pipeline={pipeline}"]))
    gen.stop_ids = set()  # no stop at EOS: every run generates --new-tokens tokens
    return gen


def emit(row: dict, raw: Path) -> None:
    print(json.dumps(row), flush=True)
    with raw.open("a") as f:
        f.write(json.dumps(row) + "\n")


def run_ours(args, overrides: list[str], tasks, raw: Path) -> tuple[list[dict], dict]:
    """Every pipeline x context x temperature x document; returns rows and the models' shapes."""
    rows, shapes = [], {}
    for pipe in args.pipelines:
        gen = load(overrides, pipe)
        shapes["target"] = vars(gen.args)
        if getattr(gen, "draft", None) is not None and hasattr(gen.draft, "args"):
            shapes["draft"] = vars(gen.draft.args)
        for task in tasks:
            for temp in args.temperatures:
                r, timing = timed_generation(gen, task.prompt_ids, temp, seed=args.seed)
                row = {"system": f"triforce/{pipe}", "pipeline": pipe, "context": task.length, "document": task.id,
                       "temperature": temp, **timing, "tokens_per_second": 1e3 / timing["ms_per_token"],
                       "mean_accepted_length": timing["tiers"]["target"]["mean_accepted_length"],
                       "token_ids": r.token_ids, "accepts": last_accepts(gen)}
                if "auto" in r.stats:  # what the chooser ran, and why
                    row["auto"] = r.stats["auto"]
                rows.append(row)
                emit({k: v for k, v in row.items() if k not in ("token_ids", "accepts")}, raw)
        del gen
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows, shapes


def last_accepts(gen: Generator) -> dict[str, list[int]]:
    """Per verifying tier, the accepted count of each round of the generator's last run."""
    return {t.name: list(t.stats.accepts) for t in gen._tiers[:-1]}  # the tiers the last generate ran


def run_hf(args, overrides: list[str], tasks, raw: Path) -> list[dict]:
    """transformers generate on the same weights: static cache, assisted by the tiny draft, prompt lookup."""
    cfg = compose_cfg(overrides)
    m = cfg.get("model")
    if m is None or m.random_weights or not m.path:
        print("HF peers skipped: the model has no checkpoint", file=sys.stderr)
        return []
    device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    hf = hf_model(model_file(m.name, m.path, m.get("fetch"), "model.fetch"), dtype, device)
    assistant = None
    if m.draft_path not in (None, "self", "lookup"):
        assistant = hf_model(model_file(m.name, m.draft_path, m.get("draft_fetch"), "model.draft_fetch"), dtype, device)
    peers = [("hf/static", 0.0, {"cache_implementation": "static", "disable_compile": True, "do_sample": False}),
             ("hf/prompt_lookup", 0.0, {"prompt_lookup_num_tokens": 10, "do_sample": False})]
    if assistant is not None:
        peers += [("hf/assisted", 0.0, {"assistant_model": assistant, "do_sample": False}),
                  ("hf/assisted", 0.6, {"assistant_model": assistant, "do_sample": True, "temperature": 0.6,
                                        "top_p": cfg.top_p})]
    rows = []
    for task in [t for t in tasks if t.length in args.hf_contexts]:
        x = torch.tensor([task.prompt_ids], device=device)
        for i, (label, temp, kw) in enumerate(peers):
            torch.manual_seed(args.seed)
            ms = hf_ms_per_token(hf, x, args.new_tokens, warmup=i == 0, **kw)
            row = {"system": label, "context": task.length, "document": task.id, "temperature": temp,
                   "ms_per_token": ms, "tokens_per_second": 1e3 / ms}
            rows.append(row)
            emit(row, raw)
    return rows


def run_replay(args, recorded: dict, raw: Path) -> list[dict]:
    """Random weights of the recorded shapes; each recorded run replayed with its accept counts."""
    shapes = recorded["model_shapes"]
    target = {k: v for k, v in shapes["target"].items() if k != "rope_scaling" or v}
    ctx = max(r["context"] for r in recorded["rows"] if "accepts" in r) + args.new_tokens + 64
    overrides = ["+model=tiny-random", f"model.name=replay-{recorded['settings']['model']}",
                 f"model.context_length={ctx}", "model.draft_layers=null", "cache.budget=" + str(recorded["settings"]["budget"]),
                 f"gamma={args.gamma}", f"draft.gamma={args.draft_gamma}"]
    cfg_args = OmegaConf.create({"model": {"args": target, "draft_args": shapes.get("draft")}})
    rows = []
    for pipe in dict.fromkeys(r["pipeline"] for r in recorded["rows"] if "accepts" in r and r["pipeline"] != "auto"):
        cfg = compose_cfg([*overrides, f"pipeline={pipe}"])
        OmegaConf.set_struct(cfg, False)
        cfg.model.args = cfg_args.model.args
        cfg.model.draft_args = cfg_args.model.draft_args
        gen = Generator(cfg)
        for rec in [r for r in recorded["rows"] if r.get("pipeline") == pipe and "accepts" in r]:
            ids = torch.randint(gen.args.vocab_size, (rec["context"],), generator=torch.Generator().manual_seed(0))
            n = rec["tokens"]
            capacity = len(ids) + n + cfg.gamma + cfg.draft.gamma + 2
            plan = gen.plan_memory(capacity, n) if gen.device.type == "cuda" else None
            tiers = gen.tiers(capacity, len(ids), plan)
            counts = {level: rec["accepts"].get(t.name, []) for level, t in enumerate(tiers[:-1])}
            for timed in (False, True):  # the untimed run captures the graphs
                eng = ReplayEngine(tiers, counts, rec["temperature"], cfg.top_p, gen.cfg.prefill_chunk, gpu_timing=True)
                t0 = time.perf_counter()
                out = eng.generate(ids, n, None, args.seed)
                if gen.device.type == "cuda":
                    torch.cuda.synchronize()
                sec = time.perf_counter() - t0 - eng.prefill_seconds
            st = eng.stats(len(out))
            row = {"system": f"replayed/{pipe}", "pipeline": pipe, "replayed": True, "context": rec["context"],
                   "document": rec["document"], "temperature": rec["temperature"], "tokens": len(out),
                   "ms_per_token": 1e3 * sec / len(out), "tokens_per_second": len(out) / sec,
                   "mean_accepted_length": st["target"]["mean_accepted_length"],
                   "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "ms_per_forward")}
                             for k, v in st.items()}}
            rows.append(row)
            emit(row, raw)
        del gen
    return rows


def summarize(rows: list[dict], longest: int) -> dict:
    """Speedups at the longest context, mean over documents, per temperature; per-tier acceptance;
    the same per context (`by_context`); greedy equality of each pipeline's ids with autoregressive."""
    ours = [r for r in rows if r["system"].startswith(("triforce/", "replayed/"))]
    temps = sorted({r["temperature"] for r in ours})

    def ms(system_suffix, t, doc, ctx=longest):
        hit = [r["ms_per_token"] for r in ours if r["context"] == ctx and r["temperature"] == t
               and r["document"] == doc and r["pipeline"] == system_suffix]
        return hit[0] if hit else None

    def speedups(ctx, t):  # per fixed pipeline: mean over documents of AR ms / its ms
        docs = sorted({r["document"] for r in ours if r["context"] == ctx and r["temperature"] == t})
        speed = {}
        for pipe in dict.fromkeys(r["pipeline"] for r in ours if r["pipeline"] not in ("autoregressive", "auto")):
            ratios = [ms("autoregressive", t, d, ctx) / ms(pipe, t, d, ctx) for d in docs
                      if ms(pipe, t, d, ctx) and ms("autoregressive", t, d, ctx)]
            if ratios:
                speed[pipe] = statistics.mean(ratios)
        return docs, speed

    def acceptance(pipe, ctx, t):  # per verifying tier: mean acceptance over documents
        sub = [r for r in ours if r["pipeline"] == pipe and r["context"] == ctx and r["temperature"] == t]
        acc = {}
        for tier in sub[0]["tiers"] if sub else []:
            vals = [r["tiers"][tier]["acceptance_rate"] for r in sub if r["tiers"][tier]["acceptance_rate"] is not None]
            if vals:
                acc[tier] = statistics.mean(vals)
        return sub, acc

    s = {"context": longest, "real_best_pipeline_32k": {}, "real_best_speedup_vs_ar_32k": {},
         "real_triforce_speedup_vs_ar_32k": {}, "real_speedup_vs_hf_assisted_32k": {}, "per_tier_acceptance": {},
         "mean_accepted_length": {}, "greedy_equal_to_autoregressive": {}}
    for t in temps:
        docs, speed = speedups(longest, t)
        key = str(t)
        if speed:
            best = max(speed, key=speed.get)
            s["real_best_pipeline_32k"][key] = best
            s["real_best_speedup_vs_ar_32k"][key] = speed[best]
            s["real_triforce_speedup_vs_ar_32k"][key] = speed.get("triforce")
        hf = [r["ms_per_token"] for r in rows if r["system"] == "hf/assisted" and r["context"] == longest
              and r["temperature"] == t]
        if hf and speed:
            best_ms = statistics.mean(ms(s["real_best_pipeline_32k"][key], t, d) for d in docs)
            s["real_speedup_vs_hf_assisted_32k"][key] = statistics.mean(hf) / best_ms
        for pipe in dict.fromkeys(r["pipeline"] for r in ours):
            sub, acc = acceptance(pipe, longest, t)
            if acc:
                s["per_tier_acceptance"].setdefault(pipe, {})[key] = acc
                s["mean_accepted_length"].setdefault(pipe, {})[key] = statistics.mean(
                    r["mean_accepted_length"] for r in sub)
    # every context, keyed "context/temperature": each fixed pipeline's speedup over AR, the best one, acceptance
    s["by_context"] = {}
    for ctx in sorted({r["context"] for r in ours}):
        for t in temps:
            speed = speedups(ctx, t)[1]
            if speed:
                best = max(speed, key=speed.get)
                s["by_context"][f"{ctx}/{t}"] = {
                    "best_pipeline": best, "best_speedup_vs_ar": speed[best], "speedup_vs_ar": speed,
                    "per_tier_acceptance": {p: acc for p in dict.fromkeys(r["pipeline"] for r in ours)
                                            if (acc := acceptance(p, ctx, t)[1])}}
    # the adaptive chooser against the best fixed pipeline and autoregressive, per context and temperature
    s["auto_vs_best_fixed"], s["auto_vs_ar"] = {}, {}
    for ctx in sorted({r["context"] for r in ours if r["pipeline"] == "auto"}):
        for t in temps:
            sub = [r for r in ours if r["context"] == ctx and r["temperature"] == t]
            mean_ms = {p: statistics.mean(r["ms_per_token"] for r in sub if r["pipeline"] == p)
                       for p in dict.fromkeys(r["pipeline"] for r in sub)}
            if "auto" not in mean_ms:
                continue
            fixed = {p: v for p, v in mean_ms.items() if p != "auto"}
            key = f"{ctx}/{t}"
            s["auto_vs_best_fixed"][key] = min(fixed.values()) / mean_ms["auto"] if fixed else None
            s["auto_vs_ar"][key] = mean_ms["autoregressive"] / mean_ms["auto"] if "autoregressive" in mean_ms else None
    s["greedy_equal_runs"] = {}  # per pipeline: runs equal to AR, runs, and where the others first differ
    for r in ours:
        if r["temperature"] == 0 and "greedy_equal_to_autoregressive" in r and r["pipeline"] != "autoregressive":
            flags = s["greedy_equal_to_autoregressive"]
            flags[r["pipeline"]] = flags.get(r["pipeline"], True) and r["greedy_equal_to_autoregressive"]
            c = s["greedy_equal_runs"].setdefault(r["pipeline"], {"equal": 0, "runs": 0, "first_difference_at": []})
            c["runs"] += 1
            if r["greedy_equal_to_autoregressive"]:
                c["equal"] += 1
            elif "first_difference_at" in r:
                c["first_difference_at"].append(r["first_difference_at"])
    return s


def merge(paths: list[Path], out_path: Path) -> dict:
    """Runs of one sweep (same model and settings, disjoint rows) as one run: rows joined, contexts and
    documents united, summary recomputed; the raw companions (`.raw.jsonl`) are concatenated too."""
    runs = [json.loads(p.read_text()) for p in paths]
    for p, r in zip(paths[1:], runs[1:]):
        diff = [k for k in ("overrides", "model", "new_tokens", "budget", "docs")
                if r["settings"].get(k) != runs[0]["settings"].get(k)]
        if diff or r["device"] != runs[0]["device"]:
            raise SystemExit(f"{p}: {diff or 'device'} differ from {paths[0]}: not one sweep")
    rows = [row for r in runs for row in r["rows"]]
    keys = [(x["system"], x["context"], x["document"], x["temperature"]) for x in rows]
    if len(set(keys)) != len(keys):
        raise SystemExit(f"{sorted({k for k in keys if keys.count(k) > 1})[:3]}: measured in more than one run")
    out = {**runs[0], "settings": dict(runs[0]["settings"]), "wall_seconds": sum(r["wall_seconds"] for r in runs)}
    st = out["settings"]
    for k in ("contexts", "hf_contexts", "documents", "temperatures"):
        st[k] = sorted({x for r in runs for x in r["settings"].get(k, [])})
    st["pipelines"] = list(dict.fromkeys(x for r in runs for x in r["settings"]["pipelines"]))
    st["merged_from"] = [{"file": p.name, "contexts": r["settings"]["contexts"], "hf_contexts": r["settings"]["hf_contexts"],
                          "wall_seconds": r["wall_seconds"]} for p, r in zip(paths, runs)]
    out["rows"] = rows
    out["summary"] = summarize(rows, max(st["contexts"]))
    raw = "".join(p.with_suffix(".raw.jsonl").read_text() for p in paths if p.with_suffix(".raw.jsonl").exists())
    out_path.write_text(json.dumps(out, indent=1))
    out_path.with_suffix(".raw.jsonl").write_text(raw)
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'system':26s} {'ctx':>6s} {'T':>4s} {'ms/tok':>8s} {'accept (per tier)':>24s}"]
    agg: dict[tuple, list[dict]] = {}
    for r in rows:
        agg.setdefault((r["system"], r["context"], r["temperature"]), []).append(r)
    for (system, ctx, t), rs in agg.items():
        acc = ""
        if "tiers" in rs[0]:
            acc = " / ".join(f"{statistics.mean(x['tiers'][k]['acceptance_rate'] for x in rs):.2f}"
                             for k in rs[0]["tiers"] if rs[0]["tiers"][k]["acceptance_rate"] is not None)
        lines.append(f"{system:26s} {ctx:6d} {t:4.1f} {statistics.mean(x['ms_per_token'] for x in rs):8.2f} {acc:>24s}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--overrides", nargs="+", default=None,
                    help="Hydra overrides choosing the model, as for python -m triforce.generate "
                         "(default: +model=qwen2.5-coder-1.5b; with --smoke, the embedded SmolLM2 on CPU)")
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--docs", type=int, default=3, help="code completion tasks per context")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.6])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--pipelines", nargs="+", default=list(ALL_PIPELINES), choices=ALL_PIPELINES)
    ap.add_argument("--hf-contexts", type=int, nargs="*", default=[32768], help="contexts of the HF peers")
    ap.add_argument("--budget", type=int, default=2048, help="retrieval budget (cache.budget)")
    ap.add_argument("--gamma", type=int, default=6, help="tokens drafted per target verification (fixed: not auto)")
    ap.add_argument("--draft-gamma", type=int, default=4, help="tiny-draft tokens per retrieval verification (triforce)")
    ap.add_argument("--corpus-dir", default=str(ROOT / "data/code"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes: 256-token prompts, 1 task, 8 tokens, budget 64")
    ap.add_argument("--replay", type=Path, default=None, help="a real run's JSON: replay its accept counts")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="join these runs' rows into --out and recompute the summary (no model, no GPU)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    if a.merge:
        if a.out is None:
            ap.error("--merge needs --out")
        out = merge(a.merge, a.out)
        print(table(out["rows"]))
        print(f"wrote {a.out} ({len(out['rows'])} rows from {len(a.merge)} runs)", file=sys.stderr)
        return out
    if a.smoke:
        a.contexts, a.docs, a.new_tokens, a.hf_contexts, a.budget = [256], 1, 8, [256], 64
    a.overrides = a.overrides or (SMOKE if a.smoke else ["+model=qwen2.5-coder-1.5b"])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    tag = "smoke" if a.smoke else gpu.split()[1].lower() if gpu.startswith("NVIDIA ") else gpu.lower()
    out_path = a.out or ROOT / f"results/real_{tag}{'_replayed' if a.replay else ''}.json"
    raw = out_path.with_suffix(".raw.jsonl")
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text("")
    # fixed pipelines: every setting `auto` would choose is pinned (the auto study is scripts/bench_auto.py)
    overrides = [*a.overrides, f"cache.budget={a.budget}", f"gamma={a.gamma}", f"draft.gamma={a.draft_gamma}",
                 f"max_new_tokens={a.new_tokens}", "stream=false",
                 "chat=false", "prefill_chunk=2048" if not a.smoke else "prefill_chunk=128"]
    import transformers

    out = {"device": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "settings": {"overrides": overrides, "contexts": a.contexts, "docs": a.docs, "temperatures": a.temperatures,
                        "new_tokens": a.new_tokens, "pipelines": a.pipelines, "budget": a.budget,
                        "hf_contexts": a.hf_contexts, "cuda_graphs": torch.cuda.is_available(),
                        "prompts": "triforce.corpus.code_tasks (repository-level code completion)",
                        "timing": "each timed run follows an identical untimed one; decode time only"}}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        pass
    t0 = time.perf_counter()
    if a.replay:
        recorded = json.loads(a.replay.read_text())
        out["settings"].update(replayed_from=str(a.replay), model=recorded["settings"]["model"],
                               injected="BENCHMARK ONLY: accept counts replayed from a real run, random weights")
        rows = run_replay(a, recorded, raw)
    else:
        cfg = compose_cfg(overrides)
        out["settings"]["model"] = (cfg.get("model") or {}).get("name", "smollm2-135m")
        gen0 = load(overrides, "autoregressive")
        room = a.new_tokens + 128  # the new tokens and a round's drafts must fit the model's context
        lengths = [min(c, gen0.context_length - room) for c in a.contexts]
        if lengths != a.contexts:
            print(f"prompt lengths {a.contexts} -> {lengths}: {room} tokens of the {gen0.context_length}-token "
                  f"context are left for generation", file=sys.stderr)
        a.contexts = lengths
        out["settings"]["contexts"] = lengths
        tasks = code_tasks(gen0.tokenizer, lengths, a.docs, a.corpus_dir)
        out["settings"]["documents"] = sorted({t.id for t in tasks})
        del gen0
        rows, shapes = run_ours(a, overrides, tasks, raw)
        out["model_shapes"] = shapes
        for r in rows:  # greedy equality with autoregressive on the same prompt
            if r["temperature"] == 0:
                ar = next(x for x in rows if x["pipeline"] == "autoregressive" and x["context"] == r["context"]
                          and x["document"] == r["document"] and x["temperature"] == 0)
                r["greedy_equal_to_autoregressive"] = r["token_ids"] == ar["token_ids"]
                if not r["greedy_equal_to_autoregressive"]:  # in bf16 a near-tie can flip between a verify and an AR step
                    r["first_difference_at"] = next((i for i, (x, y) in enumerate(zip(r["token_ids"], ar["token_ids"]))
                                                     if x != y), min(len(r["token_ids"]), len(ar["token_ids"])))
        rows += run_hf(a, overrides, tasks, raw) if a.hf_contexts else []
    out["wall_seconds"] = time.perf_counter() - t0
    out["rows"] = rows
    out["summary"] = summarize(rows, max(a.contexts))
    out_path.write_text(json.dumps(out, indent=1))
    print(table(rows))
    print(json.dumps(out["summary"], indent=1))
    print(f"wrote {out_path} ({out['wall_seconds']:.0f} s)", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
