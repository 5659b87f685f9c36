#!/usr/bin/env python3
"""Fetch a long-context code corpus: the Python sources shipped in the sdists of seven PyPI projects.

Each project is pure Python under a permissive licence and pinned to one version. Its sdist is only
downloaded (``pip download --no-deps --no-binary=:all:``, as scripts/fetch_corpus.py does for
prose), never built or installed; the library's ``.py`` files (and its tests, where the sdist ships
them) are written unchanged but for line endings to ``OUT_DIR/<project>/<path in the sdist>``,
with the project's licence file beside them. ``results/code_corpus_sources.json`` records, per
project, the version, licence, the sha256 of the sdist and of every file, and its token count.

`triforce.corpus.code_tasks` builds repository-level completion prompts from this directory.

Usage::

    python scripts/fetch_code_corpus.py [OUT_DIR] [--results PATH] [--tokenizer HF_DIR]

Re-runs reuse the downloaded sdists (OUT_DIR/_sdist) and, for unchanged files, the token counts
already in the manifest, so they take about a second. ``--tokenizer`` counts tokens with that
tokenizer (transformers needed); without one and without earlier counts, tokens are estimated
as characters / 3.6 (what the Qwen2.5 tokenizer gives on this corpus) and marked as estimates.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path

from fetch_corpus import download_sdist, sha256_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent

# name -> version, SPDX licence, licence file, source roots inside the sdist, files left out
PROJECTS = {
    "attrs": {"version": "25.3.0", "licence": "MIT", "licence_file": "LICENSE",
              "roots": ["src/attr/", "src/attrs/", "tests/"]},
    "click": {"version": "8.1.8", "licence": "BSD-3-Clause", "licence_file": "LICENSE.txt",
              "roots": ["src/click/", "tests/"]},
    "jinja2": {"version": "3.1.6", "licence": "BSD-3-Clause", "licence_file": "LICENSE.txt",
               "roots": ["src/jinja2/", "tests/"]},
    "pyparsing": {"version": "3.2.3", "licence": "MIT", "licence_file": "LICENSE",
                  "roots": ["pyparsing/", "tests/"]},
    "requests": {"version": "2.32.3", "licence": "Apache-2.0", "licence_file": "LICENSE",
                 "roots": ["src/requests/", "tests/"]},
    # the emoji and cell-width tables are data, not code
    "rich": {"version": "13.9.4", "licence": "MIT", "licence_file": "LICENSE",
             "roots": ["rich/"], "exclude": ["rich/_emoji_codes.py", "rich/_cell_widths.py"]},
    "werkzeug": {"version": "3.1.3", "licence": "BSD-3-Clause", "licence_file": "LICENSE.txt",
                 "roots": ["src/werkzeug/", "tests/"]},
}
NATIVE_SUFFIXES = (".c", ".h", ".cpp", ".pyx", ".pxd", ".rs", ".f90")  # none under a pure-Python project's roots
MIN_TOTAL_TOKENS = 300_000
CHARS_PER_TOKEN = 3.6


def read_sources(sdist: Path, info: dict) -> tuple[dict[str, str], str, str]:
    """(path -> text of every .py under the roots, licence text, PKG-INFO licence lines) of one sdist."""
    files, licence, meta = {}, None, ""
    exclude = set(info.get("exclude", []))
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar.getmembers():
            if not m.isfile() or "/" not in m.name:
                continue
            rel = m.name.split("/", 1)[1]
            if rel.endswith(NATIVE_SUFFIXES) and rel.startswith(tuple(info["roots"])):
                raise ValueError(f"{sdist.name} ships native source {rel}: the code corpus takes pure-Python projects only")
            if rel == info["licence_file"]:
                licence = tar.extractfile(m).read().decode("utf-8")
            elif rel == "PKG-INFO":
                meta = tar.extractfile(m).read().decode("utf-8")
            elif rel.endswith(".py") and rel.startswith(tuple(info["roots"])) and rel not in exclude:
                text = tar.extractfile(m).read().decode("utf-8-sig")
                files[rel] = text.replace("\r\n", "\n").replace("\r", "\n")
    if licence is None:
        raise FileNotFoundError(f"{info['licence_file']} not found in {sdist.name}")
    meta_lines = [l for l in meta.splitlines() if l.startswith(("License", "Classifier: License"))]
    return dict(sorted(files.items())), licence, "; ".join(meta_lines)


def write_if_changed(path: Path, data: bytes) -> None:
    if not path.is_file() or path.read_bytes() != data:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def previous_counts(results: Path) -> dict[tuple[str, str], tuple[int, str]]:
    """(project, file sha256) -> (tokens, tokenizer) from an earlier manifest, for fast re-runs."""
    if not results.is_file():
        return {}
    old = json.loads(results.read_text())
    return {(p["name"], f["sha256"]): (f["tokens"], p["tokenizer"])
            for p in old.get("projects", []) for f in p["files"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default=str(REPO_ROOT / "data" / "code"),
                    help="where to write <project>/<path> (default: data/code/ in the repo)")
    ap.add_argument("--results", default=str(REPO_ROOT / "results" / "code_corpus_sources.json"),
                    help="where to write the JSON manifest")
    ap.add_argument("--tokenizer", default=None,
                    help="Hugging Face tokenizer directory to count tokens with (e.g. the Qwen2.5-Coder checkpoint)")
    args = ap.parse_args(argv)

    out_dir = Path(args.out_dir).resolve()
    results = Path(args.results).resolve()
    tokenizer, tok_name = None, None
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        tok_name = Path(args.tokenizer).name
    known = previous_counts(results)

    projects = []
    for name, info in PROJECTS.items():
        sdist = download_sdist(name, info["version"], out_dir / "_sdist")
        files, licence, meta = read_sources(sdist, info)
        write_if_changed(out_dir / name / info["licence_file"], licence.encode("utf-8"))
        entries, counted_by = [], set()
        for rel, text in files.items():
            data = text.encode("utf-8")
            write_if_changed(out_dir / name / rel, data)
            digest = sha256_bytes(data)
            if tokenizer is not None:
                tokens, by = len(tokenizer.encode(text, add_special_tokens=False)), tok_name
            elif (name, digest) in known:
                tokens, by = known[name, digest]
            else:
                tokens, by = round(len(text) / CHARS_PER_TOKEN), f"estimate: characters / {CHARS_PER_TOKEN}"
            counted_by.add(by)
            entries.append({"path": rel, "sha256": digest, "lines": text.count("\n"), "chars": len(text),
                            "tokens": tokens})
        projects.append({
            "name": name, "version": info["version"], "licence": info["licence"],
            "pkg_info_licence": meta, "licence_file": info["licence_file"],
            "licence_sha256": sha256_bytes(licence.encode("utf-8")),
            "sdist": sdist.name, "sdist_sha256": sha256_bytes(sdist.read_bytes()),
            "roots": info["roots"], "excluded": info.get("exclude", []),
            "tokenizer": counted_by.pop() if len(counted_by) == 1 else "mixed: " + ", ".join(sorted(counted_by)),
            "n_files": len(entries), "lines": sum(e["lines"] for e in entries),
            "chars": sum(e["chars"] for e in entries), "tokens": sum(e["tokens"] for e in entries),
            "files": entries,
        })
        print(f"{name:10s} {info['version']:8s} {info['licence']:13s} {len(entries):4d} files "
              f"{projects[-1]['tokens']:8d} tokens", file=sys.stderr)

    total = sum(p["tokens"] for p in projects)
    if total < MIN_TOTAL_TOKENS:
        raise ValueError(f"the code corpus holds {total} tokens, fewer than {MIN_TOTAL_TOKENS}: add projects")
    manifest = {
        "description": "Python sources of pure-Python, permissively licensed PyPI projects, extracted from their "
                       "sdists by scripts/fetch_code_corpus.py (files unchanged but for \\n line endings)",
        "command": "python scripts/fetch_code_corpus.py [OUT_DIR] [--tokenizer HF_DIR]",
        "total_files": sum(p["n_files"] for p in projects), "total_tokens": total,
        "projects": projects,
    }
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    write_if_changed(results, text.encode("utf-8"))
    print(f"total {total} tokens in {manifest['total_files']} files; manifest {results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
