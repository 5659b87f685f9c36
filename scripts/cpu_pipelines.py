"""CPU study on the embedded SmolLM2: the three pipelines on real prose at two prompt lengths.

Writes results/cpu_pipelines_smollm2.json: tokens/s per pipeline, per-tier acceptance and
mean accepted length, with the greedy runs checked token-for-token against autoregressive.
Usage: python scripts/cpu_pipelines.py [--lengths 1024 4096] [--new 64]
"""
import argparse
import json
import platform
from pathlib import Path

import torch

import triforce

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--text", default=str(ROOT / "data/corpus/botchan.txt"))
    ap.add_argument("--out", default=str(ROOT / "results/cpu_pipelines_smollm2.json"))
    a = ap.parse_args()
    text = Path(a.text).read_text()
    gens = {p: triforce.load(f"pipeline={p}", "chat=false", f"cache.budget={a.budget}", "gamma=6", "draft.gamma=4")
            for p in ("autoregressive", "retrieval", "triforce")}
    ids_all = gens["autoregressive"].encode(text, chat=False)
    rows = []
    for n in a.lengths:
        ids = ids_all[20000:20000 + n]
        for temp in (0.0, 0.6):
            ref = None
            for pipe, gen in gens.items():
                r = gen.generate(ids, max_new_tokens=a.new, temperature=temp, top_p=0.9, seed=0)
                s = r.stats
                row = {"prompt_tokens": n, "temperature": temp, "pipeline": pipe,
                       "tokens_per_second": s["tokens_per_second"], "generated": s["generated_tokens"],
                       "tiers": {k: {m: v[m] for m in ("acceptance_rate", "mean_accepted_length", "ms_per_generated_token")}
                                 for k, v in s["tiers"].items()}}
                if temp == 0:
                    ref = r.token_ids if pipe == "autoregressive" else ref
                    row["greedy_equal_to_autoregressive"] = r.token_ids == ref
                rows.append(row)
                print(json.dumps(row), flush=True)
    meta = {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, float32)",
            "text": Path(a.text).name, "budget": a.budget, "chunk_size": 8, "gamma": 6, "draft_gamma": 4,
            "draft": "target weights, StreamingLLM 16 sinks + 496 recent", "max_new_tokens": a.new, "top_p": 0.9}
    Path(a.out).write_text(json.dumps({"settings": meta, "runs": rows}, indent=1))


if __name__ == "__main__":
    main()
