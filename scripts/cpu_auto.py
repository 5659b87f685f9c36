"""CPU check of adaptive speculation on the embedded SmolLM2: `pipeline=auto` (with auto gammas and
budget, the defaults) against `pipeline=autoregressive` on the README's main command and on a
~3K-token question over a corpus document, in one process, runs interleaved (AR, auto, AR, auto,
...) so a shared machine's load drifts over both alike. The step-cost table starts empty (a
temporary TRIFORCE_CACHE), so the first auto run reports the first-use measurement time.

    python scripts/cpu_auto.py [--repeats 3] [--new 128] [--doc-new 64]
Generation ignores EOS, so every run decodes as many tokens. Writes results/cpu_auto_smollm2.json
with per-run rows and a `summary` (median tok/s, auto / AR, and the per-repeat paired ratios).
"""
import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "Who is the White Rabbit, and what does Alice do when she first sees him?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=128, help="new tokens on the main command (its default)")
    ap.add_argument("--doc-new", type=int, default=64, help="new tokens on the document question")
    ap.add_argument("--document", default=str(ROOT / "data/corpus/alice_in_wonderland.txt"))
    ap.add_argument("--out", default=str(ROOT / "results/cpu_auto_smollm2.json"))
    a = ap.parse_args()
    table = Path(tempfile.mkdtemp()) / "step_costs.json"
    import triforce
    from triforce import auto
    from triforce.generate import read_prompt

    gens = {p: triforce.load(f"pipeline={p}", "stream=false") for p in ("autoregressive", "auto")}
    for gen in gens.values():  # every run decodes as many tokens: an answer ending at EOS after ~20 tokens times noise
        gen.stop_ids = set()
    doc_cfg = gens["auto"].cfg.copy()
    doc_cfg.document, doc_cfg.question = a.document, QUESTION
    prompts = {"main": (gens["auto"].cfg.prompt, a.new), "document": (read_prompt(doc_cfg), a.doc_new)}
    make = auto.make_chooser
    auto.make_chooser = lambda *args, **kw: make(*args, **kw, costs=auto.CostModel(table))  # the fresh table
    rows = []
    for name, (text, new) in prompts.items():
        for i in range(a.repeats):
            for p, gen in gens.items():
                s = gen.generate(text, max_new_tokens=new, seed=i).stats
                row = {"prompt": name, "prompt_tokens": s["prompt_tokens"], "pipeline": p, "repeat": i,
                       "tokens": s["generated_tokens"], "tokens_per_second": s["tokens_per_second"],
                       "prefill_seconds": s["prefill_seconds"]}
                if "auto" in s:
                    row["auto"] = {k: s["auto"][k] for k in ("choice", "why", "sequence", "budget", "measure_seconds",
                                                             "catch_up_seconds", "acceptance", "step_costs_ms",
                                                             "predicted_tokens_per_second")}
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "auto"}
                                 | ({"choice": row["auto"]["choice"], "measure_s": row["auto"]["measure_seconds"]}
                                    if "auto" in row else {})), flush=True)
    summary = {}
    for name in prompts:
        med = {p: statistics.median(r["tokens_per_second"] for r in rows if r["prompt"] == name and r["pipeline"] == p)
               for p in gens}
        first = next(r for r in rows if r["prompt"] == name and r["pipeline"] == "auto")
        paired = [b["tokens_per_second"] / a_["tokens_per_second"] for a_, b in
                  zip(*[[r for r in rows if r["prompt"] == name and r["pipeline"] == p] for p in gens])]
        summary[name] = {"prompt_tokens": first["prompt_tokens"], "ar_tokens_per_second": med["autoregressive"],
                         "auto_tokens_per_second": med["auto"], "auto_over_ar": med["auto"] / med["autoregressive"],
                         "paired_auto_over_ar": paired, "median_paired_auto_over_ar": statistics.median(paired),
                         "auto_choice": first["auto"]["choice"], "why": first["auto"]["why"],
                         "first_use_measure_seconds": first["auto"]["measure_seconds"]}
    out = {"settings": {"device": "cpu", "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                        "load_average_at_end": os.getloadavg(), "torch": torch.__version__, "repeats": a.repeats,
                        "model": "SmolLM2-135M-Instruct (embedded), float32, T=0.6 top_p=0.9",
                        "document": Path(a.document).name, "question": QUESTION},
           "runs": rows, "summary": summary}
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
