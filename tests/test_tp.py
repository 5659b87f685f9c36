"""Tensor parallelism (issue 7): two gloo ranks on CPU reproduce the single-process model and output.

The ranks are spawned processes that find each other through torchrun's environment variables
(set by hand here; the CLI test uses torchrun itself), so `Generator` runs its real launch path.

Logit tolerance: float32, max |sharded - single| <= 1e-5 * max |logit|. The shards compute the
same products; only the summation order of the row-parallel matmuls changes (two partial sums
added by the all-reduce instead of one sum over the full inner dimension), which moves each
output by a few float32 ulps (eps = 1.2e-7) per layer. A wrong slice, head mapping or missing
all-reduce changes the logits by O(1) relative, five orders of magnitude above the bound.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import triforce
from triforce import tp as tpar
from triforce.cache import FullCache
from triforce.models.llama import ModelArgs, build_model

TINY = ["+model=tiny-random", "temperature=0", "max_new_tokens=24", "stream=false"]
PROMPT = "The lighthouse keeper climbed the stairs at dusk. " * 3  # 150 byte tokens > budget 32
# a separate (replicated) tiny draft instead of the default layer-subset self-draft
REPLICATED_DRAFT = "+model.draft_args={vocab_size:64,dim:32,n_layers:1,n_heads:2,n_kv_heads:1,intermediate_size:64}"
# fixed pipelines and gammas: under tp `auto` means fixed defaults, while one process would adapt
FIXED = ["pipeline=triforce", "gamma=6", "draft.gamma=4"]
VARIANTS = {
    "triforce": FIXED,
    "replicated_draft": [*FIXED, REPLICATED_DRAFT],
    "offloaded": [*FIXED, "offload=true"],
    "sampled": [*FIXED, "temperature=0.6"],
    "autoregressive": ["pipeline=autoregressive"],
}
MODELS = {  # GQA with q/k/v biases; tied embeddings
    "bias": ModelArgs(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
                      attention_bias=True, max_position_embeddings=256),
    "tied": ModelArgs(vocab_size=96, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, intermediate_size=96,
                      tie_word_embeddings=True, max_position_embeddings=256),
}
TOL = 1e-5
BATCH = [PROMPT, "A shorter second prompt, about the stairs.", PROMPT[::-1]]


def logits(model) -> torch.Tensor:
    """A prefill in two chunks, then three single-token steps: every cached-attention path."""
    ids = torch.randint(0, 96, (1, 43), generator=torch.Generator().manual_seed(0))
    cache = FullCache(model, 64)
    with torch.inference_mode():
        return torch.cat([model(ids[:, a:b], cache)[0] for a, b in ((0, 25), (25, 40), (40, 41), (41, 42), (42, 43))])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str, device: str) -> None:
    """One rank: everything the tests compare, saved to out/rank{rank}.pt."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    torch.set_num_threads(1)
    res = {}
    common = [f"device={device}", "dtype=float32"]
    for name, extra in VARIANTS.items():
        if device == "cuda" and name == "offloaded":
            continue
        gen = triforce.load(*TINY, *common, "tp=2", *extra)  # the first one initialises the process group
        res[name] = gen.generate(PROMPT).token_ids
        if name == "sampled":  # several prompts: the ranks decode one batch in lockstep
            res["batch"] = [r.token_ids for r in gen.generate(BATCH, seed=3)]
    if device == "cpu":
        group = dist.group.WORLD
        for name, args in MODELS.items():
            single = build_model(args, None, "cpu", torch.float32, seed=5).eval()
            res[f"logits_{name}"] = logits(build_model(args, None, "cpu", torch.float32, tp_group=group, seed=5).eval())
            res[f"logits_{name}_state_dict"] = logits(
                build_model(args, single.state_dict(), "cpu", torch.float32, tp_group=group).eval())
        try:  # a config that differs on one rank
            triforce.load(*TINY, *common, "tp=2", f"cache.budget={32 if rank == 0 else 16}")
        except ValueError as e:
            res["config_mismatch"] = str(e)
        try:  # a generate() call that differs on one rank
            gen.generate(PROMPT if rank == 0 else PROMPT + "!")
        except ValueError as e:
            res["input_mismatch"] = str(e)
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_ranks(tmp_path, device: str) -> list[dict]:
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # two ranks on two cores
    try:
        mp.spawn(_worker, args=(free_port(), str(tmp_path), device), nprocs=2, join=True)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = old
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("tp"), "cpu")


def single_process(device: str = "cpu") -> dict:
    gens = {name: triforce.load(*TINY, f"device={device}", "dtype=float32", *extra)
            for name, extra in VARIANTS.items() if not (device == "cuda" and name == "offloaded")}
    out = {name: gen.generate(PROMPT).token_ids for name, gen in gens.items()}
    out["batch"] = [r.token_ids for r in gens["sampled"].generate(BATCH, seed=3)]
    return out


@pytest.mark.parametrize("name", list(MODELS))
def test_sharded_logits_match_single_process(ranks, name):
    want = logits(build_model(MODELS[name], None, "cpu", torch.float32, seed=5).eval())
    for r in ranks:
        for key in (f"logits_{name}", f"logits_{name}_state_dict"):  # random init and checkpoint loading
            err = (r[key] - want).abs().max() / want.abs().max()
            assert err <= TOL, f"{key}: max error {err:.2e} of the largest logit"
    assert torch.equal(ranks[0][f"logits_{name}"], ranks[1][f"logits_{name}"])  # all-reduce: same bits everywhere


def test_two_ranks_generate_the_single_process_tokens(ranks):
    want = single_process()
    for name in [*VARIANTS, "batch"]:
        assert ranks[0][name] == ranks[1][name], f"{name}: ranks disagree"
        assert ranks[0][name] == want[name], f"{name}: tp=2 differs from the single process"
    assert want["triforce"] == want["autoregressive"] and len(want["triforce"]) == 24


def test_config_mismatch_names_the_rank_and_key(ranks):
    for r in ranks:
        assert "rank 1 has cache.budget=16 (rank 0: 32)" in r["config_mismatch"]
        assert "rank 1 has prompt_ids=" in r["input_mismatch"]


def test_tp_sizes_are_checked_before_any_process_group(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ValueError, match="torchrun --nproc_per_node=2"):
        triforce.load("+model=tiny-random", "device=cpu", "tp=2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    # tiny-random has 4 heads and 2 KV heads: 3 ranks cannot split them (no MASTER_ADDR: a group would fail)
    with pytest.raises(ValueError, match=r"n_kv_heads=2, .* not divisible by 3; use tp in \[1, 2\]"):
        triforce.load("+model=tiny-random", "device=cpu")
    with pytest.raises(ValueError, match="started 3 processes"):
        triforce.load("+model=tiny-random", "device=cpu", "tp=2")
    assert not dist.is_initialized()


def test_more_ranks_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(RuntimeError, match="2 processes on this machine need one GPU each but 1 is visible"):
        tpar.rank_device(torch.device("cuda"), tpar.Launch(tp=2, rank=1, local_rank=1, local_world=2))


def test_torchrun_cli_prints_once(tmp_path):
    out, prompt = tmp_path / "o.json", tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "triforce.generate", "+model=tiny-random", "device=cpu", "tp=2", "temperature=0", "max_new_tokens=8",
                        f"prompt_file={prompt}", f"output_json={out}"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["stats"]["tp"] == 2 and data["config"]["tp"] == 2
    want = triforce.load("+model=tiny-random", "device=cpu", "temperature=0", "max_new_tokens=8").generate(PROMPT)
    assert data["token_ids"] == want.token_ids
    assert r.stderr.count("tok/s") == 1 and "tp=2" in r.stderr  # one summary line: rank 0's
    assert r.stdout.count(want.text.strip()) == 1  # the streamed text, once


def test_bench_tp_smoke(tmp_path):
    """scripts/bench_tp.py (written for 2 GPUs) runs every part at toy sizes on CPU with gloo."""
    out = tmp_path / "tp.json"
    script = Path(__file__).resolve().parents[1] / "scripts/bench_tp.py"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), "--smoke", f"--out={out}"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert {"tp2_ar_scaling", "tp2_offload_speedup_vs_offloaded_ar", "tp2_13b_e2e_speedup_vs_ar"} <= set(data["summary"])
    assert [row["setup"] for row in data["steps"]] == ["1 GPU", "2 GPUs"] * 2
    assert len(data["offload_e2e"]) == len(data["big_e2e"]) == 5 and "ms" in data["offload_ar_step_1gpu"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (NCCL)")
def test_two_gpus_generate_the_single_gpu_tokens(tmp_path):
    """NCCL, CUDA graphs that contain the all-reduces; float32 so single and sharded argmaxes agree."""
    ranks = run_ranks(tmp_path, "cuda")
    want = single_process("cuda")
    for name in want:
        assert ranks[0][name] == ranks[1][name] == want[name], name
