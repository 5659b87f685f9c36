"""Many prompts in one call: `Generator.generate([...])` and the CLI's `prompts_file`.

Each row must equal the single-prompt call with the row's seed (seed + i unless it sets its own),
greedy and sampled; bad rows are refused before any row runs, naming the row's index.
"""
import json
import subprocess
import sys

import pytest

import triforce
from triforce.generator import rows_summary

TINY = ["+model=tiny-random", "max_new_tokens=8", "stream=false", "pipeline=triforce", "gamma=4", "draft.gamma=2",
        "cache.budget=16"]
PROMPTS = ["first prompt " * 6, "a second, longer prompt with other words in it " * 3, "third"]


@pytest.fixture(scope="module")
def gen():
    return triforce.load(*TINY)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_equal_single_prompt_runs(gen, temperature):
    rows = gen.generate(PROMPTS, temperature=temperature, seed=5)
    assert isinstance(rows, list) and len(rows) == 3
    for i, (p, r) in enumerate(zip(PROMPTS, rows)):
        assert r.token_ids == gen.generate(p, temperature=temperature, seed=5 + i).token_ids
    s = rows_summary(rows, 1.0)
    assert s["prompts"] == 3 and s["generated_tokens"] == 24 and set(s["mean_acceptance"]) <= {"target", "retrieval"}


def test_more_prompts_than_rows_reuse_finished_rows():
    """batch_size=2 with four prompts of different limits: one batch of two rows, each later prompt
    taking the row of one that finished; every prompt equals its single call."""
    gen = triforce.load(*TINY, "batch_size=2")
    rows = [{"prompt": p, "max_new_tokens": n} for p, n in zip(PROMPTS + ["fourth prompt, a little longer"], (3, 9, 5, 7))]
    got = gen.generate(rows, temperature=0.8, seed=2)
    for i, (row, r) in enumerate(zip(rows, got)):
        assert r.token_ids == gen.generate(row["prompt"], max_new_tokens=row["max_new_tokens"], temperature=0.8,
                                           seed=2 + i).token_ids, f"prompt {i}"
        assert r.stats["batch"]["rows"] == 2 and r.stats["batch"]["prompts"] == 4
    assert got[0].stats["batch"]["refill_seconds"] > 0


def test_row_settings_and_token_id_rows(gen):
    ids = gen.encode("token ids as a row", chat=False)
    rows = gen.generate([{"prompt": PROMPTS[0], "max_new_tokens": 3, "seed": 11}, ids], temperature=0.8, seed=0)
    assert len(rows[0].token_ids) == 3
    assert rows[0].token_ids == gen.generate(PROMPTS[0], max_new_tokens=3, temperature=0.8, seed=11).token_ids
    assert rows[1].token_ids == gen.generate(ids, temperature=0.8, seed=1).token_ids
    one = gen.generate(ids, temperature=0.8, seed=1)  # a flat list of ints stays one prompt
    assert not isinstance(one, list) and one.token_ids == rows[1].token_ids


@pytest.mark.parametrize("prompts,msg", [
    ([], "the list of prompts is empty"),
    (["fine", ""], "prompt 1: the prompt is empty"),
    (["fine", "fine", "x " * 5000], "prompt 2: "),
    ([{"prompt": "x", "temprature": 1}], "prompt 0: unknown keys ['temprature']"),
    ([{"prompt": "x", "temperature": -1}], "prompt 0: temperature"),
    ([{"prompt": "x", "max_new_tokens": 0}], "prompt 0: max_new_tokens"),
    ([3.5, "x"], "prompt 0: a prompt is a text or a list of token ids"),
])
def test_bad_rows_name_their_index(gen, prompts, msg):
    with pytest.raises(ValueError) as e:
        gen.generate(prompts)
    assert msg in str(e.value)


def test_cli_prompts_file(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join([json.dumps(PROMPTS[0]), json.dumps({"prompt": PROMPTS[1], "max_new_tokens": 3}), ""]))
    r = subprocess.run([sys.executable, "-m", "triforce.generate", *TINY, f"prompts_file={src}", "seed=2"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in (tmp_path / "p.results.jsonl").read_text().splitlines()]
    assert [o["index"] for o in out] == [0, 1] and [len(o["token_ids"]) for o in out] == [8, 3]
    assert "2 prompts, 11 tokens" in r.stderr
    gen = triforce.load(*TINY, "seed=2")  # tiny-random's weights are drawn from the config's seed too
    assert out[1]["token_ids"] == gen.generate(PROMPTS[1], max_new_tokens=3, seed=3).token_ids  # seed + index


def test_cli_bad_prompts_file_is_one_line(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('"fine"\n{"prompt": oops}\n')
    r = subprocess.run([sys.executable, "-m", "triforce.generate", *TINY, f"prompts_file={src}"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "line 2: not JSON" in lines[0], r.stderr


@pytest.mark.parametrize("batch_size", ["1", "auto"])
def test_the_longest_row_is_planned_first_on_a_gpu(monkeypatch, batch_size):
    """On a GPU the longest row's memory plan runs before any row (one after another, or as the
    first batch); its error names the row."""
    import types

    gen = triforce.load(*TINY, f"batch_size={batch_size}")
    asked = []

    def plan(capacity, new_tokens, batch=1):
        asked.append((capacity, new_tokens, batch))
        raise ValueError("1000 tokens need 99.0 GiB of GPU memory")

    monkeypatch.setattr(gen, "plan_memory", plan)
    monkeypatch.setattr(gen, "device", types.SimpleNamespace(type="cuda"))
    monkeypatch.setattr(gen, "generate", lambda *a, **k: pytest.fail("a row ran before the plan"))
    with pytest.raises(ValueError, match=r"prompt 1 \(the longest\): 1000 tokens need 99.0 GiB"):
        gen.generate_rows(["short", PROMPTS[1], "mid " * 5])
    assert asked and all(a[:2] == asked[0][:2] for a in asked) and asked[0][1] == 8  # the longest row only
    assert asked[-1][2] == 1 and (batch_size == "auto" or len(asked) == 1)
