"""GEMV block sweep on one GPU: where `kernels/gemv.py`'s configs come from.

Each GEMV runs in a chain over L distinct weights of one projection (as a decode step streams a
model's layers) captured in one CUDA graph, so launch gaps and L2 reuse are what a real step sees.

Part qwen: the Qwen2.5 0.5B / 1.5B projections (fused q/k/v, o, gate/up, down) at 1-64 rows:
cuBLAS against every Triton config of a small grid, with dependent launch off and on.
Part 7b: the Llama-2-7B projections at 1-16 rows: cuBLAS, the previous fixed configs, and `gemv()`
as shipped; and the fused add + RMSNorm + projection kernel at several rows against the unfused pair.

    python scripts/sweep_gemv.py [--part qwen 7b] [--out results/gemv_sweep_<gpu>.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DT = torch.bfloat16


def graph_ms(fn, reps: int = 20) -> float:
    """Median ms of one replay of fn() captured in a CUDA graph (after two eager warm-up calls)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def launch(x, w, block_m, block_n, block_k, warps, pdl, dot):
    import triton

    from triforce.kernels.gemv import _gemv_kernel

    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(n, block_n),)](x, w, w, w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT=dot, PDL=pdl,
                                             launch_pdl=pdl, num_stages=3, num_warps=warps)
    return y


def candidates(m: int) -> list[tuple]:
    from triforce.kernels._common import next_pow2

    if m == 1:
        return [(1, bn, bk, w, pdl, False) for bn in (2, 4, 8, 16) for bk in (512, 1024, 2048) for w in (4, 8)
                for pdl in (False, True)]
    bm = max(16, next_pow2(m))
    return [(bm, bn, bk, w, pdl, True) for bn in (16, 32, 64) for bk in (128, 256, 512) for w in (4, 8)
            for pdl in (False, True) if bm * bk <= 32768 and bn * bk <= 32768]


def part_qwen(bw: float) -> list[dict]:
    shapes = {"q05": dict(layers=24, dim=896, qkv=1152, inter=4864), "q15": dict(layers=28, dim=1536, qkv=2048, inter=8960)}
    rows = []
    for name, s in shapes.items():
        layers, dim = s["layers"], s["dim"]
        for proj, (n, k) in {"qkv": (s["qkv"], dim), "o": (dim, dim), "gu": (2 * s["inter"], dim),
                             "down": (dim, s["inter"])}.items():
            ws = [torch.randn(n, k, device="cuda", dtype=DT) * 0.02 for _ in range(layers)]
            for m in (1, 2, 5, 8, 16, 32, 64):
                x = torch.randn(m, k, device="cuda", dtype=DT)
                ref = F.linear(x, ws[0]).float()
                row = {"model": name, "proj": proj, "n": n, "k": k, "m": m, "floor_us": n * k * 2 / bw * 1e6,
                       "cublas_us": graph_ms(lambda: [F.linear(x, w) for w in ws]) / layers * 1e3, "configs_us": {}}
                for c in candidates(m):
                    try:
                        if not torch.allclose(launch(x, ws[0], *c).float(), ref, atol=2e-2, rtol=2e-2):
                            row["configs_us"][str(c)] = "mismatch"
                            continue
                        row["configs_us"][str(c)] = graph_ms(lambda: [launch(x, w, *c) for w in ws]) / layers * 1e3
                    except Exception as e:  # a config over the shared-memory limit
                        row["configs_us"][str(c)] = f"error {type(e).__name__}: {str(e)[:80]}"
                timed = {c: v for c, v in row["configs_us"].items() if isinstance(v, float)}
                if timed:
                    row["best"] = min(timed, key=timed.get)
                    row["best_us"] = timed[row["best"]]
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "configs_us"}), flush=True)
            del ws
    return rows


def part_7b(bw: float) -> list[dict]:
    from triforce.kernels import fused_gemv
    from triforce.kernels.gemv import gemv
    from triforce.models.llama import add_rms_norm

    rows = []
    layers = 16
    for proj, (n, k) in {"qkv": (12288, 4096), "o": (4096, 4096), "gu": (22016, 4096), "down": (4096, 11008)}.items():
        ws = [torch.randn(n, k, device="cuda", dtype=DT) * 0.02 for _ in range(layers)]
        for m in (1, 5, 8, 16):
            x = torch.randn(m, k, device="cuda", dtype=DT)
            previous = (16, 8, 1024, 8, False, False) if m == 1 else (16, 32, 512, 4, False, True)  # the H100 configs
            r = {"model": "7b", "proj": proj, "m": m, "floor_us": n * k * 2 / bw * 1e6,
                 "cublas_us": graph_ms(lambda: [F.linear(x, w) for w in ws]) / layers * 1e3,
                 "previous_us": graph_ms(lambda: [launch(x, w, *previous) for w in ws]) / layers * 1e3,
                 "gemv_us": graph_ms(lambda: [gemv(x, w) for w in ws]) / layers * 1e3}
            rows.append(r)
            print(json.dumps(r), flush=True)
        del ws
    for name, dim, qkv, gu in (("q05", 896, 1152, 9728), ("q15", 1536, 2048, 17920)):
        g = torch.ones(dim, device="cuda", dtype=DT)
        for proj, n in (("qkv", qkv), ("gu", gu)):
            ws = [torch.randn(n, dim, device="cuda", dtype=DT) * 0.02 for _ in range(24)]
            bias = torch.randn(n, device="cuda", dtype=DT) if proj == "qkv" else None
            for m in (5, 16):
                x, d = torch.randn(m, dim, device="cuda", dtype=DT), torch.randn(m, dim, device="cuda", dtype=DT)
                r = {"model": name, "proj": "add_norm+" + proj, "m": m,
                     "unfused_us": graph_ms(lambda: [gemv(add_rms_norm(x, d, g, 1e-6)[1], w, bias) for w in ws]) / 24 * 1e3,
                     "fused_us": graph_ms(lambda: [fused_gemv.add_norm_gemv_triton(x, d, g, 1e-6, w, bias)
                                                   for w in ws]) / 24 * 1e3}
                rows.append(r)
                print(json.dumps(r), flush=True)
            del ws
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", nargs="+", default=["qwen", "7b"], choices=["qwen", "7b"])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("error: sweep_gemv.py times GPU kernels; run it on a machine with a CUDA GPU")
    import triton

    from bench_speed import copy_bandwidth, gpu_tag

    bw = copy_bandwidth()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "dtype": "bfloat16", "bandwidth_gb_s": bw}
    with torch.inference_mode():
        if "qwen" in args.part:
            out["qwen"] = part_qwen(bw * 1e9)
        if "7b" in args.part:
            out["7b"] = part_7b(bw * 1e9)
    path = args.out or ROOT / f"results/gemv_sweep_{gpu_tag(out['gpu'])}.json"
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
