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
