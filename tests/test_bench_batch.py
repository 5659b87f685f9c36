"""scripts/bench_batch.py --smoke: every part of the batch benchmark runs on the CPU at toy sizes and
its summary has the keys the results file promises (numbers mean nothing here)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_batch_smoke(tmp_path):
    out = tmp_path / "batch.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_batch.py"), "--smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    pipelines = {row["pipeline"] for row in res["shapes"][0]["e2e"]}
    assert pipelines == {"autoregressive", "draft", "retrieval", "triforce"}
    assert {row["batch"] for row in res["shapes"][0]["e2e"]} == {1, 3}
    assert set(res["summary"]["speedup_by_batch_q15_8k"]["0.9"]) == {"1", "3"}
    cont = res["continuous"]
    assert {(r["pipeline"], r["batch"]) for r in cont} == {("autoregressive", 3), ("draft", 3)}
    for r in cont:  # both ways serve every job its tokens
        assert r["jobs"] == 12 and r["static"]["tokens"] == r["continuous"]["tokens"] == r["tokens_asked"]
    assert {"continuous_over_static_autoregressive", "continuous_over_static_draft"} <= set(res["summary"])


def test_bench_batch_needs_a_gpu_without_smoke():
    import torch
    if torch.cuda.is_available():
        return
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_batch.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("error: ")


@pytest.mark.skipif(not (ROOT / "data/code/_sdist").is_dir(), reason="run `python scripts/fetch_code_corpus.py` first")
def test_bench_batch_real_smoke(tmp_path):
    """--real on the CPU: the embedded SmolLM2 over real code prompts, a different task per row, every
    pipeline at B=1 and 3, real acceptance in the summary; --merge carries the real part into one file."""
    out = tmp_path / "real.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_batch.py"), "--smoke", "--real", "--out", str(out)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    rows = res["real"]["rows"]
    assert {(row["pipeline"], row["batch"]) for row in rows} == {(p, b) for p in ("autoregressive", "draft", "retrieval")
                                                                  for b in (1, 3)}
    for row in rows:
        assert row["tokens"] == 6 * row["batch"] and len(set(row["documents"])) == row["batch"]
    sp = res["summary"]["real_speedup_by_batch"]["600"]
    assert set(sp) == {"draft", "retrieval"} and set(sp["draft"]) == {"1", "3"}
    assert 0 <= res["summary"]["real_acceptance_by_batch"]["600"]["draft"]["3"] <= 1
    merged = tmp_path / "merged.json"
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_batch.py"), "--merge", str(ROOT / "results/batch_h200.json"),
                        str(out), "--out", str(merged)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads(merged.read_text())
    assert m["real"]["rows"] == rows and "speedup_by_batch_q15_32k" in m["summary"] and "real_speedup_by_batch" in m["summary"]
