#!/usr/bin/env python3
"""Aggregate the acceptance study (`python -m triforce.study`): CSV, figure and a README table.

Reads the JSON lines of results/acceptance[_NAME]_runs.jsonl and writes
- results/acceptance[_NAME].csv: one row per run, flat columns;
- results/acceptance[_NAME].png: per temperature, acceptance vs budget per policy (log2 x), one
  panel per prompt length, at the main gamma, averaged over documents: middle vs target (with the
  tiny draft vs the target dashed, where measured), then tiny vs middle; and mean accepted length
  vs gamma for the gamma-sweep policies at the gamma-sweep budget, where the runs hold a sweep;
and prints markdown tables (policy x budget, per pair and temperature) at the longest prompt length.
Runs of the weights axes (`study.weights`, `study.tiny_weights`) are series of their own
("retrieval/int4"), and a further table gives the tiny tier's acceptance by its weights.
Usage: python scripts/plot_acceptance.py [--name qwen | --runs PATH --csv PATH --png PATH] [--gamma 6]
Quantized-draft study (two models in one runs file: the CSV holds both, figure and tables one model):
    --runs results/acceptance_quant_runs.jsonl --csv results/acceptance_quant.csv --no-png
    --runs results/acceptance_quant_runs.jsonl --model qwen2.5-coder-1.5b --csv /dev/null --png results/acceptance_quant_qwen.png
"""
from __future__ import annotations

import argparse
import csv
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_rows(path: Path) -> list[dict]:
    """The runs in a JSON-lines file (blank lines ignored)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `python -m triforce.study` first")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no runs")
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """One row per run; columns in first-seen order over all rows."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


def mean_by(rows: list[dict], keys: tuple[str, ...], value: str) -> dict[tuple, float]:
    """Mean of `value` over the rows sharing `keys` (over documents and seeds); None values skipped."""
    acc: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r.get(value) is not None:
            acc[tuple(r[k] for k in keys)].append(r[value])
    return {k: sum(v) / len(v) for k, v in acc.items()}


def select(rows: list[dict], **match) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def series(r: dict) -> str:
    """A run's series: its policy, with the middle tier's weights when they are not the target's own."""
    w = r.get("weights") or "bf16"
    return r["policy"] if w == "bf16" else f"{r['policy']}/{w}"


def with_series(rows: list[dict]) -> list[dict]:
    """Rows of the middle-tier comparison (tiny tier at its first weights) with a `series` column."""
    first_tiny = next((r.get("tiny_weights") or "bf16" for r in rows), "bf16")
    return [{**r, "series": series(r)} for r in rows if (r.get("tiny_weights") or "bf16") == first_tiny]


def tiny_table(rows: list[dict], gamma: int, temperature: float, prompt_tokens: int) -> str | None:
    """Tiny-vs-middle acceptance by the tiny tier's weights x budget (None without a tiny_weights axis)."""
    sub = [r for r in select(rows, gamma=gamma, temperature=temperature, prompt_tokens=prompt_tokens)
           if r.get("tiny_accept_rate") is not None]
    kinds = list(dict.fromkeys(r.get("tiny_weights") or "bf16" for r in sub))
    if len(kinds) < 2:
        return None
    means = mean_by([{**r, "tw": r.get("tiny_weights") or "bf16", "s": series(r)} for r in sub],
                    ("s", "tw", "budget"), "tiny_accept_rate")
    budgets = sorted({r["budget"] for r in sub})
    lines = [f"Acceptance of the tiny tier's drafts by the middle tier, by tiny-tier weights (prompt {prompt_tokens}, "
             f"gamma {gamma}, T={temperature})", "", "| middle tier | tiny weights | " + " | ".join(f"B={b}" for b in budgets) + " |",
             "|---|---|" + "---:|" * len(budgets)]
    for s_name in dict.fromkeys(k[0] for k in means):
        for tw in kinds:
            cells = [f"{means[s_name, tw, b]:.3f}" if (s_name, tw, b) in means else "" for b in budgets]
            if any(cells):
                lines.append(f"| {s_name} | {tw} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gamma_budget(rows: list[dict]) -> int | None:
    """The budget of the gamma sweep: the one with the most distinct gammas."""
    gammas: dict[int, set] = defaultdict(set)
    for r in rows:
        gammas[r["budget"]].add(r["gamma"])
    best = max(gammas, key=lambda b: (len(gammas[b]), -b))
    return best if len(gammas[best]) > 1 else None


PAIRS = {  # column -> what it measures
    "accept_rate": "middle vs target",
    "tiny_accept_rate": "tiny vs middle",
    "tiny_target_accept_rate": "tiny vs target",
}


def markdown_table(rows: list[dict], gamma: int, temperature: float, prompt_tokens: int,
                   value: str = "accept_rate") -> str:
    """Policy x budget acceptance of one pair (`value`) at one gamma, temperature and prompt length."""
    sub = select(with_series(rows), gamma=gamma, temperature=temperature, prompt_tokens=prompt_tokens)
    means = mean_by(sub, ("series", "budget"), value)
    policies = list(dict.fromkeys(r["series"] for r in sub))
    budgets = sorted({r["budget"] for r in sub})
    docs = len({r["document"] for r in sub})
    method = sub[0].get("method", "engine") if sub else "engine"
    lines = [f"Acceptance, {PAIRS[value]} ({rows[0]['model']}, {method}, prompt {prompt_tokens} tokens, "
             f"gamma {gamma}, T={temperature}, mean over {docs} document(s))", "",
             "| policy | " + " | ".join(f"B={b}" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for p in policies:
        cells = [f"{means[p, b]:.3f}" if (p, b) in means else "" for b in budgets]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tiny_target_table(rows: list[dict], temperatures: list[float]) -> str:
    """The tiny draft vs the target (independent of policy and budget) per prompt length and temperature."""
    means = mean_by(rows, ("prompt_tokens", "temperature"), "tiny_target_accept_rate")
    lengths = sorted({n for n, _ in means})
    lines = ["Acceptance, tiny vs target (mean over documents)", "",
             "| T | " + " | ".join(f"{n}" for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for t in temperatures:
        lines.append(f"| {t} | " + " | ".join(f"{means[n, t]:.3f}" if (n, t) in means else "" for n in lengths) + " |")
    return "\n".join(lines)


def has(rows: list[dict], value: str) -> bool:
    return any(r.get(value) is not None for r in rows)


def plot(rows: list[dict], path: Path, gamma: int, temperatures: list[float]) -> None:
    """Per temperature, acceptance vs budget per policy, one panel per prompt length: middle vs
    target (the tiny draft vs the target dashed, where measured), then tiny vs middle; and mean
    accepted length vs gamma where the runs hold a gamma sweep."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the figure needs matplotlib: pip install -e '.[plot]' (or pass --no-png)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["prompt_tokens"] for r in rows})
    gb = gamma_budget(rows)
    pairs = [v for v in ("accept_rate", "tiny_accept_rate") if has(rows, v)]
    panel_rows = [(t, v) for t in temperatures for v in pairs]
    cols = len(lengths) + (gb is not None)
    fig, axes = plt.subplots(len(panel_rows), cols, figsize=(4.2 * cols, 3.6 * len(panel_rows)), squeeze=False)
    for i, (temperature, value) in enumerate(panel_rows):
        for ax, n in zip(axes[i], lengths):
            sub = select(with_series(rows), gamma=gamma, temperature=temperature, prompt_tokens=n)
            means = mean_by(sub, ("series", "budget"), value)
            for p in dict.fromkeys(r["series"] for r in sub):
                pts = sorted((b, a) for (q, b), a in means.items() if q == p)
                ax.plot([b for b, _ in pts], [a for _, a in pts], marker="o", label=p)
            tt = [r["tiny_target_accept_rate"] for r in sub if r.get("tiny_target_accept_rate") is not None]
            if value == "accept_rate" and tt:
                ax.axhline(sum(tt) / len(tt), ls="--", c="k", lw=1, label="tiny vs target")
            budgets = sorted({r["budget"] for r in sub})
            if budgets:
                ax.set_xscale("log", base=2)
                ax.set_xticks(budgets, [str(b) for b in budgets])
                ax.minorticks_off()
            ax.set(title=f"prompt {n}, T={temperature}", xlabel="budget (prefix tokens)",
                   ylabel=f"acceptance ({PAIRS[value]})", ylim=(0, 1.02))
            ax.grid(alpha=0.3)
        axes[i][0].legend(fontsize=7)
    if gb is not None:  # the prompt length whose runs hold the most gammas at that budget
        temperature = temperatures[0]
        ax = axes[0][-1]
        n = max(lengths, key=lambda m: (len({r["gamma"] for r in select(rows, budget=gb, prompt_tokens=m)}), m))
        sub = select(with_series(rows), budget=gb, temperature=temperature, prompt_tokens=n)
        means = mean_by(sub, ("series", "gamma"), "mean_accepted_length")
        gammas_per = defaultdict(set)
        for r in sub:
            gammas_per[r["series"]].add(r["gamma"])
        for p in [p for p in gammas_per if len(gammas_per[p]) > 1]:
            pts = sorted((g, m) for (q, g), m in means.items() if q == p)
            ax.plot([g for g, _ in pts], [m for _, m in pts], marker="o", label=p)
        ax.plot(sorted({r["gamma"] for r in sub}), [g + 1 for g in sorted({r["gamma"] for r in sub})],
                ls=":", c="gray", label="gamma + 1 (all accepted)")
        ax.set(title=f"budget {gb}, prompt {n}, T={temperature}", xlabel="gamma",
               ylabel="mean accepted length (tokens / target round)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        for ax in axes[1:, -1]:
            ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", default=None,
                    help="results/acceptance_NAME_runs.jsonl -> results/acceptance_NAME.csv/.png (e.g. qwen)")
    ap.add_argument("--runs", type=Path, default=None, help="default: results/acceptance_runs.jsonl")
    ap.add_argument("--csv", type=Path, default=None)
    ap.add_argument("--png", type=Path, default=None)
    ap.add_argument("--no-png", action="store_true", help="skip the figure (no matplotlib needed)")
    ap.add_argument("--gamma", type=int, default=None, help="main gamma (default: the most frequent)")
    ap.add_argument("--temperature", type=float, default=None, help="only this temperature (default: every one)")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="table's prompt length (default: longest)")
    ap.add_argument("--model", default=None, help="only the runs of this model (a runs file may hold several)")
    a = ap.parse_args(argv)
    stem = f"acceptance_{a.name}" if a.name else "acceptance"
    runs = a.runs or ROOT / f"results/{stem}_runs.jsonl"
    rows = load_rows(runs)
    if a.model:
        rows = [r for r in rows if r.get("model") == a.model]
        if not rows:
            raise SystemExit(f"error: no runs of model {a.model!r} in {runs}")
    gammas = [r["gamma"] for r in rows]
    gamma = a.gamma if a.gamma is not None else max(set(gammas), key=gammas.count)
    temperatures = [a.temperature] if a.temperature is not None else sorted({r["temperature"] for r in rows})
    n = a.prompt_tokens or max(r["prompt_tokens"] for r in rows)
    write_csv(rows, a.csv or ROOT / f"results/{stem}.csv")
    if not a.no_png:
        plot(rows, a.png or ROOT / f"results/{stem}.png", gamma, temperatures)
    tables = [markdown_table(rows, gamma, t, n, v) for v in ("accept_rate", "tiny_accept_rate") if has(rows, v)
              for t in temperatures]
    if has(rows, "tiny_target_accept_rate"):
        tables.append(tiny_target_table(rows, temperatures))
    tables += [t for t in (tiny_table(rows, gamma, temp, n) for temp in temperatures) if t]
    table = "\n\n".join(tables)
    print(table)
    return table


if __name__ == "__main__":
    main()
