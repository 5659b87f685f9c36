"""scripts/bench_quant.py --summarize-only: the summary keys from an earlier run, the study's CSV and a
bench_real run with int4 tiers (no GPU needed)."""
import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = ["model", "document", "prompt_tokens", "temperature", "policy", "budget", "gamma", "seed", "weights",
            "tiny_weights", "accept_rate"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in keys} for r in rows)


def test_summarize_only(tmp_path):
    base = {"document": "d", "prompt_tokens": 4096, "temperature": 0.0, "policy": "retrieval", "budget": 256,
            "gamma": 6, "seed": 0, "tiny_weights": "bf16"}
    write_csv(tmp_path / "acc.csv", [
        {**base, "model": "big", "weights": "bf16", "accept_rate": 0.8},
        {**base, "model": "big", "weights": "int4", "accept_rate": 0.7},
        {**base, "model": "small", "weights": "bf16", "accept_rate": 0.6},
        {**base, "model": "small", "weights": "int4", "accept_rate": 0.3},
        {**base, "model": "small", "weights": "int4", "tiny_weights": "int4", "accept_rate": 0.0},  # other axis
    ])
    real = {"settings": {"overrides": ["+model=x", "cache.weights=int4"]}, "rows": [
        {"system": f"triforce/{p}", "pipeline": p, "context": c, "temperature": 0.0, "ms_per_token": ms}
        for p, c, ms in [("autoregressive", 32512, 2.0), ("retrieval", 32512, 4.0), ("triforce", 32512, 5.0),
                         ("autoregressive", 8192, 1.0), ("retrieval", 8192, 0.5)]]}
    (tmp_path / "real.json").write_text(json.dumps(real))
    quant = {"middle_steps": [{"weights": w, "step_ms": ms, "step_over_floor": 1.0}
                              for w, ms in [("bf16", 4.0), ("int8", 3.0), ("int4", 5.0)]],
             "e2e_injected": [{"weights": "int4", "speedup_vs_ar": 2.0, "speedup_vs_ar_expected_length": 2.1}],
             "context": 130048, "offload_24gb": {"winner": "bf16"}}
    (tmp_path / "quant.json").write_text(json.dumps(quant))
    r = subprocess.run([sys.executable, str(ROOT / "scripts/bench_quant.py"), "--summarize-only", str(tmp_path / "quant.json"),
                        "--acceptance-csv", str(tmp_path / "acc.csv"), "--real", str(tmp_path / "real.json")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    s = json.loads((tmp_path / "quant.json").read_text())["summary"]
    assert s["q4_middle_step_over_bf16"] == 1.25 and s["q8_middle_step_over_bf16"] == 0.75
    assert abs(s["q4_middle_acceptance_drop"] - 0.2) < 1e-9  # (0.1 + 0.3) / 2, the tiny-int4 row left out
    assert abs(s["q4_middle_acceptance_drop_per_model"]["small"] - 0.3) < 1e-9
    assert s["real_q4_speedup_vs_ar_32k"]["0.0"] == {"speedup": 0.5, "pipeline": "retrieval", "context": 32512}
    assert s["e2e_speedup_q4_7b_128k"] == 2.0 and "e2e_speedup_q8_7b_128k" not in s
