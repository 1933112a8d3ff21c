"""The two baselines the benchmark compares the engine with, as minimal FastAPI servers.

- sequential: the usual FastAPI + one `model.generate` per request, one at a time.
- static: batch whatever is waiting, `generate` until the longest request of the batch is done.

Both speak the subset of /generate the benchmark uses (prompt, max_new_tokens, ignore_eos) and answer
non-streaming. They load the stock transformers model, as such a server would; `--packed` gives them
textgen's prepacked CPU weights too (app/models/numerics/packing.py), to compare the scheduling alone.
Run: python -m app.bench.baselines.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

from app.config import Settings
from app.engine.memory import device_memory
from app.models.loading.loader import LoadedModel, load_model


class Body(BaseModel):
    prompt: str
    max_new_tokens: int = 64
    ignore_eos: bool = False
    stream: bool = False


@dataclass
class Pending:
    body: Body
    done: asyncio.Future[dict[str, Any]] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def _generate(lm: LoadedModel, prompts: list[str], max_new: int, ignore_eos: bool) -> tuple[list[list[int]], list[int]]:
    """One left-padded `generate` call; returns each row's new ids and each prompt's length."""
    encoded = [lm.tokenizer.encode(p) for p in prompts]
    width = max(len(e) for e in encoded)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.info.eos_token_ids[0]
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)  # (B, P)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)  # (B, P)
    for i, e in enumerate(encoded):
        ids[i, width - len(e) :] = torch.tensor(e)
        mask[i, width - len(e) :] = 1
    extra = {"eos_token_id": None} if ignore_eos else {}
    with torch.inference_mode():
        out = lm.model.generate(input_ids=ids.to(lm.model.device), attention_mask=mask.to(lm.model.device),
                                do_sample=False, max_new_tokens=max_new, pad_token_id=pad, **extra)  # fmt: skip
    return [row[width:].tolist() for row in out], [len(e) for e in encoded]


def _answer(lm: LoadedModel, ids: list[int], max_new: int, prompt_tokens: int) -> dict[str, Any]:
    ids = ids[:max_new]
    eos = set(lm.info.eos_token_ids)
    if any(t in eos for t in ids):  # static batches run past a row's EOS: cut there
        ids = ids[: next(i for i, t in enumerate(ids) if t in eos) + 1]
    text = lm.tokenizer.decode(ids, skip_special_tokens=True)
    return {"generations": [{"text": text, "completion_tokens": len(ids)}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids)}}  # fmt: skip


def _ready(lm: LoadedModel) -> dict[str, Any]:
    """/ready, with what the device holds (the benchmark's GPU memory column; zeros on CPU)."""
    memory = device_memory(next(lm.model.parameters()).device)
    return {"status": "ready", "device_memory_peak_bytes": memory.peak_allocated_bytes}


def sequential_app(lm: LoadedModel) -> FastAPI:
    app = FastAPI()
    lock = asyncio.Lock()

    @app.get("/ready")
    async def ready() -> dict[str, Any]:
        return _ready(lm)

    @app.post("/generate")
    async def generate(body: Body) -> dict[str, Any]:
        async with lock:
            (ids,), (n,) = await asyncio.to_thread(_generate, lm, [body.prompt], body.max_new_tokens, body.ignore_eos)
        return _answer(lm, ids, body.max_new_tokens, n)

    return app


def static_app(lm: LoadedModel, max_batch: int) -> FastAPI:
    app = FastAPI()
    queue: asyncio.Queue[Pending] = asyncio.Queue()

    async def batcher() -> None:
        while True:
            batch = [await queue.get()]
            while not queue.empty() and len(batch) < max_batch:
                batch.append(queue.get_nowait())
            longest = max(p.body.max_new_tokens for p in batch)
            ignore_eos = all(p.body.ignore_eos for p in batch)
            try:
                outs, lens = await asyncio.to_thread(_generate, lm, [p.body.prompt for p in batch], longest, ignore_eos)
            except Exception as exc:  # pragma: no cover - a benchmark helper
                for p in batch:
                    p.done.set_exception(exc)
                continue
            for p, ids, n in zip(batch, outs, lens, strict=True):
                p.done.set_result(_answer(lm, ids, p.body.max_new_tokens, n))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(batcher())
        yield
        task.cancel()

    app.router.lifespan_context = lifespan

    @app.get("/ready")
    async def ready() -> dict[str, Any]:
        return _ready(lm)

    @app.post("/generate")
    async def generate(body: Body) -> dict[str, Any]:
        pending = Pending(body)
        await queue.put(pending)
        return await pending.done

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--system", choices=["sequential", "static"], required=True)
    parser.add_argument("--model")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--packed", action="store_true", help="prepacked CPU weights, as textgen's engine uses")
    args = parser.parse_args()
    settings = Settings(pack_weights=args.packed, **({"model": args.model} if args.model else {}))
    lm = load_model(settings)
    app = sequential_app(lm) if args.system == "sequential" else static_app(lm, args.max_batch)
    started = time.perf_counter()
    _generate(lm, ["Hello"], 4, True)  # warm-up, as the server does
    print(f"warm-up {time.perf_counter() - started:.1f}s", flush=True)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
