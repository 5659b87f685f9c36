"""Time the attention kernels against SDPA on a CUDA GPU; write results/kernels_<gpu>.json.

(c) decode_attention: T new tokens over a contiguous KV of S tokens vs SDPA (lower-right causal bias,
    and the boolean mask `triforce.cache.attention` builds today).
(b) sparse_attention: selected chunks (budget tokens) + a tail, read in place, vs gather + SDPA (the
    selection step today) and cat + SDPA (each later step today, the chunks already gathered).
One layer call per measurement, GPU time (launches queued behind a spin); L2 is flushed before each
repeat so small budgets are not served from cache. GB/s = useful K/V bytes (each key and value read
once) / median time. host_us is the Python launch cost per call, which a decode step pays
per layer unless it runs under CUDA graphs.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=DTYPES, default="bf16")
    p.add_argument("--seq", type=int, nargs="+", default=[16384, 32768, 65536, 122880], help="(c) KV lengths")
    p.add_argument("--t", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="(c) new tokens per call")
    p.add_argument("--budgets", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="(b) selected tokens")
    p.add_argument("--sparse-t", type=int, nargs="+", default=[1, 4, 16], help="(b) new tokens per call")
    p.add_argument("--context", type=int, default=122880, help="(b) prefix the chunks are picked from")
    p.add_argument("--tail", type=int, default=128, help="(b) tail tokens after the boundary (includes T)")
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--no-flush", action="store_true", help="do not flush L2 between repeats")
    p.add_argument("--no-host-overhead", dest="host_overhead", action="store_false",
                   help="skip measuring host (Python launch) us per call")
    p.add_argument("--out", type=Path, default=Path("results"))
    return p.parse_args(argv)


def time_ms(fn, warmup: int, repeats: int, flush: torch.Tensor | None) -> float:
    """Median GPU milliseconds of fn() by CUDA events, L2 flushed (outside the timed span) before each repeat.

    A GPU spin before the start event lets the host queue the launches first, so Python launch
    overhead (reported separately by `host_us`) does not leak into the GPU time.
    """
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if flush is not None:
            flush.zero_()
        torch.cuda._sleep(1_000_000)  # ~0.5 ms of spinning
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def host_us(fn, calls: int = 50) -> float:
    """Host-side microseconds per call (launch overhead), measured while the GPU is kept busy."""
    fn()
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~0.1 s: the launches below only queue
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    dt = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return dt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU: torch.cuda.is_available() is False "
              f"(torch {torch.__version__}). Run it on the GPU machine.", file=sys.stderr)
        return 2
    try:
        import triton
    except ImportError:
        print("bench_kernels.py needs triton: pip install 'triton>=3.0' (or triforce[triton])", file=sys.stderr)
        return 2
    from triforce.kernels.decode_attention import decode_attention_reference, decode_attention_triton
    from triforce.kernels.sparse_attention import bottom_right_sdpa, sparse_attention_reference, sparse_attention_triton

    torch.manual_seed(0)
    dev, dtype = torch.device("cuda"), DTYPES[args.dtype]
    h, kvh, d, elt = args.heads, args.kv_heads, args.head_dim, DTYPES[args.dtype].itemsize
    flush = None if args.no_flush else torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    timer = lambda fn: time_ms(fn, args.warmup, args.repeats, flush)  # noqa: E731
    kv_bytes = lambda n: 2 * kvh * n * d * elt  # noqa: E731
    rows = []

    def record(kernel: str, method: str, fn, n_keys: int, **setting) -> None:
        ms = timer(fn)
        gbs = kv_bytes(n_keys) / ms / 1e6
        host = host_us(fn) if args.host_overhead else None
        rows.append(dict(kernel=kernel, method=method, ms=round(ms, 4), gb_per_s=round(gbs, 1), host_us=host and round(host, 1),
                         n_keys=n_keys, **setting))
        print(f"{kernel:7s} {str(setting):58s} {method:16s} {ms * 1e3:8.1f} us {gbs:7.1f} GB/s"
              + (f"  host {host:6.1f} us" if host else ""), flush=True)

    # (c) decode attention over a contiguous KV (views of one store, as FullCache hands them)
    s_max = max(args.seq)
    k = torch.randn(kvh, s_max, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    for s in args.seq:
        ks, vs = k[:, :s], v[:, :s]
        for t in args.t:
            q = torch.randn(h, t, d, device=dev, dtype=dtype)
            record("decode", "triton", lambda: decode_attention_triton(q, ks, vs), s, seq=s, t=t)
            record("decode", "sdpa_lower_right", lambda: decode_attention_reference(q, ks, vs), s, seq=s, t=t)
            record("decode", "sdpa_bool_mask", lambda: bottom_right_sdpa(q, ks, vs), s, seq=s, t=t)
    del k, v

    # (b) sparse attention: chunks of a `context` prefix + a tail, in place vs gathered
    c, tail = args.chunk, args.tail
    store = args.context + tail
    k = torch.randn(kvh, store, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    n_chunks = args.context // c
    for budget in args.budgets:
        n_sel = budget // c
        idx = torch.cat([torch.zeros(kvh, 1, dtype=torch.long, device=dev),
                         torch.stack([torch.randperm(n_chunks - 1, device=dev)[:n_sel - 1] + 1 for _ in range(kvh)])], 1)
        idx = idx.sort(1).values
        pos = (idx[..., None] * c + torch.arange(c, device=dev)).flatten(1)[..., None].expand(-1, -1, d)
        sel_k, sel_v = torch.gather(k, 1, pos), torch.gather(v, 1, pos)
        b, e = args.context, args.context + tail
        for t in args.sparse_t:
            q = torch.randn(h, t, d, device=dev, dtype=dtype)
            setting = dict(budget=budget, t=t, tail=tail, context=args.context)
            n_keys = budget + tail
            record("sparse", "triton", lambda: sparse_attention_triton(q, k, v, idx, c, b, e), n_keys, **setting)
            record("sparse", "gather_sdpa", lambda: sparse_attention_reference(q, k, v, idx, c, b, e), n_keys, **setting)
            record("sparse", "cat_sdpa", lambda: decode_attention_reference(
                q, torch.cat((sel_k, k[:, b:e]), 1), torch.cat((sel_v, v[:, b:e]), 1)), n_keys, **setting)

    name = torch.cuda.get_device_name()
    result = dict(gpu=name, torch=torch.__version__, triton=triton.__version__, cuda=torch.version.cuda,
                  settings={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, results=rows)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kernels_{re.sub(r'[^a-z0-9]+', '_', name.lower()).strip('_')}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
