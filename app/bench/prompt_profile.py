"""`python -m app.bench.prompt_profile`: where a burst of prompts' prefill time goes. Prints; asserts nothing.

W1's first 32 requests arrive together, and the last of them waits for the others' prefills: that burst sets
TTFT p95. This runs the real engine in-process on the model the server would load (settings from the
environment: `TEXTGEN_QUANTIZE=int4`), warms it with a few other prompts, then submits W1's first `--prompts`
prompts at once (max_new_tokens 1) and times the burst: every written-out prompt group, and inside them the C
kernels (linears, prompt attention), the elementwise ops, the cache writes, the prefix cache and the first
tokens. Wall-clock timers around each call (no profiler: its overhead is larger than the calls).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from app.bench.runner import workload
from app.bench.step_profile import start_engine
from app.engine import executor as executor_module
from app.engine.kv_cache import RaggedCache
from app.engine.model_runner import ModelRunner
from app.engine.prefix_cache import PrefixCache
from app.engine.types import GenerationRequest
from app.models.kernels import compiled
from app.models.numerics import elementwise

seconds: defaultdict[str, float] = defaultdict(float)


def _timed(owner: Any, name: str, label: str) -> None:
    work: Callable[..., Any] = getattr(owner, name)

    def run(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return work(*args, **kwargs)
        finally:
            seconds[label] += time.perf_counter() - started

    setattr(owner, name, run)


def _instrument() -> None:
    call = compiled.call

    def timed_call(name: str, fn: Callable[..., None], *args: object) -> None:
        started = time.perf_counter()
        call(name, fn, *args)
        seconds[name] += time.perf_counter() - started

    compiled.call = timed_call  # the kernels' modules call it through the module: every C kernel
    for op in ("add_rms_norm", "rope_split", "silu_mul"):
        _timed(elementwise.Elementwise, op, "elementwise")
    _timed(RaggedCache, "put", "cache writes")
    _timed(PrefixCache, "store", "prefix cache")
    _timed(executor_module.StepExecutor, "_start", "first tokens")
    _timed(ModelRunner, "prefill_group", "prompt groups")


async def main(args: argparse.Namespace) -> None:
    loaded, engine = start_engine()
    jobs = workload(64, args.seed, (20, 200), (16, 128))  # W1's workload (app/bench/runner.py)
    tokenizer = loaded.tokenizer

    async def one(prompt: str) -> None:
        async for _ in await engine.submit(GenerationRequest(prompt=prompt, max_new_tokens=1, ignore_eos=True)):
            pass

    try:
        await asyncio.gather(*(one(j.prompt) for j in jobs[-8:]))  # warm-up: other prompts (no prefix hits)
        _instrument()
        burst = [j.prompt for j in jobs[: args.prompts]]
        tokens = sum(len(tokenizer(p).input_ids) for p in burst)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in burst))
        wall = time.perf_counter() - started
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    finally:
        engine.stop()
    print(f"{args.prompts} prompts at once ({tokens} tokens), {loaded.info.numerics}, {loaded.info.threads} "
          f"threads: {wall:.2f} s to the last first token ({tokens / wall:.0f} prompt tokens/s), "
          f"{faults} page faults (memory mapped afresh)")  # fmt: skip
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"  {name:28} {s:6.3f} s  {100 * s / wall:5.1f}%")


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
