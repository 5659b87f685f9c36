"""Tensor parallelism over the GPUs of one host (issue 7): step scaling, a 13B-shape model, offloading.

    torchrun --nproc_per_node=2 scripts/bench_tp.py [--parts steps big offload] [--out results/tp_h200x2.json]
    torchrun --nproc_per_node=2 scripts/bench_tp.py --smoke      # toy sizes on CPU with gloo: it runs end to end

On the 2x H200 lease, whose MemAvailable starts at ~31 GiB and grows on use, add --host-memory-gb 100
(pinned host memory per rank; the offloaded 7B KV at 120K needs ~31 GiB per rank, ~62 GiB on one GPU).

Every rank runs the same code; the target is sharded over all ranks (heads, KV heads, MLP columns,
one all-reduce after attention and one after the MLP), the tiny draft is replicated, sampling
decisions are broadcast from rank 0 (as `triforce.generate` does). Random weights, KV filled with
random values instead of a prefill, acceptance decisions INJECTED where stated (benchmark-only
switch: random weights accept nothing). Times are the slowest rank's.
  steps    Llama-2-7B-128K shape, bf16, CUDA graphs (containing the NCCL all-reduces): AR step and an
           8-token verify step at 64K and 120K on one GPU (rank 0 alone) and sharded over all ranks.
           Floor = bytes a rank reads per step / that GPU's copy bandwidth (measured here);
           scaling = 1-GPU ms / N-GPU ms, efficiency = scaling / (1-GPU floor / N-GPU floor).
  big      Llama-2-13B shape at 120K with all KV on the GPUs (~124 GB: not one 80 GB card, fits two
           H200s): end to end (retrieval 4K budget, tiny draft) vs its own sharded AR.
  offload  7B shape at 120K, memory planned per rank for --gpu-memory-gb (24: two RTX 4090s) and
           enforced; pinned host->GPU bandwidth per rank alone and all at once; offloaded AR step
           sharded vs on one GPU (each rank streams its own heads over its own PCIe link); end to
           end vs offloaded AR with the same sharding.
Writes JSON (rank 0) with a top-level `summary` {tpN_ar_scaling, tpN_offload_speedup_vs_offloaded_ar, ...}.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from bench_offload import adopt_random, host_bandwidth
from bench_speed import LLAMA2_7B, LLAMA_68M, copy_bandwidth, cuda_time
from triforce.cache import FullCache, RetrievalCache, StreamingCache
from triforce.engine import SpeculativeEngine, Tier
from triforce.graphs import GraphedModel, graph_sizes
from triforce.models.llama import ModelArgs, build_model
from triforce.offload import OffloadedFullCache
from triforce.planner import GiB, host_available_bytes, plan_memory

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_13B = ModelArgs(vocab_size=32000, dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, intermediate_size=13824,
                       max_position_embeddings=131072)
TOY = {  # --smoke: the same code at sizes a 2-core CPU runs in seconds
    "7b": ModelArgs(vocab_size=256, dim=128, n_layers=4, n_heads=8, n_kv_heads=4, intermediate_size=256,
                    max_position_embeddings=8192),
    "13b": ModelArgs(vocab_size=256, dim=160, n_layers=5, n_heads=10, n_kv_heads=10, intermediate_size=320,
                     max_position_embeddings=8192),
    "tiny": ModelArgs(vocab_size=256, dim=64, n_layers=1, n_heads=4, n_kv_heads=4, intermediate_size=128,
                      max_position_embeddings=8192),
}
SINKS, WINDOW = 16, 496  # the tiny draft's StreamingLLM cache


class Run:
    """This rank, its device and group, and collective helpers for timings and rank-0-only work."""

    def __init__(self, smoke: bool):
        if "WORLD_SIZE" not in os.environ:
            raise SystemExit("launch with torchrun: torchrun --nproc_per_node=2 scripts/bench_tp.py [--smoke]")
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        if smoke:
            self.device = torch.device("cpu")
        else:
            if torch.cuda.device_count() < self.local_world:
                raise SystemExit(f"{self.local_world} ranks on this host need {self.local_world} GPUs, "
                                 f"{torch.cuda.device_count()} visible (use --smoke for the CPU check)")
            torch.cuda.set_device(self.local_rank)
            self.device = torch.device("cuda", self.local_rank)
        self.cuda = self.device.type == "cuda"
        # rank 0 alone measures the 1-GPU baselines while the others wait: a long timeout
        dist.init_process_group("nccl" if self.cuda else "gloo", timeout=timedelta(minutes=90))
        self.group = dist.group.WORLD

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def slowest(self, x: float | None) -> float | None:
        """The maximum of x over the ranks (a step is as slow as its slowest shard)."""
        t = torch.tensor([x if x is not None else float("nan")], dtype=torch.float64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return float(t)

    def gather(self, obj) -> list:
        out: list = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def solo(self, fn):
        """fn() on rank 0 only (a 1-GPU baseline), its result on every rank."""
        box = [fn() if self.rank == 0 else None]
        dist.barrier(group=self.group)
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def timed(run: Run, fn, repeats: int = 20, warmup: int = 3) -> float:
    """Median ms of fn() on this rank: CUDA events on GPU, wall clock on CPU."""
    if run.cuda:
        return cuda_time(fn, repeats, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times)


def bandwidth(run: Run) -> float:
    """GB/s of a device copy (bytes read + written): what a step's bytes are divided by."""
    if run.cuda:
        return copy_bandwidth()
    x = torch.empty(64 << 20, dtype=torch.uint8)
    y = torch.empty_like(x)
    return 2 * x.numel() / timed(run, lambda: y.copy_(x), 5, 1) / 1e6


def fill(cache, length: int, block: int = 16384) -> None:
    """Stand-in for a prefill: random K/V for positions [0, length) through the store API (any store)."""
    b = min(block, length)
    k = torch.randn(cache.n_kv_heads, b, cache.head_dim, dtype=cache.dtype, device=cache.device)
    v = torch.randn_like(k)
    for layer in range(cache.n_layers):
        for a in range(0, length, b):
            n = min(b, length - a)
            cache.write(layer, a, k[:, :n], v[:, :n])
    if cache.device.type == "cuda":
        torch.cuda.synchronize()
    adopt_random(cache, length)


def step_ms(run: Run, model, cache, n_new: int, ctx: int, graphs: bool) -> float:
    """ms of one forward of n_new tokens at ctx (rolled back before each): a CUDA graph where the cache allows."""
    tokens = torch.randint(0, model.args.vocab_size, (1, n_new), device=run.device)
    if graphs and run.cuda and cache.graph_ready:
        g = GraphedModel(model, cache, {n_new})

        def fwd():
            cache.truncate(ctx)
            g(tokens, n_new)
    else:
        def fwd():
            cache.truncate(ctx)
            model(tokens, cache, last=n_new)
    heavy = not cache.graph_ready  # offloaded: a step streams the KV over PCIe (about a second)
    return timed(run, fwd, *((3, 1) if heavy or not run.cuda else (20, 3)))


def step_rows(run: Run, model, contexts: list[int], verify: int, graphs: bool, bw: float, label: str) -> list[dict]:
    """AR and verify steps of `model` (sharded or not) at each context against this rank's byte floor."""
    a, nb = model.local_args, model.dtype.itemsize
    rows = []
    for ctx in contexts:
        full = FullCache(model, ctx + 64)
        fill(full, ctx)
        floor = (a.weight_bytes(nb) + ctx * a.kv_bytes_per_token(nb)) / bw / 1e6
        r = {"setup": label, "context": ctx, "floor_ms": floor, "ar_ms": step_ms(run, model, full, 1, ctx, graphs),
             f"verify{verify}_ms": step_ms(run, model, full, verify, ctx, graphs)}
        rows.append(r)
        del full
        run.free()
    return rows


def e2e(run: Run, model, tiny, full, ctx: int, budget: int, gammas: list[int], rates: list[float],
        tiny_rate: float, gamma2: int, new_tokens: int, ar_tokens: int, graphs: bool, rows: list, save) -> None:
    """The real engine over `full` (on-chip or offloaded), prefill faked, acceptance injected; vs AR on the same store.

    Appends one row per run to `rows` (saved as it goes).
    """
    vocab = model.args.vocab_size
    prompt = torch.randint(0, vocab, (ctx + 1,), generator=torch.Generator().manual_seed(0))  # same on every rank
    ret = RetrievalCache(full, model, budget, 8)
    stream = StreamingCache(tiny, SINKS, WINDOW, slack=32 + 2 * max(gammas), max_forward=512)
    warm = torch.randint(0, vocab, (1, 512), generator=torch.Generator().manual_seed(1)).to(run.device)
    graphed: dict[tuple, GraphedModel] = {}

    def fake_prefill(tiers):
        def prefill(progress=False):  # the prompt's KV is already in the store
            adopt_random(full, ctx)
            for t in tiers[1:]:  # the tiers, not the engine: no reference cycle keeps dead graphs alive
                if not t.cache.adopt_prefix(ctx):
                    tiny(warm, t.cache)
                    t.cache.length, t.cache.start = ctx, ctx - WINDOW
        return prefill

    def go(label, tiers, inject, gamma, n_new):
        if graphs and run.cuda:
            for level, t in enumerate(tiers):
                sizes = graph_sizes(tiers, level)
                key = (id(t.cache), tuple(sorted(sizes)))
                t.graphed = graphed.setdefault(key, GraphedModel(t.model, t.cache, sizes))
        eng = SpeculativeEngine(tiers, 0.6, 0.9, injected_acceptance=inject, group=run.group)
        eng._prefill, eng.prefill_seconds = fake_prefill(tiers), 0.0
        eng.generate(prompt, min(8, n_new), seed=0)  # captures graphs, warms kernels
        run.sync()
        t0 = time.perf_counter()
        n = len(eng.generate(prompt, n_new, seed=1))
        run.sync()
        ms = run.slowest(1e3 * (time.perf_counter() - t0) / n)
        r = {"label": label, "tiers": len(tiers), "context": ctx, "gamma": gamma, "budget": budget,
             "injected": {str(k): v for k, v in inject.items()}, "tokens": n, "ms_per_token": ms,
             "per_tier": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "ms_per_forward", "forwards")}
                          for k, v in eng.stats(n).items()}}
        rows.append(r)
        if run.rank == 0:
            print(json.dumps(r), flush=True)
        save()
        return r

    ar = go("autoregressive", [Tier("target", model, full)], {}, 0, ar_tokens)
    for rate in rates:
        for gamma in gammas:
            for label in ("retrieval", "triforce"):
                tiers = [Tier("target", model, full, gamma=gamma), Tier("retrieval", model, ret, gamma=gamma2)]
                inject = {0: rate}
                if label == "triforce":
                    tiers.append(Tier("tiny", tiny, stream))
                    inject[1] = tiny_rate
                r = go(f"{label}@{rate}", tiers, inject, gamma, new_tokens)
                r["speedup_vs_ar"] = ar["ms_per_token"] / r["ms_per_token"]


# ---------------------------------------------------------------------------------------- parts
def part_steps(run: Run, args, out: dict, save) -> None:
    a, dt = args.shapes["7b"], args.dtype
    out["bandwidth_gb_s"] = bws = run.gather(bandwidth(run))
    contexts = args.contexts

    def one_gpu():
        model = build_model(a, None, run.device, dt, context_length=a.max_position_embeddings).eval()
        rows = step_rows(run, model, contexts, args.verify, args.graphs, bws[0], "1 GPU")
        del model
        run.free()
        return rows

    with torch.inference_mode():
        single = run.solo(one_gpu)
        model = build_model(a, None, run.device, dt, context_length=a.max_position_embeddings,
                            tp_group=run.group).eval()
        mine = step_rows(run, model, contexts, args.verify, args.graphs, bws[run.rank], f"{run.world} GPUs")
        del model
        run.free()
    every = run.gather(mine)  # each rank's own times and floors
    rows = []
    for i, (s, ctx) in enumerate(zip(single, contexts)):
        ranks = [e[i] for e in every]
        tp = {"setup": f"{run.world} GPUs", "context": ctx,
              "floor_ms": max(r["floor_ms"] for r in ranks),
              "ar_ms": max(r["ar_ms"] for r in ranks),
              f"verify{args.verify}_ms": max(r[f"verify{args.verify}_ms"] for r in ranks),
              "per_rank": ranks}
        tp["ar_over_floor"] = tp["ar_ms"] / tp["floor_ms"]
        tp["ar_scaling"] = s["ar_ms"] / tp["ar_ms"]
        tp["verify_scaling"] = s[f"verify{args.verify}_ms"] / tp[f"verify{args.verify}_ms"]
        tp["ideal_scaling"] = s["floor_ms"] / tp["floor_ms"]  # < N: the embedding row and head are replicated
        tp["scaling_efficiency"] = tp["ar_scaling"] / tp["ideal_scaling"]
        s["ar_over_floor"] = s["ar_ms"] / s["floor_ms"]
        rows += [s, tp]
        if run.rank == 0:
            print(json.dumps(s), json.dumps({k: v for k, v in tp.items() if k != "per_rank"}), sep="\n", flush=True)
    out["steps"] = rows
    save()


def part_big(run: Run, args, out: dict, save) -> None:
    a, ctx, dt = args.shapes["13b"], args.big_context, args.dtype
    new = args.new_tokens
    with torch.inference_mode():
        model = build_model(a, None, run.device, dt, context_length=a.max_position_embeddings,
                            tp_group=run.group).eval()
        tiny = build_model(args.shapes["tiny"], None, run.device, dt, seed=1).eval()  # replicated
        full = FullCache(model, ctx + new + 4 * max(args.big_gammas) + 64)
        fill(full, ctx)
        if run.cuda:
            out["big_peak_gpu_gib"] = run.gather(torch.cuda.max_memory_allocated() / GiB)
        e2e(run, model, tiny, full, ctx, args.big_budget, args.big_gammas, args.rates, args.tiny_acceptance,
            args.gamma2, new, new, args.graphs, out.setdefault("big_e2e", []), save)
        del model, tiny, full
        run.free()
    save()


def part_offload(run: Run, args, out: dict, save) -> None:
    a, ctx, dt = args.shapes["7b"], args.offload_context, args.dtype
    tiny_args = args.shapes["tiny"]
    new, g = args.offload_new_tokens, max(args.offload_gammas)
    capacity = ctx + new + 4 * g + 64
    gpu = int(args.gpu_memory_gb * GiB)

    def plan(model_args, host):
        return plan_memory(model_args, capacity, args.offload_budget, g, tiny_args, dt.itemsize, gpu, host, "true",
                           new_tokens=new + 2 * g, draft_cache_tokens=SINKS + WINDOW + 32 + 2 * g + 512,
                           draft_gamma=args.gamma2,
                           max_resident=a.n_layers // 2 if args.smoke else None)

    if run.cuda:
        run.free()
        out["offload_start_allocated_gib"] = run.gather(torch.cuda.memory_allocated() / GiB)  # left by earlier parts
        total = torch.cuda.get_device_properties(run.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, gpu / total))  # really a 24 GB card per rank
        dist.barrier(group=run.group)
        out["host_bandwidth_all_ranks_at_once"] = run.gather(host_bandwidth())
        out["host_bandwidth_rank0_alone"] = run.solo(host_bandwidth)
        h2d = out["host_bandwidth_all_ranks_at_once"][run.rank]["h2d_gb_s"]
    else:
        h2d = None
    host = int(args.host_memory_gb * GiB) if args.host_memory_gb else host_available_bytes() // run.local_world
    p = plan(a.local(run.world), host)
    out["offload_plan"] = p.describe()
    if run.rank == 0:
        print(p.describe(), flush=True)
    with torch.inference_mode():
        model = build_model(a, None, run.device, dt, context_length=a.max_position_embeddings,
                            tp_group=run.group).eval()
        tiny = build_model(tiny_args, None, run.device, dt, seed=1).eval()
        full = OffloadedFullCache(model, capacity, p.resident_layers, p.transfer_chunk)
        fill(full, ctx)
        moved = p.offloaded_layers * ctx * model.local_args.kv_bytes_per_token(dt.itemsize) // a.n_layers
        ar = step_ms(run, model, full, 1, ctx, False)
        out["offload_ar_step"] = {"setup": f"{run.world} GPUs", "context": ctx, "resident_layers": p.resident_layers,
                                  "offloaded_gib_per_rank": moved / GiB, "ms": run.slowest(ar),
                                  "floor_ms": run.slowest(moved / h2d / 1e6) if h2d else None}
        if run.rank == 0:
            print(json.dumps(out["offload_ar_step"]), flush=True)
        save()
        e2e(run, model, tiny, full, ctx, p.budget, args.offload_gammas, args.rates, args.tiny_acceptance,
            args.gamma2, new, args.offload_ar_tokens, args.graphs, out.setdefault("offload_e2e", []), save)
        del model, tiny, full
        run.free()
        save()

        def one_gpu():  # the same offloaded AR step on one GPU: one PCIe link carries all heads
            try:
                q = plan(a, int(args.host_memory_gb * GiB) if args.host_memory_gb else host_available_bytes())
                m = build_model(a, None, run.device, dt, context_length=a.max_position_embeddings).eval()
                c = OffloadedFullCache(m, capacity, q.resident_layers, q.transfer_chunk)
                fill(c, ctx)
                r = {"setup": "1 GPU", "context": ctx, "resident_layers": q.resident_layers,
                     "offloaded_gib": q.offloaded_layers * ctx * a.kv_bytes_per_token(dt.itemsize) // a.n_layers / GiB,
                     "ms": step_ms(run, m, c, 1, ctx, False)}
                del m, c
            except (RuntimeError, ValueError) as e:  # e.g. not enough pinned host memory for all heads
                r = {"setup": "1 GPU", "error": str(e)[:300]}
            run.free()
            return r
        out["offload_ar_step_1gpu"] = run.solo(one_gpu)
        if run.rank == 0:
            print(json.dumps(out["offload_ar_step_1gpu"]), flush=True)
    save()


def summarize(out: dict, world: int) -> dict:
    s = {}
    tp_rows = [r for r in out.get("steps", []) if r["setup"] != "1 GPU"]
    if tp_rows:
        longest = max(tp_rows, key=lambda r: r["context"])
        s[f"tp{world}_ar_scaling"] = longest["ar_scaling"]
        s[f"tp{world}_verify_scaling"] = longest["verify_scaling"]
        s[f"tp{world}_ar_scaling_efficiency"] = longest["scaling_efficiency"]
        s[f"tp{world}_ar_over_floor"] = longest["ar_over_floor"]
        s["at_context"] = longest["context"]
    for key, name in (("offload_e2e", f"tp{world}_offload_speedup_vs_offloaded_ar"),
                      ("big_e2e", f"tp{world}_13b_e2e_speedup_vs_ar")):
        at9 = [r for r in out.get(key, []) if r["injected"].get("0") == 0.9 and "speedup_vs_ar" in r]
        if at9:
            best = max(at9, key=lambda r: r["speedup_vs_ar"])
            s[name] = best["speedup_vs_ar"]
            s[name + "_best"] = {"pipeline": best["label"].split("@")[0], "gamma": best["gamma"], "budget": best["budget"]}
    one, tp = out.get("offload_ar_step_1gpu", {}), out.get("offload_ar_step", {})
    if "ms" in one and "ms" in tp:
        s[f"tp{world}_offload_ar_scaling"] = one["ms"] / tp["ms"]  # PCIe links adding up
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", nargs="+", default=["steps", "big", "offload"], choices=["steps", "big", "offload"])
    ap.add_argument("--contexts", type=int, nargs="+", default=[65536, 122880])
    ap.add_argument("--verify", type=int, default=8, help="tokens of the verify step")
    ap.add_argument("--big-context", type=int, default=122880)
    ap.add_argument("--big-budget", type=int, default=4096)
    ap.add_argument("--big-gammas", type=int, nargs="+", default=[6, 12])
    ap.add_argument("--offload-context", type=int, default=122880)
    ap.add_argument("--gpu-memory-gb", type=float, default=24.0, help="per GPU (24: emulating RTX 4090s)")
    ap.add_argument("--host-memory-gb", type=float, default=None,
                    help="pinned host memory per rank (default: 80%% of MemAvailable split over the ranks; hosts whose "
                         "memory grows on use report too little)")
    ap.add_argument("--offload-budget", type=int, default=12288, help="retrieval budget asked of the planner (TriForce's)")
    ap.add_argument("--offload-gammas", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--offload-new-tokens", type=int, default=64)
    ap.add_argument("--offload-ar-tokens", type=int, default=4, help="an offloaded AR token costs about a second")
    ap.add_argument("--rates", type=float, nargs="+", default=[0.9], help="injected target acceptance")
    ap.add_argument("--tiny-acceptance", type=float, default=0.8, help="injected tiny-draft acceptance")
    ap.add_argument("--gamma2", type=int, default=4, help="tiny-draft tokens per retrieval verification")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--no-graphs", dest="graphs", action="store_false", help="eager steps (no CUDA graphs)")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on CPU with gloo: checks that every part runs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    run = Run(args.smoke)
    if args.smoke:
        torch.set_num_threads(1)
        args.shapes, args.dtype = TOY, torch.float32
        args.contexts, args.big_context, args.offload_context = [1024, 2048], 2048, 2048
        args.big_budget, args.offload_budget, args.gpu_memory_gb = 256, 256, 1.0
        args.new_tokens = args.offload_new_tokens = 16
        out_path = Path(args.out or Path(tempfile.gettempdir()) / "tp_smoke.json")
    else:
        args.shapes, args.dtype = {"7b": LLAMA2_7B, "13b": LLAMA2_13B, "tiny": LLAMA_68M}, torch.bfloat16
        out_path = Path(args.out or ROOT / "results/tp_h200x2.json")
    out = {"ranks": run.world, "device": torch.cuda.get_device_name() if run.cuda else "cpu",
           "backend": dist.get_backend(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "nccl": str(torch.cuda.nccl.version()) if run.cuda else None,
           "python": platform.python_version(), "smoke": args.smoke,
           "settings": {k: v for k, v in vars(args).items() if k not in ("shapes", "dtype", "out")}
           | {"dtype": str(args.dtype), "models": {k: vars(v) for k, v in args.shapes.items()},
              "retrieval_chunk": 8, "streaming": f"{SINKS} sinks + {WINDOW} recent",
              "injected_acceptance": "benchmark-only switch: accept/reject decisions drawn at the given rate"}}

    def save():
        if run.rank == 0:
            out["summary"] = summarize(out, run.world)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(out, indent=1))

    torch.manual_seed(0)
    for part in args.parts:
        t0 = time.perf_counter()
        {"steps": part_steps, "big": part_big, "offload": part_offload}[part](run, args, out, save)
        out.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
        save()
    if run.rank == 0:
        print(json.dumps(out["summary"], indent=1))
        print(f"wrote {out_path}")
    dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts the peer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
