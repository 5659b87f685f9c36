"""The acceptance study (triforce/study.py) and its aggregation (scripts/plot_acceptance.py) on tiny-random."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

import triforce
from triforce.study import KEY, SharedPrefill, check_config, measure_forced, run_pipeline, run_specs, run_study

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the study runs where `device=auto` puts it


def study_overrides(tmp_path: Path) -> list[str]:
    return ["+model=tiny-random", f"study.out={tmp_path / 'runs.jsonl'}", f"study.corpus_dir={tmp_path / 'none'}",
            "study.documents=[a]", "study.prompt_tokens=[96]", "study.temperatures=[0.6]",
            "study.policies=[retrieval,own]", "study.budgets=[16,32]", "study.gammas=[2,6]",
            "study.gamma_policies=[retrieval]", "study.gamma_budget=16", "study.max_new_tokens=12"]


def compose_study(overrides: list[str]):
    with initialize_config_module(config_module="triforce.conf", version_base=None):
        return compose(config_name="study", overrides=overrides)


def load_plot_script():
    spec = importlib.util.spec_from_file_location("plot_acceptance", ROOT / "scripts/plot_acceptance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_cli_rows_resume_and_aggregation(tmp_path, capsys):
    cmd = [sys.executable, "-m", "triforce.study", *study_overrides(tmp_path), f"hydra.run.dir={tmp_path / 'hydra'}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "study: 5 runs" in r.stderr  # 2 policies x 2 budgets + gamma 2 of the gamma sweep (6 is a duplicate)
    rows = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 5
    assert len({tuple(row[k] for k in KEY) for row in rows}) == 5
    for row in rows:
        assert row["model"] == "tiny-random" and row["document"] == "a" and row["synthetic_prompt"]
        assert row["generated_tokens"] == 12 and row["device"].startswith(DEVICE) and row["chunk_size"] == 4
        assert 0 <= row["accept_rate"] <= 1 and 1 <= row["mean_accepted_length"] <= row["gamma"] + 1
        assert 0 <= row["tiny_accept_rate"] <= 1 and row["tokens_per_second"] > 0
    assert {(row["policy"], row["budget"], row["gamma"]) for row in rows} == {
        ("retrieval", 16, 6), ("retrieval", 32, 6), ("own", 16, 6), ("own", 32, 6), ("retrieval", 16, 2)}

    assert run_study(compose_study(study_overrides(tmp_path))) == []  # resume: nothing left to run
    assert "study: 0 runs" in capsys.readouterr().err
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 5

    plot = load_plot_script()
    args = ["--runs", str(tmp_path / "runs.jsonl"), "--csv", str(tmp_path / "a.csv"), "--png", str(tmp_path / "a.png")]
    if importlib.util.find_spec("matplotlib") is None:  # the `plot` extra; CSV and table need nothing
        args.append("--no-png")
    table = plot.main(args)
    lines = (tmp_path / "a.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("model,document,prompt_tokens")
    assert "| retrieval |" in table and "| own |" in table and "B=16 | B=32" in table
    if "--no-png" not in args:
        assert (tmp_path / "a.png").stat().st_size > 10_000


def test_shared_prefill_matches_a_fresh_generator():
    """Restoring the shared prefill gives exactly what Generator.generate (own prefill) gives (fp32 on the CPU:
    on a GPU, bf16 rounding differs between the two prefills)."""
    cfg = compose_study(["+model=tiny-random", "device=cpu", "study.corpus_dir=/nonexistent", "study.documents=[a]",
                         "study.prompt_tokens=[150]", "study.policies=[retrieval,own]", "study.budgets=[16]",
                         "study.gammas=[]", "study.max_new_tokens=16", "study.temperatures=[0.6,0]"])
    gen = triforce.generator.Generator(cfg)
    ids = torch.randint(64, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    shared = SharedPrefill(gen, ids, 150 + 16 + 20, slack=30)
    refs = {}
    for spec in run_specs(cfg):  # runs follow each other on one prefill: none may leak into the next
        for n_tiers, pipeline in ((2, "retrieval"), (3, "triforce")):
            if n_tiers == 3 and spec["temperature"] == 0:
                continue  # greedy 3-tier on random weights rejects nearly everything: slow, and 2-tier covers greedy
            ours = run_pipeline(gen, shared, spec, n_tiers)[0]
            key = (pipeline, spec["policy"])
            if key not in refs:
                refs[key] = triforce.load("+model=tiny-random", "device=cpu", f"pipeline={pipeline}", f"gamma={cfg.gamma}",
                                          f"draft.gamma={cfg.draft.gamma}", f"cache.policy={spec['policy']}",
                                          "cache.budget=16")
            ref = refs[key].generate(ids, 16, temperature=spec["temperature"], seed=0).stats["tiers"]
            assert ours["target"]["accepted"] == ref["target"]["accepted"]
            assert ours["target"]["rounds"] == ref["target"]["rounds"]
            assert ours["middle"]["accepted"] == ref[spec["policy"]]["accepted"]


@pytest.mark.parametrize("override, match", [
    ("study.policies=[nope]", "unknown policy nope"),
    ("study.budgets=[2]", "below cache.chunk_size"),
    ("study.prompt_tokens=[5000]", "fit the context"),
    ("study.gammas=[0]", "must be >= 1"),
    ("study.budgets=[]", "study.budgets is empty"),
])
def test_bad_study_settings(override, match):
    cfg = compose_study(["+model=tiny-random", "study.corpus_dir=/nonexistent", override])
    with pytest.raises(ValueError, match=match.replace("[", r"\[")):
        check_config(cfg)


def test_missing_corpus_for_a_real_model_names_the_fetch_script(tmp_path):
    cfg = compose_study([f"study.corpus_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="fetch_corpus.py"):
        check_config(cfg)


def write_code_corpus(root: Path) -> None:
    """Two small projects of the shape scripts/fetch_code_corpus.py writes."""
    for name in ("alpha", "beta"):
        for i in range(4):
            body = "".join(f"    x{j} = a + {j} * {i}\n" for j in range(12))
            (root / name / "pkg").mkdir(parents=True, exist_ok=True)
            (root / name / "pkg" / f"mod{i}.py").write_text(
                f'import os\n\n\ndef {name}_{i}(a):\n    """Doc {i}."""\n{body}    return x0\n' * 2)


def forced_overrides(tmp_path: Path) -> list[str]:
    return ["+model=tiny-random", f"study.out={tmp_path / 'forced.jsonl'}", f"study.corpus_dir={tmp_path / 'code'}",
            "study.prompt_tokens=[300]", "study.code_documents=2", "study.temperatures=[0,0.6]",
            "study.policies=[retrieval,streaming]", "study.budgets=[16,64]", "study.max_new_tokens=12",
            "prefill_chunk=128"]


def test_forced_study_on_code_tasks(tmp_path, capsys):
    write_code_corpus(tmp_path / "code")
    with initialize_config_module(config_module="triforce.conf", version_base=None):
        cfg = compose(config_name="study_qwen", overrides=forced_overrides(tmp_path))
    rows = run_study(cfg)
    assert len(rows) == 2 * 2 * 2 * 2  # documents x temperatures x policies x budgets
    assert {r["document"] for r in rows} == {"alpha/0", "beta/0"}
    for r in rows:
        assert r["method"] == "forced" and r["corpus"] == "code" and not r["synthetic_prompt"]
        for k in ("accept_rate", "tiny_accept_rate", "tiny_target_accept_rate"):
            assert 0 <= r[k] <= 1
        assert 1 <= r["mean_accepted_length"] <= r["gamma"] + 1
    # the tiny-vs-target pair does not depend on the policy or budget: one value per prompt and temperature
    assert len({(r["document"], r["temperature"], r["tiny_target_accept_rate"]) for r in rows}) == 4
    assert run_study(cfg) == []  # resume
    assert "study: 0 runs" in capsys.readouterr().err


def test_forced_acceptance_is_one_exactly_when_the_drafter_is_the_verifier(tmp_path):
    """A middle tier whose budget covers the prompt computes the target's distributions: alpha 1.
    The one-layer tiny draft (tiny-random's draft_layers=[0], a 16-token window) differs: alpha < 1."""
    write_code_corpus(tmp_path / "code")
    with initialize_config_module(config_module="triforce.conf", version_base=None):
        cfg = compose(config_name="study_qwen", overrides=[*forced_overrides(tmp_path), "device=cpu"])  # exact: fp32
    gen = triforce.generator.Generator(cfg)
    ids = torch.randint(64, (300,), generator=torch.Generator().manual_seed(0)).tolist()
    shared = SharedPrefill(gen, ids, 300 + 40, slack=30)
    for t, policy in ((0.0, "retrieval"), (0.6, "retrieval"), (0.6, "own")):  # own re-reads its observation window
        spec = {**run_specs(cfg)[0], "temperature": t, "budget": 512, "policy": policy}
        row = measure_forced(gen, shared, spec, "cpu", {})
        assert row["accept_rate"] == pytest.approx(1, abs=1e-5), policy
        assert row["tiny_target_accept_rate"] < 0.99
        assert row["tiny_accept_rate"] == pytest.approx(row["tiny_target_accept_rate"], abs=1e-5)


def test_weights_axes_rows_and_tables(tmp_path):
    """study.weights x study.tiny_weights (one factor at a time): a row per format, views really
    quantized (acceptance below the bf16 middle tier's on at least one run is not required, but the
    rows must say which weights ran), and the tables name the series."""
    overrides = ["+model=tiny-random", f"study.out={tmp_path / 'q.jsonl'}", f"study.corpus_dir={tmp_path / 'none'}",
                 "study.documents=[a]", "study.prompt_tokens=[96]", "study.temperatures=[0.6]",
                 "study.policies=[retrieval]", "study.budgets=[16,32]", "study.gammas=[]", "study.max_new_tokens=8",
                 "study.weights=[bf16,int4]", "study.tiny_weights=[bf16,int8]", "quant_group_size=32"]
    rows = run_study(compose_study(overrides))
    combos = {(r["weights"], r["tiny_weights"]) for r in rows}
    assert combos == {("bf16", "bf16"), ("int4", "bf16"), ("bf16", "int8")} and len(rows) == 6
    assert all(0 <= r["accept_rate"] <= 1 and r["tiny_accept_rate"] is not None for r in rows)
    assert run_study(compose_study(overrides)) == []  # resume knows the weights keys
    plot = load_plot_script()
    table = plot.main(["--runs", str(tmp_path / "q.jsonl"), "--csv", str(tmp_path / "q.csv"), "--no-png"])
    assert "| retrieval |" in table and "| retrieval/int4 |" in table and "| retrieval | int8 |" in table
    header = (tmp_path / "q.csv").read_text().splitlines()[0]
    assert "weights" in header and "tiny_weights" in header
    with pytest.raises(ValueError, match="study.weights='int2' is not a weight format"):
        check_config(compose_study(overrides[:-3] + ["study.weights=[int2]"]))
