"""Prefill time by `prefill_chunk` on one GPU: what `prefill_chunk=auto` is chosen from.

Qwen2.5-Coder 1.5B and 0.5B shapes (random bf16 weights, the model's own forward over a FullCache,
as the engine prefills): prompts of 4096, 4100 (a 4-token last chunk) and 16384 tokens in chunks of
512-4096, each run twice in a row (the first of a new shape pays compiles; the second is the warm
time). Writes results/prefill_chunk_<gpu>.json with a `summary` of the warm 512-over-4096 ratios.

    python scripts/bench_prefill_chunk.py [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from bench_speed import QWEN05, QWEN15, gpu_tag
from triforce.cache import FullCache
from triforce.models.llama import build_model

ROOT = Path(__file__).resolve().parents[1]
CHUNKS = (512, 1024, 2048, 4096)
LENGTHS = (4096, 4100, 16384)


def prefill_seconds(model, cache: FullCache, ids: torch.Tensor, n: int, chunk: int) -> float:
    cache.reset()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, n, chunk):
            model(ids[:, s:min(n, s + chunk)], cache, last=0)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_prefill_chunk.py measures GPU prefill; there is no GPU here")
    dev, name = torch.device("cuda"), torch.cuda.get_device_name()
    rows = []
    for label, shape in (("qwen2.5-coder-1.5b", QWEN15), ("qwen2.5-coder-0.5b", QWEN05)):
        model = build_model(shape, None, dev, torch.bfloat16, context_length=20000).eval()
        cache = FullCache(model, max(LENGTHS) + 616)
        ids = torch.randint(0, shape.vocab_size, (1, max(LENGTHS)), device=dev)
        for chunk in CHUNKS:
            for n in LENGTHS:
                runs = [prefill_seconds(model, cache, ids, n, chunk) for _ in range(2)]
                rows.append({"model": label, "prefill_chunk": chunk, "tokens": n, "first_s": runs[0], "warm_s": runs[1]})
                print(json.dumps(rows[-1]), flush=True)
        del model, cache
        torch.cuda.empty_cache()
    warm = {(r["model"], r["prefill_chunk"], r["tokens"]): r["warm_s"] for r in rows}
    summary = {f"{m}_{n // 1024}k_chunk512_over_chunk4096": warm[m, 512, n] / warm[m, 4096, n]
               for m in ("qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b") for n in (4096, 16384)}
    out = {"device": name, "torch": torch.__version__, "python": platform.python_version(),
           "settings": {"dtype": "bfloat16", "weights": "random", "chunks": CHUNKS, "lengths": LENGTHS,
                        "timing": "wall time of the chunked forwards (synchronised), first and second run of each"},
           "rows": rows, "summary": summary}
    path = Path(args.out or ROOT / f"results/prefill_chunk_{gpu_tag(name)}.json")
    path.write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
