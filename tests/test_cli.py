"""The Hydra CLI and the API reject bad input with a clear message before heavy work."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import triforce

TINY = ["+model=tiny-random", "max_new_tokens=8"]


def run_cli(*args, tmp_path=None):
    return subprocess.run([sys.executable, "-m", "triforce.generate", *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300)


def test_cli_runs_and_writes_json(tmp_path):
    out = tmp_path / "o.json"
    r = run_cli(*TINY, "pipeline=triforce", f"output_json={out}", "prompt=hello world", tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr
    data = json.loads(out.read_text())
    assert len(data["token_ids"]) == 8 and set(data["stats"]["tiers"]) == {"target", "retrieval", "tiny"}
    assert "tok/s" in r.stderr and "accept" in r.stderr


def test_the_repo_root_on_sys_path_shadows_nothing_transformers_imports():
    """The README runs `python -m ...` from the repo root, which puts our top-level kernels/ and models/
    first on sys.path; transformers >= 5.25 imports the Hub's `kernels` package and then gets ours."""
    root = Path(triforce.__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, "-c", "import transformers.activations, triforce.generate"],
                       capture_output=True, text=True, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr


def test_cli_missing_checkpoint_names_the_path(tmp_path):
    r = run_cli("+model=llama2-7b-128k", tmp_path=tmp_path)
    assert r.returncode != 0 and "Yarn-Llama-2-7b-128k does not exist" in r.stderr


def test_api_is_reusable_and_seeded():
    gen = triforce.load(*TINY, "pipeline=retrieval")
    a = gen.generate("abc", seed=1).token_ids
    b = gen.generate("a longer prompt " * 8, seed=2).token_ids
    assert gen.generate("abc", seed=1).token_ids == a and len(b) == 8


@pytest.mark.parametrize("override,msg", [
    ("gamma=0", "gamma"), ("draft.gamma=0", "gamma"), ("temperature=-1", "temperature"),
    ("top_p=0", "top_p"), ("top_p=1.5", "top_p"), ("pipeline=fast", "pipeline"),
    ("cache.budget=2", "budget"), ("model.path=/nonexistent/ckpt", None), ("device=tpu", "device"),
    ("draft.cache=paged", "draft.cache"),
])
def test_bad_config(override, msg):
    if override.startswith("model.path"):
        with pytest.raises(FileNotFoundError, match="/nonexistent/ckpt"):
            triforce.load("+model=llama2-7b-128k", override)
        return
    with pytest.raises((ValueError, RuntimeError), match=msg):
        triforce.load(*TINY, override)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_cuda_without_gpu():
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        triforce.load(*TINY, "device=cuda")


def test_bad_prompts():
    gen = triforce.load(*TINY)
    with pytest.raises(ValueError, match="empty"):
        gen.generate("")
    with pytest.raises(ValueError, match="exceeds the model's context"):
        gen.generate([1] * 2045, max_new_tokens=8)


@pytest.mark.parametrize("pipeline", ["triforce", "draft"])
def test_draft_vocab_mismatch(tmp_path, pipeline):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="vocabulary"):
        triforce.load(*TINY, f"pipeline={pipeline}", f"model.draft_path={tmp_path}")


def test_pypi_path_needs_a_fetch_spec():
    with pytest.raises(ValueError, match="model.fetch"):
        triforce.load("+model=smollm2-135m", "model.path=pypi")


def test_offload_true_matches_resident():
    """offload=true runs the staging path (host tensors stand in for devices on CPU); same ids."""
    a = triforce.load(*TINY, "temperature=0", "offload=true").generate("offloaded prompt " * 4).token_ids
    b = triforce.load(*TINY, "temperature=0", "offload=false").generate("offloaded prompt " * 4).token_ids
    assert a == b
    texts = ["offloaded prompt " * 4, "another, longer offloaded prompt " * 3]
    rows = triforce.load(*TINY, "temperature=0", "offload=true").generate(texts)
    assert [r.token_ids for r in rows] == [triforce.load(*TINY, "temperature=0", "offload=false").generate(t).token_ids
                                           for t in texts] and rows[0].stats["batch"]["rows"] == 2


@pytest.mark.parametrize("override,msg", [
    ("temperature=-1", "temperature"), ("top_p=1.5", "top_p"), ("gamma=0", "gamma"), ("prompt_file=/nonexistent.txt", "prompt_file"),
])
def test_cli_bad_input_is_one_line(tmp_path, override, msg):
    """Bad input: `error: ...` on one line, exit status 2, no traceback, no start-up warning."""
    r = run_cli(*TINY, override, tmp_path=tmp_path)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.stderr
    assert "Traceback" not in r.stderr and "RuntimeWarning" not in r.stderr


def test_cli_full_error_keeps_traceback(tmp_path):
    import os

    env = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    r = subprocess.run([sys.executable, "-m", "triforce.generate", *TINY, "gamma=0"], capture_output=True, text=True,
                       cwd=tmp_path, timeout=300, env=env)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_api_is_quiet(capfd):
    """No progress bars from the API unless asked (a loop of calls must not flood the terminal)."""
    gen = triforce.load(*TINY, "pipeline=triforce")
    capfd.readouterr()
    gen.generate("quiet please", seed=0)
    out, err = capfd.readouterr()
    assert out == "" and "generate" not in err and "it/s" not in err and "tok/s" not in err
