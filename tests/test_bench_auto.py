"""scripts/bench_auto.py --summarize-only: a bench_real run's fixed pipelines and `auto` as scenarios."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_real_pair_scenarios(tmp_path):
    rows = [{"system": f"triforce/{p}", "pipeline": p, "context": 8192, "temperature": 0.0, "document": d, "ms_per_token": ms}
            for p, d, ms in [("autoregressive", "a", 2.0), ("autoregressive", "b", 2.0), ("draft", "a", 1.0),
                             ("draft", "b", 3.0), ("auto", "a", 4.0), ("auto", "b", 4.0)]]
    rows.append({"system": "hf/assisted", "context": 8192, "temperature": 0.0, "ms_per_token": 100.0})  # a peer: not a scenario row
    (tmp_path / "real.json").write_text(json.dumps({"settings": {"model": "pair"}, "rows": rows}))
    (tmp_path / "auto.json").write_text(json.dumps({}))
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_auto.py"), "--summarize-only", str(tmp_path / "auto.json"),
                        "--real-json", str(tmp_path / "real.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "auto.json").read_text())["summary"]
    # means over the tasks: AR 2.0, draft 2.0 (the best fixed; a tie with AR), auto 4.0 ms/token
    assert s["auto_worst_vs_ar"] == 0.5 and s["auto_worst_vs_best_fixed"] == 0.5
    assert s["scenarios"][0]["part"] == "pair (bench_real)"
    assert "this_run" not in s  # only the real pair's rows: nothing of a run of its own to tell apart


def test_the_summary_tells_this_runs_scenarios_from_the_real_pair_rows(tmp_path):
    """The real pair's rows come from another run (maybe of older code): the summary also gives the
    worst ratios over this run's own scenarios."""
    injected = [{"rate": 0.9, "config": c, "ms_per_token": ms} for c, ms in [("autoregressive", 4.0), ("draft g=4", 2.0),
                                                                              ("auto", 2.5)]]
    pair = [{"system": f"triforce/{p}", "pipeline": p, "context": 8192, "temperature": 0.0, "ms_per_token": ms}
            for p, ms in [("autoregressive", 2.0), ("draft", 1.0), ("auto", 4.0)]]
    (tmp_path / "real.json").write_text(json.dumps({"settings": {"model": "pair"}, "rows": pair}))
    (tmp_path / "auto.json").write_text(json.dumps({"injected": injected}))
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_auto.py"), "--summarize-only", str(tmp_path / "auto.json"),
                        "--real-json", str(tmp_path / "real.json")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "auto.json").read_text())["summary"]
    assert s["auto_worst_vs_best_fixed"] == 0.25 and s["auto_worst_vs_ar"] == 0.5
    assert s["this_run"] == {"auto_worst_vs_best_fixed": 0.8, "auto_worst_vs_ar": 1.6}


def test_smoke_runs_the_offloaded_scenario(tmp_path):
    """`--part 3` (offloaded target, injected acceptance) end to end on CPU shapes: every fixed row,
    auto's row, and the scenario in the summary."""
    out = tmp_path / "auto.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_auto.py"), "--smoke", "--part", "3", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert {row["config"] for row in res["offloaded"]} >= {"autoregressive", "auto", "triforce g=24/6"}
    assert res["summary"]["scenarios"][0]["part"].startswith("7B injected, offloaded")


def judged_positions(accepts: list[int], gamma: int, first: int) -> tuple[set[int], set[int]]:
    """Positions a target's rounds tested, and those it rejected, from its accept counts per round."""
    tested, rejected, s = set(), set(), first
    for a in accepts:
        tested.update(range(s, s + min(a + 1, gamma)))
        if a < gamma:
            rejected.add(s + a)
        s += a + 1
    return tested, rejected


def test_injected_target_decisions_are_fixed_per_position(models):
    """Benchmarks compare gammas and pipelines at an injected rate: the target's decision at a
    position is the same whatever gamma drafted it (common random numbers), so the best fixed
    configuration is not just the one with the luckiest draws. Per-round draws fail this."""
    import torch
    from test_batch import tiers
    from triforce.engine import SpeculativeEngine

    target, tiny = models
    prompt = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(0))
    runs = {}
    for g in (3, 7):
        ts = tiers(target, tiny, "draft", 1)
        ts[0].gamma = g
        SpeculativeEngine(ts, 1.0, 1.0, prefill_chunk=64, injected_acceptance={0: 0.6}).generate(prompt, 80, seed=5)
        runs[g] = judged_positions(ts[0].stats.accepts, g, len(prompt))
    (tested3, rejected3), (tested7, rejected7) = runs[3], runs[7]
    both = tested3 & tested7
    assert len(both) > 30 and len(rejected3 & both) > 5
    assert rejected3 & both == rejected7 & both
