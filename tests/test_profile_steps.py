"""scripts/profile_steps.py: its kernel accounting on synthetic spans, and a CPU dry run (--smoke)."""
import json
import subprocess
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


ACCOUNTING = """
import profile_steps as prof
# 2 steps of a 3-layer model: per step 3 x (gemv, norm) + 1 gemv (head) + 1 fill; gemv and norm overlap by 1 us
spans, t = [], 0.0
for _ in range(2):
    for _ in range(3):
        spans += [("gemv", t, t + 4), ("norm", t + 3, t + 5)]
        t += 6
    spans += [("gemv", t, t + 10), ("fill", t + 10, t + 11)]
    t += 20
assert prof.merged_us([("a", 0, 4), ("b", 3, 5), ("c", 1, 2), ("d", 7, 8)]) == 6
acc = prof.account(spans, steps=2, n_layers=3)
assert (acc["kernels_per_step"], acc["kernels_per_layer"], acc["kernels_outside_layers"]) == (8, 2, 2), acc
assert acc["gpu_busy_ms"] * 1e3 == 3 * 5 + 11, acc
assert acc["top_kernels"][0]["name"] == "gemv" and acc["top_kernels"][0]["calls_per_step"] == 4, acc
"""


def test_accounting_merges_overlaps_and_splits_per_layer_counts():
    """Run where the script runs (scripts/ on the path, as `python scripts/profile_steps.py` has it)."""
    r = subprocess.run([sys.executable, "-c", ACCOUNTING], cwd=SCRIPTS, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_profile_steps_smoke(tmp_path):
    out = tmp_path / "profile.json"
    r = subprocess.run([sys.executable, "profile_steps.py", "--smoke", f"--out={out}"], cwd=SCRIPTS,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert len(res["steps"]) >= 5 and len(res["rounds"]) == 2
    for row in res["steps"]:
        assert row["kernels_per_layer"] > 0 and row["top_kernels"]
    assert all(r["target_rounds"] >= 1 for r in res["rounds"])
