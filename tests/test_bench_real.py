"""scripts/bench_real.py --smoke on tiny-random (CPU), then --replay of the accept counts it recorded."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (ROOT / "data/code/_sdist").is_dir(), reason="run `python scripts/fetch_code_corpus.py` first")
def test_bench_real_smoke_and_replay(tmp_path):
    out = tmp_path / "real.json"
    cmd = [sys.executable, str(ROOT / "scripts/bench_real.py"), "--smoke", "--temperatures", "0", "0.6",
           "--overrides", "+model=tiny-random", "device=cpu", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = res["rows"]
    assert {x["pipeline"] for x in rows} == {"autoregressive", "retrieval", "draft", "triforce", "auto"}
    assert all(x["tokens"] == 8 and x["context"] == 256 and x["ms_per_token"] > 0 for x in rows)
    draft = next(x for x in rows if x["pipeline"] == "draft")
    assert set(draft["tiers"]) == {"target", "tiny"}  # [target, tiny draft]: no middle tier
    tri = next(x for x in rows if x["pipeline"] == "triforce")
    assert set(tri["accepts"]) == {"target", "retrieval"}
    # the accepted counts per round add up to the acceptance the stats report
    for x in [r for r in rows if r["pipeline"] != "auto"]:  # auto's gammas vary by round
        for tier, counts in x["accepts"].items():
            assert sum(counts) / (len(counts) * 6 if tier == "target" else len(counts) * 4) == \
                pytest.approx(x["tiers"][tier]["acceptance_rate"])
    s = res["summary"]
    assert set(s["greedy_equal_to_autoregressive"]) == {"retrieval", "draft", "triforce", "auto"}
    assert all(s["greedy_equal_to_autoregressive"].values())  # float32 on CPU: exact
    assert set(s["real_best_speedup_vs_ar_32k"]) == {"0.0", "0.6"}
    assert (tmp_path / "real.raw.jsonl").read_text().count("\n") == len(rows)

    rep = tmp_path / "replay.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_real.py"), "--smoke", "--replay", str(out),
                        "--out", str(rep)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    replayed = json.loads(rep.read_text())["rows"]
    fixed = [r for r in rows if r["pipeline"] != "auto"]  # auto's choices are not replayed
    assert len(replayed) == len(fixed) and all(x["replayed"] for x in replayed)
    for a, b in zip(fixed, replayed):  # the replay reproduces every round: the same acceptance per tier
        assert a["pipeline"] == b["pipeline"] and b["tokens"] == 8
        for tier in a["accepts"]:
            assert b["tiers"][tier]["acceptance_rate"] == pytest.approx(a["tiers"][tier]["acceptance_rate"])


def _run(ctx, ms_ar, ms_draft, hf=()):
    """A bench_real.py result with AR and draft rows at one context, T=0, and optional HF rows."""
    def row(pipe, ms, doc):
        return {"system": f"triforce/{pipe}", "pipeline": pipe, "context": ctx, "document": doc, "temperature": 0.0,
                "tokens": 8, "ms_per_token": ms, "mean_accepted_length": 1.0 if pipe == "autoregressive" else 3.0,
                "tiers": {"target": {"acceptance_rate": None if pipe == "autoregressive" else 0.5}}}
    rows = [row(p, ms, d) for d in ("a/0", "b/0") for p, ms in (("autoregressive", ms_ar), ("draft", ms_draft))]
    rows += [{"system": "hf/assisted", "context": ctx, "document": "a/0", "temperature": 0.0, "ms_per_token": m}
             for m in hf]
    settings = {"overrides": ["+model=x"], "model": "x", "new_tokens": 8, "budget": 64, "docs": 2, "contexts": [ctx],
                "hf_contexts": [ctx] if hf else [], "documents": ["a/0", "b/0"], "temperatures": [0.0],
                "pipelines": ["autoregressive", "draft"]}
    return {"device": "cpu", "settings": settings, "wall_seconds": 1.0, "rows": rows}


def test_bench_real_merge(tmp_path):
    """--merge joins runs made one context at a time; the summary is the one a single run would have."""
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "m.json"
    a.write_text(json.dumps(_run(8192, 2.0, 1.0, hf=[20.0])))
    b.write_text(json.dumps(_run(4096, 1.5, 3.0)))
    a.with_suffix(".raw.jsonl").write_text('{"r": 1}\n')
    b.with_suffix(".raw.jsonl").write_text('{"r": 2}\n')
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_real.py"), "--merge", str(a), str(b),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["rows"]) == 9 and res["settings"]["contexts"] == [4096, 8192]
    assert res["settings"]["hf_contexts"] == [8192] and res["wall_seconds"] == 2.0
    s = res["summary"]  # the longest context is the headline; every context is under by_context
    assert s["context"] == 8192 and s["real_best_pipeline_32k"] == {"0.0": "draft"}
    assert s["real_best_speedup_vs_ar_32k"]["0.0"] == pytest.approx(2.0)
    assert s["real_speedup_vs_hf_assisted_32k"]["0.0"] == pytest.approx(20.0)
    assert s["per_tier_acceptance"]["draft"]["0.0"] == {"target": 0.5}
    assert s["by_context"]["4096/0.0"]["speedup_vs_ar"] == {"draft": pytest.approx(0.5)}
    assert s["by_context"]["8192/0.0"]["best_speedup_vs_ar"] == pytest.approx(2.0)
    assert out.with_suffix(".raw.jsonl").read_text() == '{"r": 1}\n{"r": 2}\n'
    # the same rows twice, or another model's run, is refused
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_real.py"), "--merge", str(a), str(a),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "more than one run" in r.stderr
    other = _run(4096, 1.5, 3.0)
    other["settings"]["model"] = "y"
    b.write_text(json.dumps(other))
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_real.py"), "--merge", str(a), str(b),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not one sweep" in r.stderr
