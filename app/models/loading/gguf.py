"""GGUF files (llama.cpp, Ollama, LM Studio) into the store, once.

The architectures app/models/loading/gguf_weights.py builds (Llama, Qwen2, Gemma, GPT-2 and their kin) are served
from the file itself: `describe` writes only what its metadata says as Hugging Face files (config, generation
config, tokenizer with its chat template), which load in a second where parsing a 151k-token vocabulary out of
the file takes ~20. Other architectures are converted: transformers' GGUF loader dequantizes the tensors to fp32,
saved as safetensors (`convert`). Everything that can be known before either is checked first, each with one
line that says what to do: the file is a readable GGUF, its architecture is one we serve or transformers
converts, and the store's disk holds what will be written.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# what a saved folder takes besides the fp32 weights (tokenizer files, config), generously
OVERHEAD_BYTES = 64 * 2**20


class GgufError(Exception):
    """The file cannot be converted; the message says why, in one line."""


@dataclass(frozen=True)
class GgufHeader:
    architecture: str
    name: str
    parameters: int  # elements of every tensor in the file (a tied output layer is stored once)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.parameters


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def read_header(path: Path) -> GgufHeader:
    """The file's architecture, name and size, from its metadata (no tensor is read)."""
    from app.models.loading.gguf_weights import index

    try:
        fields, tensors = index(path)
        architecture = str(fields["general.architecture"])
        name = str(fields.get("general.name", path.stem))
        parameters = sum(t.elements for t in tensors)
    except KeyError as exc:
        raise GgufError(f"{path} is not a usable GGUF file: its metadata has no {exc}") from None
    except Exception as exc:  # a truncated or foreign file: struct, numpy, unicode or value errors
        raise GgufError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    return GgufHeader(architecture, name, parameters)


def direct(header: GgufHeader) -> bool:
    """Whether the file is served from its own tensors (app/models/loading/gguf_weights.py), not converted."""
    from app.models.loading.gguf_weights import DIRECT

    return header.architecture in DIRECT


def describe(path: Path, out: Path) -> None:
    """The file's config, generation config and tokenizer (with its chat template), from its metadata, into `out`."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise GgufError(f"transformers could not read {path.name}'s metadata ({type(exc).__name__}: {first})") from None
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)


def check(path: Path, header: GgufHeader, into: Path) -> None:
    """Refuse what the conversion would fail on, before it starts."""
    # llama.cpp's names for some architectures differ from transformers' (see load_gguf_checkpoint)
    aliases = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
    known = supported_architectures()
    if header.architecture not in known and aliases.get(header.architecture) not in known:
        raise GgufError(f"{path}: architecture '{header.architecture}' is not one transformers' GGUF loader "
                        f"converts ({', '.join(known)})")  # fmt: skip
    need = header.fp32_bytes + OVERHEAD_BYTES
    free = shutil.disk_usage(into).free
    if free < need:
        raise GgufError(f"converting {path.name} needs {need / 2**30:.1f} GiB in {into} (fp32 weights), "
                        f"{free / 2**30:.1f} GiB are free; free space or set TEXTGEN_MODEL_STORE")  # fmt: skip


def convert(path: Path, out: Path) -> int:
    """Dequantize `path` to fp32 safetensors + tokenizer in `out`; return the parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    header = read_header(path)
    check(path, header, out)
    log.info("dequantizing %s (%s, %s) to fp32 safetensors", path.name, header.architecture, header.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0]
        raise GgufError(f"transformers could not convert {path.name} ({type(exc).__name__}: {first})") from None
    # The GGUF quantizer marks the model as non-serializable; the weights are plain fp32 by now.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())
