"""What one long prompt does to the requests around it. Prints; asserts nothing.

Runs the engine in-process (no HTTP).
- A prompt of N tokens, then 0.5 s later a short request; prints both requests' time to first token and the
  short one's total, for each chunk size given (a chunk at least as long as the prompt prefills it in one
  piece, as without chunking). Run: python -m app.bench.long_prompt --tokens 4000 --chunks 100000 512
- `--short K`: a prompt of N tokens that then decodes, and K short requests (20-token prompts, 64 new
  tokens) arriving while it runs; prints how many rows decoded together while the short ones ran and
  their time to finish, against the same K requests without the long one (the ragged cache charges each
  row its own tokens; the rectangular one it replaced fitted only max_batch_tokens / (N + new) rows).
  Run: python -m app.bench.long_prompt --tokens 6000 --short 31
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace

from app.config import Settings
from app.engine.engine import Engine
from app.engine.types import GenerationRequest, TokenDelta
from app.models.loading.loader import load_model
from app.startup import engine_limits, warm_up


async def timed(engine: Engine, request: GenerationRequest, delay: float) -> tuple[float, float]:
    """(seconds to the first token, seconds to the end) from the request's submission."""
    await asyncio.sleep(delay)
    started = time.perf_counter()
    first = None
    async for event in await engine.submit(request):
        if first is None and isinstance(event, TokenDelta):
            first = time.perf_counter() - started
    return first or 0.0, time.perf_counter() - started


async def main(model: str, tokens: int, chunks: list[int]) -> None:
    settings = Settings(model=model)
    loaded = load_model(settings)
    long_ids = [(i * 7919) % 20000 + 100 for i in range(tokens)]  # any ids: only the length matters here
    for chunk in chunks:
        engine = Engine(loaded.model, loaded.tokenizer, replace(engine_limits(settings), prefill_chunk_tokens=chunk),
                        context_length=loaded.info.context_length, eos_token_ids=loaded.info.eos_token_ids)  # fmt: skip
        engine.start()
        try:
            await warm_up(engine)
            (long_first, _), (short_first, short_done) = await asyncio.gather(
                timed(engine, GenerationRequest(prompt=long_ids, max_new_tokens=4, ignore_eos=True), 0.0),
                timed(engine, GenerationRequest(prompt="Write a haiku about the sea.", max_new_tokens=16,
                                                ignore_eos=True), 0.5),
            )  # fmt: skip
        finally:
            engine.stop()
        print(f"chunk {chunk:>6}: {tokens}-token prompt first token {long_first:.2f}s; short request (0.5 s later, "
              f"16 tokens) first token {short_first:.2f}s, done {short_done:.2f}s", flush=True)  # fmt: skip


async def crowd(model: str, tokens: int, short: int) -> None:
    settings = Settings(model=model)
    loaded = load_model(settings)
    long_ids = [(i * 7919) % 20000 + 100 for i in range(tokens)]
    prompts = [[(i * 104729 + j * 7) % 20000 + 100 for j in range(20)] for i in range(short)]  # fresh, 20 tokens
    for with_long in (False, True):
        engine = Engine(loaded.model, loaded.tokenizer, engine_limits(settings),
                        context_length=loaded.info.context_length, eos_token_ids=loaded.info.eos_token_ids,
                        threads=loaded.info.threads)  # fmt: skip
        engine.start()
        try:
            await warm_up(engine)
            before = engine.stats().batch_sizes
            jobs = [timed(engine, GenerationRequest(prompt=p, max_new_tokens=64, ignore_eos=True), 0.5 if with_long
                          else 0.0) for p in prompts]  # fmt: skip
            if with_long:
                jobs.append(timed(engine, GenerationRequest(prompt=long_ids, max_new_tokens=256, ignore_eos=True), 0.0))
            results = await asyncio.gather(*jobs)
            sizes = engine.stats().batch_sizes - before
        finally:
            engine.stop()
        done = sorted(total for _, total in results[:short])
        widest = max(sizes) if sizes else 0
        steps = sum(sizes.values())
        mean = sum(k * v for k, v in sizes.items()) / steps if steps else 0.0
        label = f"with a {tokens}-token prompt decoding" if with_long else "alone"
        long = f"; the long prompt's first token {results[-1][0]:.2f}s, done {results[-1][1]:.2f}s" if with_long else ""
        print(f"{short} short requests {label}: done after {done[len(done) // 2]:.2f}s (median) / {done[-1]:.2f}s "
              f"(last); decode steps {steps}, rows per step mean {mean:.1f}, most {widest}{long}",
              flush=True)  # fmt: skip


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=4000, help="length of the long prompt")
    parser.add_argument("--chunks", type=int, nargs="+", default=[100000, 512], help="chunk sizes to compare")
    parser.add_argument("--short", type=int, default=0, help="this many short requests around a decoding long one")
    args = parser.parse_args()
    if args.short:
        asyncio.run(crowd(args.model, args.tokens, args.short))
    else:
        asyncio.run(main(args.model, args.tokens, args.chunks))


if __name__ == "__main__":
    cli()
