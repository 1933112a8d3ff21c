"""Loads a model from the store onto a device: device, dtype, threads, and the facts the server reports."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from app.config import Settings
from app.models.layers.attention import use_decode_attention
from app.models.loading import gguf_weights
from app.models.loading.store import Located, ModelStore, StoreError, display_name
from app.models.numerics import group_quant, modes
from app.models.numerics.levels import materialize

log = logging.getLogger(__name__)

DEFAULT_THREADS = torch.get_num_threads()


@dataclass(frozen=True)
class ModelInfo:
    name: str
    source: str
    path: str
    architecture: str
    parameters: int
    device: str
    dtype: str
    numerics: str  # what runs the products: "int8-w8a8-per-row+bf16", "bf16-packed", "fp32-packed", ...
    threads: int  # torch intra-op threads the model runs with (the engine's thread sets them for itself)
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    has_chat_template: bool


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel (causal LM)
    tokenizer: Any  # a transformers PreTrainedTokenizerFast
    info: ModelInfo


def resolve_device(setting: str) -> torch.device:
    if setting == "cuda" and not torch.cuda.is_available():
        raise StoreError("TEXTGEN_DEVICE=cuda but no CUDA device is visible; use TEXTGEN_DEVICE=cpu or auto")
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """The dtype the model's weights load in: on CPU always fp32 unless asked (app/models/numerics/modes.py
    converts the linear layers after loading)."""
    if setting != "auto":
        return modes.DTYPES[setting]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def locate_or_pull(store: ModelStore, name: str, pull_missing: bool) -> Located:
    located = store.locate(name)
    if located is not None:
        return located
    if not pull_missing:
        raise StoreError(f"model '{name}' is not in {store.root}; run: textgen pull {name}")
    log.info("model %s is not in %s; pulling it", name, store.root)
    return store.pull(name)


def context_length(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.append(value)
        elif isinstance(value, list):
            ids.extend(int(v) for v in value)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))


def load_model(settings: Settings) -> LoadedModel:
    """Load (and convert) the model on a short-lived thread of its own, so that the caller's thread never
    starts a pool of torch (OpenMP) worker threads.

    Why: with GNU OpenMP every thread that runs a parallel op keeps a pool of workers, and once more worker
    threads live than the CPU has cores, all pools stop spin-waiting between ops and sleep instead. The
    model runs thousands of small ops a step, each then pays a wake-up: a one-row SmolLM2 decode step took
    38 ms on a second thread against 26 ms on the first (2 cores, 2 torch threads). The engine's thread is
    the one that runs the model, so it must be the only live pool; a pool dies with its thread."""
    result: list[LoadedModel] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            result.append(_load(settings))
        except BaseException as exc:  # re-raised on the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=run, name="textgen-load")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    return result[0]


def _load(settings: Settings) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    store = ModelStore(settings.model_store)
    name = settings.model or store.default_model()
    located = locate_or_pull(store, name, settings.pull_missing)
    if settings.verify_weights:
        store.verify(located)
    device = resolve_device(settings.device)
    mode = modes.choose(device, settings.dtype, settings.quantize, settings.pack_weights,
                           modes.cpu_features(settings.cpu_features), resolve_dtype("auto", device))  # fmt: skip
    if mode.fallback:
        log.warning("numerics: %s", mode.fallback)
    dtype = mode.load_dtype
    # torch's own default, read before any engine set its caller's thread to one (app/engine/engine.py)
    torch.set_num_threads(settings.threads or DEFAULT_THREADS)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(located.path)
    with ExitStack() as held:
        if located.gguf is not None:  # the file's own blocks (gguf_weights.py), open until every layer is built
            fd = held.enter_context(located.gguf.open("rb")).fileno()
            model: Any = gguf_weights.build(located.gguf, fd, AutoConfig.from_pretrained(located.path))
            parameters = located.manifest.parameters if located.manifest else 0
            if not (settings.pack_weights and device.type == "cpu"):  # the stock model, and the GPU: float weights
                materialize(model)
                model.to(device=device, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(located.path, dtype=dtype).to(device)  # type: ignore[arg-type]
            parameters = sum(p.numel() for p in model.parameters())  # counted before packing hides the weights
        model.eval()
        model.requires_grad_(False)
        if settings.pack_weights and device.type == "cpu":
            mode = modes.apply(model, tokenizer, mode)
        materialize(model)  # none is left where a mode ran; a mode that does not run (cuda...) needs float weights

    # the CPU fast paths go together: `pack_weights=False` gives the stock model (baselines, references)
    fast_attention = settings.pack_weights and use_decode_attention(model)
    info = ModelInfo(
        name=display_name(name),
        source=located.source,
        path=str(located.path),
        architecture=type(model).__name__,
        parameters=parameters,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        numerics=mode.name,
        threads=torch.get_num_threads(),
        context_length=context_length(model.config),
        vocab_size=int(model.config.vocab_size),
        eos_token_ids=eos_ids(model, tokenizer),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )
    kernel = group_quant.load() if mode.own_kernel else None  # its instruction set: avx2, avx512-vnni, +amx
    log.info(
        "loaded %s (%s, %.1fM parameters) on %s, numerics %s%s%s in %.1fs, %d torch threads",
        name, info.architecture, parameters / 1e6, info.device, info.numerics,
        f" (kernel {kernel.isa})" if kernel is not None else "", " (decode attention)" if fast_attention else "",
        time.perf_counter() - started, torch.get_num_threads(),
    )  # fmt: skip
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
