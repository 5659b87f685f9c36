"""Code-completion tasks (triforce/corpus.py) and the code corpus fetcher (scripts/fetch_code_corpus.py)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from triforce.corpus import code_tasks, functions
from triforce.generator import ByteTokenizer

ROOT = Path(__file__).resolve().parents[1]
CODE = ROOT / "data" / "code"
TOK = ByteTokenizer(256)  # one token per byte: lengths are characters, decoding is exact


def decode(ids: list[int]) -> str:
    return bytes(ids).decode()


def make_project(root: Path, name: str, n_files: int) -> None:
    for i in range(n_files):
        body = "".join(f"    x{j} = a + {j} * {i}\n" for j in range(12))
        src = (f'"""Module {i} of {name}."""\nimport os\n\n\n'
               f'def {name}_f{i}(a, b=1):\n    """Add things to a ({i})."""\n{body}    return x0 + b\n\n\n'
               f'class C{i}:\n    def m(self):\n        return {i}\n')
        (root / name / "pkg").mkdir(parents=True, exist_ok=True)
        (root / name / "pkg" / f"mod{i}.py").write_text(src)
    (root / name / "tests").mkdir()
    (root / name / "tests" / "test_x.py").write_text("def test_x():\n    assert True\n" * 40)


def test_functions_split_opening_and_reference():
    src = ('import os\n\n@dec\ndef f(a,\n      b):\n    """Doc\n    more."""\n    x = 1\n    y = 2\n    z = 3\n'
           '    return x\n\ndef short():\n    """D."""\n    return 1\n\ndef nodoc(a):\n    a += 1\n    a += 2\n'
           '    a += 3\n    a += 4\n    a += 5\n    return a\n\nclass K:\n    def m(self):\n        pass\n')
    fs = {f.name: f for f in functions("p.py", src)}
    assert set(fs) == {"f", "nodoc"}  # short() has one body line after its docstring; methods are not taken
    assert fs["f"].opening == '@dec\ndef f(a,\n      b):\n    """Doc\n    more."""'
    assert fs["f"].reference == "\n    x = 1\n    y = 2\n    z = 3\n    return x"
    assert fs["nodoc"].opening == "def nodoc(a):\n    a += 1\n    a += 2"
    for f in fs.values():  # opening + reference is the function's source, exactly
        assert f.opening + f.reference in src
    assert functions("bad.py", "def (:\n") == []


def test_code_tasks_exact_lengths_held_out_target_and_distinct_documents(tmp_path):
    for name in ("alpha", "beta"):
        make_project(tmp_path, name, 6)
    tasks = code_tasks(TOK, [600, 1500], 4, tmp_path, reference_tokens=40)
    assert [(t.length, t.project) for t in tasks] == [(n, p) for n in (600, 1500) for p in ("alpha", "beta") * 2]
    for t in tasks:
        text = decode(t.prompt_ids)
        assert len(t.prompt_ids) == t.length
        target = t.meta["target_file"]
        assert target.startswith("pkg/") and text.endswith(f"\n# file: {target}\n{t.meta['opening']}")
        assert text.count(f"# file: {target}\n") == 1  # the target's file is not in the context
        assert text.startswith(f"# file: {(t.meta['context_files'] or [t.meta['partial_file']])[0]}\n")
        for p in t.meta["context_files"]:  # whole files, as on disk
            assert f"# file: {p}\n" + (tmp_path / t.project / p).read_text() in text
        assert decode(t.reference_ids) == t.meta["reference"][:40]
        src = (tmp_path / t.project / target).read_text()
        assert t.meta["opening"] + t.meta["reference"] in src
    by_len = {n: [t for t in tasks if t.length == n] for n in (600, 1500)}
    # the same targets at every length; a project's second document is another target
    assert [t.meta["function"] for t in by_len[600]] == [t.meta["function"] for t in by_len[1500]]
    assert len({(t.project, t.meta["function"]) for t in by_len[600]}) == 4
    assert len(by_len[1500][0].meta["context_files"]) > len(by_len[600][0].meta["context_files"])


def test_code_tasks_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fetch_code_corpus.py"):
        code_tasks(TOK, [4096], 5, tmp_path / "missing")
    make_project(tmp_path, "alpha", 3)
    with pytest.raises(ValueError, match="use shorter lengths"):
        code_tasks(TOK, [100_000], 1, tmp_path)
    with pytest.raises(ValueError, match="lower n_docs"):
        code_tasks(TOK, [600], 4, tmp_path)  # 3 usable functions
    with pytest.raises(ValueError, match="n_docs >= 1"):
        code_tasks(TOK, [600], 0, tmp_path)


needs_corpus = pytest.mark.skipif(not (CODE / "_sdist").is_dir(),
                                  reason="run `python scripts/fetch_code_corpus.py` first")


@needs_corpus
def test_fetcher_rerun_reproduces_the_manifest(tmp_path):
    """A re-run is fast (sdists kept) and extracts exactly the files whose sha256s results/ records."""
    out = tmp_path / "sources.json"
    r = subprocess.run([sys.executable, ROOT / "scripts/fetch_code_corpus.py", str(CODE), "--results", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    new, ref = json.loads(out.read_text()), json.loads((ROOT / "results/code_corpus_sources.json").read_text())
    assert len(ref["projects"]) >= 5 and ref["total_tokens"] >= 300_000
    for a, b in zip(new["projects"], ref["projects"], strict=True):
        assert (a["name"], a["version"], a["sdist_sha256"], a["licence_sha256"]) == \
               (b["name"], b["version"], b["sdist_sha256"], b["licence_sha256"])
        assert [(f["path"], f["sha256"]) for f in a["files"]] == [(f["path"], f["sha256"]) for f in b["files"]]
        assert b["licence"] in ("MIT", "BSD-3-Clause", "Apache-2.0")


@needs_corpus
def test_real_corpus_gives_five_projects_at_4k():
    tasks = code_tasks(TOK, [4096], 5, CODE)
    assert len({t.project for t in tasks}) == 5 and all(len(t.prompt_ids) == 4096 for t in tasks)
