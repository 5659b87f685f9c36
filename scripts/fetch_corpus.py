#!/usr/bin/env python3
"""Fetch a small long-context corpus of real English text from PyPI sdists.

The texts are public-domain works that happen to ship inside the source
distributions of two ordinary PyPI packages (no dataset hub involved):

* ``brotli`` sdist, ``tests/testdata/``: four files of the Canterbury
  compression corpus (Alice in Wonderland, As You Like It, the Library of
  Congress 1992 "Workshop on Electronic Texts" proceedings, Paradise Lost).
* ``sentencepiece`` sdist, ``test/botchan.txt``: Natsume Soseki's novel
  *Botchan* (1919 English translation, Project Gutenberg eBook #8868).

The sdists are only downloaded (``pip download --no-deps --no-binary=:all:``),
never built or installed. Each document is cleaned of Project Gutenberg
headers/licence boilerplate, written as UTF-8 plain text with ``\\n`` line
endings to ``OUT_DIR/<id>.txt``, and described in ``results/corpus_sources.json``
(package, version, path inside the package, licences, word count, sha256).

Usage::

    python scripts/fetch_corpus.py [OUT_DIR] [--results PATH] [--sdist-dir DIR]

Standard library only (plus ``pip`` run as a subprocess).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

PACKAGES = {
    "brotli": {"version": "1.2.1", "licence": "MIT"},
    "sentencepiece": {"version": "0.2.3", "licence": "Apache-2.0"},
}

# Every document must have at least this many words after cleaning.
MIN_WORDS = 8000


def _lines(text: str) -> list[str]:
    return text.split("\n")


def clean_none(text: str) -> str:
    return text


def clean_lcet10(text: str) -> str:
    lines = _lines(text)
    # Drop the one-line Gutenberg banner at the top.
    idx = next(i for i, l in enumerate(lines) if l.strip())
    if "Project Gutenberg" not in lines[idx]:
        raise ValueError("lcet10: expected Gutenberg banner on first line")
    lines = lines[idx + 1:]
    # Drop the transcriber's note and the Gutenberg trailer at the end.
    end = next(i for i, l in enumerate(lines) if l.startswith("Note:  This file has been edited"))
    lines = lines[:end]
    while lines and (not lines[-1].strip() or set(lines[-1].strip()) == {"*"}):
        lines.pop()
    return "\n".join(lines)


def clean_plrabn12(text: str) -> str:
    lines = _lines(text)
    # Skip the Project Gutenberg introduction: the poem starts at the first
    # line that is exactly "Paradise Lost" (followed by "Book I").
    start = next(i for i, l in enumerate(lines) if l.strip() == "Paradise Lost")
    if not any(l.strip() == "Book I" for l in lines[start:start + 8]):
        raise ValueError("plrabn12: 'Book I' not found after title")
    return "\n".join(lines[start:])


def clean_gutenberg(text: str) -> str:
    lines = _lines(text)
    start = next(i for i, l in enumerate(lines) if l.startswith("*** START OF"))
    end = next(i for i, l in enumerate(lines) if l.startswith("*** END OF"))
    body = lines[start + 1:end]
    body = [l for l in body if not l.startswith("Produced by ")]
    while body and (not body[-1].strip() or body[-1].startswith("End of Project Gutenberg")):
        body.pop()
    return "\n".join(body)


def clean_botchan(text: str) -> str:
    lines = _lines(clean_gutenberg(text))
    # Drop the transcriber's list of original typos ("[A: Insitent]" ...)
    # that follows the end of the novel.
    end = next(i for i, l in enumerate(lines) if l.strip() == "--(THE END)--")
    return "\n".join(lines[:end + 1])


DOCUMENTS = [
    {
        "id": "alice_in_wonderland",
        "title": "Alice's Adventures in Wonderland (Millennium Fulcrum Edition 2.9)",
        "author": "Lewis Carroll",
        "kind": "novel",
        "package": "brotli",
        "member": "tests/testdata/alice29.txt",
        "text_licence": "Public domain (1865; Project Gutenberg etext; Canterbury corpus alice29.txt)",
        "clean": clean_none,
    },
    {
        "id": "botchan",
        "title": "Botchan (Master Darling), tr. Yasotaro Morri, 1919",
        "author": "Natsume Soseki (Kin-nosuke Natsume)",
        "kind": "novel",
        "package": "sentencepiece",
        "member": "test/botchan.txt",
        "text_licence": "Public domain in the USA (1919 translation; Project Gutenberg eBook #8868, "
                        "Gutenberg header/licence removed)",
        "clean": clean_botchan,
    },
    {
        "id": "loc_workshop_electronic_texts",
        "title": "Workshop on Electronic Texts: Proceedings (Library of Congress, 1992)",
        "author": "James Daly (ed.)",
        "kind": "prose (conference proceedings)",
        "package": "brotli",
        "member": "tests/testdata/lcet10.txt",
        "text_licence": "Public domain (US federal government work; Project Gutenberg etext; "
                        "Canterbury corpus lcet10.txt)",
        "clean": clean_lcet10,
    },
    {
        "id": "paradise_lost",
        "title": "Paradise Lost",
        "author": "John Milton",
        "kind": "epic poem (blank verse)",
        "package": "brotli",
        "member": "tests/testdata/plrabn12.txt",
        "text_licence": "Public domain (1667/1674; Project Gutenberg etext; Canterbury corpus "
                        "plrabn12.txt, Gutenberg introduction removed)",
        "clean": clean_plrabn12,
    },
    {
        "id": "as_you_like_it",
        "title": "As You Like It",
        "author": "William Shakespeare",
        "kind": "play",
        "package": "brotli",
        "member": "tests/testdata/asyoulik.txt",
        "text_licence": "Public domain (c. 1599; Canterbury corpus asyoulik.txt)",
        "clean": clean_none,
    },
]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_sdist(name: str, version: str, dest: Path) -> Path:
    """Return the path of NAME-VERSION.tar.gz, downloading it with pip if needed."""
    dest.mkdir(parents=True, exist_ok=True)

    def find() -> Path | None:
        hits = sorted(p for p in dest.glob("*.tar.gz")
                      if p.name.lower().replace("_", "-") == f"{name}-{version}.tar.gz")
        return hits[0] if hits else None

    found = find()
    if found is not None:
        return found
    base = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
            "--disable-pip-version-check", "-d", str(dest), f"{name}=={version}"]
    # --no-build-isolation makes pip's metadata step take ~2 s instead of
    # installing setuptools etc. into a throwaway env (~80 s); fall back to the
    # isolated default if the current environment cannot do it.
    for extra in (["--no-build-isolation"], []):
        print("+", " ".join(base[2:] + extra), file=sys.stderr, flush=True)
        proc = subprocess.run(base + extra, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        found = find()
        if proc.returncode == 0 and found is not None:
            return found
        print(proc.stdout[-2000:], file=sys.stderr)
    raise RuntimeError(f"could not download sdist {name}=={version}")


def read_member(sdist: Path, member: str) -> str:
    with tarfile.open(sdist, "r:gz") as tar:
        names = [n for n in tar.getnames() if n.split("/", 1)[-1] == member]
        if len(names) != 1:
            raise FileNotFoundError(f"{member} not found (once) in {sdist.name}")
        raw = tar.extractfile(names[0]).read()
    text = raw.decode("utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def normalise(text: str) -> str:
    lines = [l.rstrip() for l in text.split("\n")]
    text = "\n".join(lines)
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", nargs="?", default=str(REPO_ROOT / "data" / "corpus"),
                    help="where to write <id>.txt (default: data/corpus/ in the repo)")
    ap.add_argument("--results", default=str(REPO_ROOT / "results" / "corpus_sources.json"),
                    help="where to write the JSON manifest")
    ap.add_argument("--sdist-dir", default=None,
                    help="where to keep/reuse downloaded sdists (default: OUT_DIR/_sdist)")
    args = ap.parse_args(argv)

    out_dir = Path(args.out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    sdist_dir = Path(args.sdist_dir).resolve() if args.sdist_dir else out_dir / "_sdist"

    sdists = {}
    for name, info in PACKAGES.items():
        path = download_sdist(name, info["version"], sdist_dir)
        sdists[name] = {"path": path, "sha256": sha256_bytes(path.read_bytes())}

    docs = []
    for d in DOCUMENTS:
        pkg = PACKAGES[d["package"]]
        sd = sdists[d["package"]]
        text = normalise(d["clean"](read_member(sd["path"], d["member"])))
        if "Project Gutenberg" in text[:2000] or "Project Gutenberg" in text[-2000:]:
            raise ValueError(f"{d['id']}: Gutenberg boilerplate left after cleaning")
        words = len(text.split())
        if words < MIN_WORDS:
            raise ValueError(f"{d['id']}: only {words} words after cleaning")
        data = text.encode("utf-8")
        dest = out_dir / f"{d['id']}.txt"
        dest.write_bytes(data)
        try:
            shown = str(dest.relative_to(REPO_ROOT))
        except ValueError:
            shown = str(dest)
        docs.append({
            "id": d["id"],
            "title": d["title"],
            "author": d["author"],
            "kind": d["kind"],
            "package": d["package"],
            "package_version": pkg["version"],
            "package_file": sd["path"].name,
            "package_file_sha256": sd["sha256"],
            "package_licence": pkg["licence"],
            "path_in_package": d["member"],
            "text_licence": d["text_licence"],
            "file": shown,
            "words": words,
            "approx_tokens": round(words * 1.3),
            "chars": len(text),
            "bytes": len(data),
            "sha256": sha256_bytes(data),
        })
        print(f"{d['id']:32s} {words:7d} words  {shown}", file=sys.stderr)

    manifest = {
        "description": "Public-domain English texts extracted from PyPI sdists by scripts/fetch_corpus.py",
        "command": "python scripts/fetch_corpus.py [OUT_DIR]",
        "total_words": sum(x["words"] for x in docs),
        "total_approx_tokens": sum(x["approx_tokens"] for x in docs),
        "documents": docs,
    }
    results = Path(args.results).resolve()
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"total {manifest['total_words']} words (~{manifest['total_approx_tokens']} tokens); "
          f"manifest {results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
