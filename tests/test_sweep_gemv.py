"""scripts/sweep_gemv.py times GPU kernels only: without a GPU it says so in one line."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sweep_gemv.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_refuses_without_a_gpu_in_one_line():
    r = subprocess.run([sys.executable, str(SCRIPT), "--part", "qwen"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["error: sweep_gemv.py times GPU kernels; run it on a machine with a CUDA GPU"]
