#!/usr/bin/env python3
"""Aggregate the acceptance study (`python -m triforce.study`): CSV, figure and a README table.

Reads the JSON lines of results/acceptance_runs.jsonl and writes
- results/acceptance.csv: one row per run, flat columns;
- results/acceptance.png: acceptance vs budget per policy (log2 x), one panel per prompt length, at
  the main gamma and temperature, averaged over documents; then mean accepted length vs gamma for
  the gamma-sweep policies at the gamma-sweep budget (the prompt length that has the sweep);
and prints a markdown table (policy x budget, acceptance) at the longest prompt length. Runs of the
weights axes (`study.weights`, `study.tiny_weights`) are series of their own ("retrieval/int4"), and
a second table gives the tiny tier's acceptance by its weights.
Usage: python scripts/plot_acceptance.py [--runs PATH] [--csv PATH] [--png PATH] [--gamma 6] [--temperature 0]
Quantized-draft study: --runs results/acceptance_quant_runs.jsonl --csv results/acceptance_quant.csv
    --png results/acceptance_quant.png
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


def markdown_table(rows: list[dict], gamma: int, temperature: float, prompt_tokens: int) -> str:
    """Policy x budget acceptance (middle vs target) at one gamma, temperature and prompt length."""
    sub = select(with_series(rows), gamma=gamma, temperature=temperature, prompt_tokens=prompt_tokens)
    means = mean_by(sub, ("series", "budget"), "accept_rate")
    policies = list(dict.fromkeys(r["series"] for r in sub))
    budgets = sorted({r["budget"] for r in sub})
    docs = len({r["document"] for r in sub})
    lines = [f"Acceptance of the middle tier's drafts by the target ({rows[0]['model']}, "
             f"prompt {prompt_tokens} tokens, gamma {gamma}, T={temperature}, mean over {docs} document(s))", "",
             "| policy | " + " | ".join(f"B={b}" for b in budgets) + " |",
             "|---|" + "---:|" * len(budgets)]
    for p in policies:
        cells = [f"{means[p, b]:.3f}" if (p, b) in means else "" for b in budgets]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, gamma: int, temperature: float) -> None:
    """Acceptance vs budget (one panel per prompt length) + mean accepted length vs gamma."""
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the figure needs matplotlib: pip install -e '.[plot]' (or pass --no-png)") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted({r["prompt_tokens"] for r in rows})
    gb = gamma_budget(rows)
    fig, axes = plt.subplots(1, len(lengths) + 1, figsize=(4.2 * (len(lengths) + 1), 3.8), squeeze=False)
    for ax, n in zip(axes[0], lengths):
        sub = select(with_series(rows), gamma=gamma, temperature=temperature, prompt_tokens=n)
        means = mean_by(sub, ("series", "budget"), "accept_rate")
        for p in dict.fromkeys(r["series"] for r in sub):
            pts = sorted((b, a) for (q, b), a in means.items() if q == p)
            ax.plot([b for b, _ in pts], [a for _, a in pts], marker="o", label=p)
        ax.set_xscale("log", base=2)
        budgets = sorted({r["budget"] for r in sub})
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set(title=f"prompt {n}, gamma {gamma}, T={temperature}", xlabel="budget (prefix tokens)",
               ylabel="acceptance (middle vs target)", ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    ax = axes[0][-1]
    if gb is not None:  # the prompt length whose runs hold the most gammas at that budget
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
        ax.set(title=f"budget {gb}, prompt {n}, T={temperature}")
        ax.legend(fontsize=7)
    else:
        ax.set(title="no gamma sweep in the runs")
    ax.set(xlabel="gamma", ylabel="mean accepted length (tokens / target round)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=ROOT / "results/acceptance_runs.jsonl")
    ap.add_argument("--csv", type=Path, default=ROOT / "results/acceptance.csv")
    ap.add_argument("--png", type=Path, default=ROOT / "results/acceptance.png")
    ap.add_argument("--no-png", action="store_true", help="skip the figure (no matplotlib needed)")
    ap.add_argument("--gamma", type=int, default=None, help="main gamma (default: the most frequent)")
    ap.add_argument("--temperature", type=float, default=None, help="default: the lowest")
    ap.add_argument("--prompt-tokens", type=int, default=None, help="table's prompt length (default: longest)")
    a = ap.parse_args(argv)
    rows = load_rows(a.runs)
    gammas = [r["gamma"] for r in rows]
    gamma = a.gamma if a.gamma is not None else max(set(gammas), key=gammas.count)
    temperature = a.temperature if a.temperature is not None else min(r["temperature"] for r in rows)
    n = a.prompt_tokens or max(r["prompt_tokens"] for r in rows)
    write_csv(rows, a.csv)
    if not a.no_png:
        plot(rows, a.png, gamma, temperature)
    table = markdown_table(rows, gamma, temperature, n)
    tiny = tiny_table(rows, gamma, temperature, n)
    if tiny:
        table += "\n\n" + tiny
    print(table)
    return table


if __name__ == "__main__":
    main()
