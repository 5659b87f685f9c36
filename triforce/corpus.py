"""Repository-level code completion prompts from the code corpus (`python scripts/fetch_code_corpus.py`).

A task is one project's files concatenated, each under a `# file: <path>` header, up to a token
budget, then the header of a library file left out of that context and the opening of one of its
module-level functions (decorators, signature and docstring). The function's real remainder is
the reference continuation. Long prompts of real code whose continuation the context makes
predictable (the project's own names, idioms and helpers) are what a long-context draft meets in
practice, unlike prose, and the acceptance study and the end-to-end benchmark both use them.
"""
from __future__ import annotations

import ast
import zlib
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_DIR = Path("data/code")
TEST_DIRS = ("tests/",)
MIN_REFERENCE_CHARS = 200  # ~50 tokens of code: more than a study run generates


@dataclass
class Function:
    """A module-level function of a library file: its opening and its real remainder."""

    path: str
    name: str
    lineno: int
    opening: str  # decorators, signature and docstring (or first lines), without the last newline
    reference: str  # the rest of the function, starting with that newline


@dataclass
class CodeTask:
    """One prompt: `prompt_ids` has exactly `length` tokens; `reference_ids` is the real continuation."""

    id: str
    project: str
    length: int
    prompt_ids: list[int]
    reference_ids: list[int]
    meta: dict = field(default_factory=dict)


def read_project(root: Path) -> dict[str, str]:
    """path -> source of every .py file under a project's directory, sorted by path."""
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in sorted(root.rglob("*.py"))}


def functions(path: str, source: str, min_body_lines: int = 4, max_opening_lines: int = 40) -> list[Function]:
    """Module-level functions of `source` with at least `min_body_lines` lines after an opening of at
    most `max_opening_lines` (a long docstring would crowd out the context at short lengths).

    The opening ends after the docstring; a function without one opens with its signature and
    first two body lines. Files that do not parse (none in the corpus) give no functions.
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.split("\n")
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
        body = node.body
        if ast.get_docstring(node) is not None:
            open_end = body[0].end_lineno
        else:
            open_end = body[0].lineno - 1 + 2  # signature (however many lines) + two body lines
        if node.end_lineno - open_end < min_body_lines or open_end - start > max_opening_lines:
            continue
        out.append(Function(path, node.name, node.lineno, "\n".join(lines[start:open_end]),
                            "\n" + "\n".join(lines[open_end:node.end_lineno])))
    return out


def project_dirs(corpus_dir: str | Path) -> list[Path]:
    """The corpus's project directories, sorted by name; raises, naming the fetch script, when there are none."""
    corpus_dir = Path(corpus_dir).expanduser()
    roots = sorted(p for p in corpus_dir.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))) \
        if corpus_dir.is_dir() else []
    if not roots:
        raise FileNotFoundError(f"no code corpus in {corpus_dir}: run `python scripts/fetch_code_corpus.py` "
                                f"(or point corpus_dir at its output)")
    return roots


def code_task_ids(n_docs: int, corpus_dir: str | Path = DEFAULT_DIR) -> list[str]:
    """The ids `code_tasks(..., n_docs, corpus_dir)` gives its documents, without reading any file."""
    roots = project_dirs(corpus_dir)
    return [f"{roots[i % len(roots)].name}/{i // len(roots)}" for i in range(n_docs)]


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def code_tasks(tokenizer, lengths: list[int], n_docs: int, corpus_dir: str | Path = DEFAULT_DIR,
               reference_tokens: int = 256) -> list[CodeTask]:
    """`n_docs` completion tasks at each length in `lengths` (tokens), lengths outermost.

    Document i uses project i mod P (P projects, sorted by name) and its (i // P)-th target
    function, so up to P documents come from distinct projects and more are distinct slices
    (another target, the context files rotated). A document keeps its target at every length:
    the lengths differ only in how much of the project precedes it. The context takes the
    project's other files in path order (library first, then tests), whole, then the head of
    the next file up to the budget. Raises with what to do when the corpus is missing or a
    project is too small for a length.
    """
    roots = project_dirs(corpus_dir)
    if n_docs < 1 or not lengths or min(lengths) < 64:
        raise ValueError(f"need n_docs >= 1 and lengths >= 64 tokens (got n_docs={n_docs}, lengths={list(lengths)})")
    bos = list(tokenizer.encode("", add_special_tokens=True))  # the tokenizer's special prefix, if any
    projects = {}
    for i in range(n_docs):
        root = roots[i % len(roots)]
        if root.name not in projects:
            files = read_project(root)
            cands = [f for p, s in files.items() if not p.startswith(TEST_DIRS) for f in functions(p, s)
                     if len(f.reference) >= MIN_REFERENCE_CHARS]
            # a fixed pseudo-random order (crc32 of path:name), so targets spread over the project
            cands.sort(key=lambda f: zlib.crc32(f"{f.path}:{f.name}".encode()))
            projects[root.name] = (files, cands, {})
    tasks = []
    for n in lengths:
        for i in range(n_docs):
            root = roots[i % len(roots)]
            files, cands, token_cache = projects[root.name]
            slice_ = i // len(roots)
            if slice_ >= len(cands):
                raise ValueError(f"project {root.name} has {len(cands)} usable functions; n_docs={n_docs} needs "
                                 f"{slice_ + 1}: lower n_docs")
            target = cands[slice_]
            tasks.append(_task(tokenizer, bos, root.name, files, token_cache, target, n, slice_, reference_tokens))
    return tasks


def _task(tokenizer, bos: list[int], project: str, files: dict[str, str], token_cache: dict, target: Function,
          n: int, slice_: int, reference_tokens: int) -> CodeTask:
    tail = _encode(tokenizer, f"\n# file: {target.path}\n{target.opening}")
    budget = n - len(bos) - len(tail)
    others = [p for p in files if p != target.path]
    lib = [p for p in others if not p.startswith(TEST_DIRS)]
    order = lib + [p for p in others if p.startswith(TEST_DIRS)]
    shift = (slice_ * len(lib)) // 3 if lib else 0  # distinct slices start elsewhere in the library
    order = order[shift:len(lib)] + order[:shift] + order[len(lib):]
    pieces, counted, whole = [], 0, []
    for p in order:  # whole files while they fit, then the one that crosses the budget (and a spare)
        if p not in token_cache:
            token_cache[p] = len(_encode(tokenizer, f"# file: {p}\n{files[p]}\n"))
        if counted > budget:
            pieces.append(p)
            break
        counted += token_cache[p]
        pieces.append(p)
        if counted <= budget:
            whole.append(p)
    context = _encode(tokenizer, "".join(f"# file: {p}\n{files[p]}\n" for p in pieces))
    if len(context) < budget:
        raise ValueError(f"project {project} has {len(context)} tokens of context besides {target.path}, fewer "
                         f"than the {budget} a {n}-token prompt needs: use shorter lengths")
    context = context[:budget]  # the file crossing the budget is cut at a token
    ref = _encode(tokenizer, target.reference)[:reference_tokens]
    return CodeTask(
        id=f"{project}/{slice_}", project=project, length=n, prompt_ids=bos + context + tail, reference_ids=ref,
        meta={"target_file": target.path, "function": target.name, "lineno": target.lineno,
              "context_files": whole, "partial_file": pieces[len(whole)], "opening": target.opening,
              "reference": target.reference})
