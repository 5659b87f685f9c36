"""The CLI: `python -m triforce.generate [+model=NAME] key=value ...` (Hydra).

Thin plumbing around the API in triforce/generator.py: the prompt (`prompt`, `prompt_file`,
`document` + `question`, or many in `prompts_file`), progress bars, the summary line on stderr,
`output_json` / `output_jsonl`, and one line `error: ...` with exit status 2 for bad input.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from triforce.generator import Generator, normalize_rows, rows_summary
# compatibility re-export for one release: import these from triforce.generator
from triforce.generator import PIPELINES, ByteTokenizer, GenerationResult, default_model_config, load, model_file  # noqa: F401


def summary_line(stats: dict) -> str:
    """One line: throughput, the auto choice, per-tier ms/token, acceptance, mean accepted length (and GB/s on GPU)."""
    parts = [f"{stats['generated_tokens']} tokens, {stats['tokens_per_second'] or 0:.2f} tok/s "
             f"(prefill {stats['prefill_seconds']:.1f}s)"]
    a = stats.get("auto")
    if a:  # what the chooser ran and why; speed vs autoregressive measured in this run or from the cost model
        s = f"auto: {a['choice']}" + (f" (+{a['switches']} switches)" if a["switches"] else "") + f" [{a['why']}]"
        if a["speedup_vs_autoregressive"]:
            s += f", {a['speedup_vs_autoregressive']:.2f}x autoregressive ({a['autoregressive_source']})"
        if a["measure_seconds"]:
            s += f", step costs measured in {a['measure_seconds']:.1f}s"
        parts.append(s)
    for name, t in stats["tiers"].items():
        s = f"{name}: {t['ms_per_generated_token'] or 0:.1f} ms/tok"
        if t["acceptance_rate"] is not None:
            s += f", accept {t['acceptance_rate']:.2f}, mean len {t['mean_accepted_length']:.2f}"
        parts.append(s)
    if stats.get("bandwidth_gb_s"):
        parts.append(f"~{stats['bandwidth_gb_s']:.0f} GB/s" + (" per GPU" if stats.get("tp", 1) > 1 else ""))
    if stats.get("tp", 1) > 1:
        parts.append(f"tp={stats['tp']}")
    return " | ".join(parts)


def read_prompt(cfg: DictConfig) -> str:
    """The prompt: `prompt`, a file (`prompt_file`), or a question over a document (`document` +
    `question`: the first `document_chars` characters of the file, then the question), which makes a
    long-context prompt of a real text (e.g. data/corpus/*.txt from scripts/fetch_corpus.py)."""
    if cfg.get("document"):
        if cfg.prompt_file:
            raise ValueError("set either prompt_file or document (+ question), not both")
        if not cfg.get("question"):
            raise ValueError("document= needs question=\"...\" (what to ask about the document)")
        path = Path(cfg.document).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"document {path} does not exist (python scripts/fetch_corpus.py fetches data/corpus/*.txt)")
        chars = cfg.get("document_chars")
        if chars is not None and (isinstance(chars, bool) or not isinstance(chars, int) or chars < 1):
            raise ValueError(f"document_chars must be a positive integer or null (the whole file), got {chars!r}")
        text = path.read_text()[:chars].strip()
        return f"{text}\n\nQuestion about the text above: {cfg.question}"
    if cfg.prompt_file:
        path = Path(cfg.prompt_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"prompt_file {path} does not exist")
        return path.read_text()
    return cfg.prompt or ""


def read_prompts_file(path: str) -> list[dict]:
    """`prompts_file`: JSON lines, each a prompt text or an object with `prompt` and optional per-row
    `max_new_tokens`, `temperature`, `top_p`, `seed`. Checked before any model loads."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"prompts_file {p} does not exist")
    rows = []
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"prompts_file {p} line {n}: not JSON ({e.msg}); each line is a JSON string or "
                             f'an object like {{"prompt": "...", "max_new_tokens": 64}}') from None
    if not rows:
        raise ValueError(f"prompts_file {p} holds no prompts")
    return normalize_rows(rows)


# what a user can fix: bad settings, missing files, a GPU that is absent or too small
USER_ERRORS = (ValueError, FileNotFoundError, RuntimeError)


@hydra.main(config_path="pkg://triforce.conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """The CLI: one line `error: ...` and exit status 2 for bad input (HYDRA_FULL_ERROR=1 keeps the traceback)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        run(cfg)
    except USER_ERRORS as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(cfg: DictConfig) -> None:
    if cfg.get("prompts_file"):
        return run_rows(cfg)
    prompt = read_prompt(cfg)
    if not prompt:
        raise ValueError("the prompt is empty: give some text (prompt=... or prompt_file=...)")
    gen = Generator(cfg, progress=True)
    result = gen.generate(prompt, stream=cfg.stream, progress=True)
    if gen.rank == 0:  # under tp every rank holds the same result; one prints and writes it
        print(summary_line(result.stats), file=sys.stderr)
        if cfg.output_json:
            path = Path(cfg.output_json).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"token_ids": result.token_ids, "text": result.text, "stats": result.stats,
                                        "config": OmegaConf.to_container(gen.cfg)}, indent=1))
    if gen.group is not None:
        torch.distributed.barrier()  # rank 0 may still be writing: no rank tears the group down under another
        torch.distributed.destroy_process_group()


def run_rows(cfg: DictConfig) -> None:
    """`prompts_file=PATH.jsonl`: one result line per prompt in `output_jsonl` (default PATH.results.jsonl)."""
    if cfg.prompt_file or cfg.get("document"):
        raise ValueError("set prompts_file or prompt_file / document, not both")
    rows = read_prompts_file(cfg.prompts_file)
    out = Path(cfg.get("output_jsonl") or Path(cfg.prompts_file).expanduser().with_suffix(".results.jsonl")).expanduser()
    gen = Generator(cfg, progress=True)
    t0 = time.perf_counter()
    results = gen.generate_rows(rows, progress=True)
    summary = rows_summary(results, time.perf_counter() - t0)
    if gen.rank == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w") as f:
            for i, r in enumerate(results):
                f.write(json.dumps({"index": i, "text": r.text, "token_ids": r.token_ids, "stats": r.stats}) + "\n")
        acc = ", ".join([f"auto: {c} ({n} rows)" for c, n in summary["auto_choices"].items()]
                        + [f"{k} accept {v:.2f}" for k, v in summary["mean_acceptance"].items()])
        print(f"{summary['prompts']} prompts, {summary['generated_tokens']} tokens, {summary['tokens_per_second'] or 0:.2f} "
              f"tok/s overall, {summary['mean_ms_per_token'] or 0:.1f} ms/token decode" + (f" | {acc}" if acc else "")
              + f" -> {out}", file=sys.stderr)
    if gen.group is not None:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
