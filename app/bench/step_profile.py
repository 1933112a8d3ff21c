"""`python -m app.bench.step_profile`: where a decode step's time goes, by kind of work. Prints; asserts nothing.

Runs the real engine in-process on the model the server would load (settings from the environment:
`TEXTGEN_QUANTIZE=int8 python -m app.bench.step_profile` profiles the int8 mode), fills its batch with
`--rows` requests (fresh random prompts of 110-170 tokens, `ignore_eos`), and once every row decodes,
profiles `--steps` steps on the engine's own thread with torch.profiler. Each step is split into:
linear layers (the matrix-product kernels of every numeric mode), attention (the ragged C kernel, or the
torch path's matmuls and softmax), sampling, output (detokenization, stop strings, events), and the rest (small
tensor ops between them, Python, scheduling). Elementwise: the model's own arithmetic between the products
(norms, rotary, SwiGLU, residual adds: the torch ops of ELEMENTWISE_OPS). Where the step runs its layers in one
C call (the int4 x int8 mode: app/models/layers/native_step.py) the profiler sees none of that loop, which times its
own linears, attention and elementwise work.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from app.config import Settings
from app.engine import executor as executor_module
from app.engine.engine import Engine
from app.engine.types import GenerationRequest
from app.models.layers.ragged_attention import PROFILE_NAME
from app.models.loading.loader import load_model
from app.models.numerics.group_quant import PROFILE_NAME as GROUP_PROFILE_NAME
from app.startup import engine_limits

LINEAR_OPS = ("_linear_pointwise", "qlinear_pointwise", "_int_mm", "_weight_int4pack_mm", "aten::mm", "aten::addmm",
              GROUP_PROFILE_NAME)  # fmt: skip
ATTENTION_OPS = ("aten::bmm", "aten::_softmax", PROFILE_NAME)  # the torch path's ops, the ragged C kernel
# the model's own arithmetic between the products on the Python path: RMSNorm (pow, mean, add, rsqrt, mul),
# rotary (mul, neg, cat, add), SwiGLU (silu, mul), the residual adds
ELEMENTWISE_OPS = ("aten::mul", "aten::add", "aten::pow", "aten::mean", "aten::rsqrt", "aten::neg", "aten::cat",
                   "aten::silu")  # fmt: skip


def _labelled(name: str, work: Callable[..., Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        with record_function(name):
            return work(*args, **kwargs)

    return run


async def _fill(engine: Engine, rows: int, new_tokens: int, seed: int) -> list[asyncio.Task[None]]:
    rng = random.Random(seed)
    vocab = int(engine.model.config.vocab_size)

    async def one() -> None:
        ids = [rng.randrange(100, vocab - 100) for _ in range(rng.randint(110, 170))]
        request = GenerationRequest(prompt=ids, max_new_tokens=new_tokens, ignore_eos=True)
        async for _ in await engine.submit(request):
            pass

    return [asyncio.ensure_future(one()) for _ in range(rows)]


def _wait_for_rows(engine: Engine, rows: int, timeout: float = 300) -> None:
    """Until every request has been prefilled and decodes, then a few plain steps more."""
    deadline = time.monotonic() + timeout
    while engine.stats().running_rows < rows and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)


def _time_steps(engine: Engine, steps: int) -> tuple[float, Any, float, list[float]]:
    """On the engine's own thread: the mean seconds of its next `steps` steps, then a profile of `steps` more
    (profiling adds a little to every op) and their mean seconds; and where the step runs its layers in one C
    call (app/models/layers/native_step.py), that loop's own seconds of linears, attention and elementwise work over
    the profiled steps (the profiler sees none of it)."""
    native = getattr(engine.model_runner.step, "native", None)
    times = torch.zeros(3, dtype=torch.float64)
    original = engine.step
    plain: list[float] = []
    profiled: list[float] = []
    prof = profile(activities=[ProfilerActivity.CPU])
    finished = threading.Event()

    def step() -> None:
        if len(plain) < steps:
            started = time.perf_counter()
            original()
            plain.append(time.perf_counter() - started)
            return
        if not profiled:
            prof.start()
            if native is not None:
                native.times = times
        started = time.perf_counter()
        original()
        profiled.append(time.perf_counter() - started)
        if len(profiled) == steps:
            prof.stop()
            if native is not None:
                native.times = None
            engine.step = original  # type: ignore[method-assign]
            finished.set()

    engine.step = step  # type: ignore[method-assign]
    finished.wait(600)
    return sum(plain) / steps, prof, sum(profiled) / steps, times.tolist()


def report(plain_s: float, prof: Any, profiled_s: float, steps: int, rows: int, numerics: str, top: int,
           native: list[float]) -> None:  # fmt: skip
    # microseconds over the profiled steps; `native`: seconds inside the C layer loop (none outside it)
    totals: dict[str, float] = {"linears": native[0] * 1e6, "attention": native[1] * 1e6, "sampling": 0.0,
                                "output": 0.0}  # fmt: skip
    totals["elementwise"] = native[2] * 1e6  # the C loop's norms, rotary and SwiGLU, or the torch ops' below
    inside = {"sampling", "output"}
    rest: list[tuple[float, str, int]] = []
    for event in prof.key_averages():
        name = event.key
        if any(op in name for op in LINEAR_OPS):
            totals["linears"] += event.self_cpu_time_total
        elif name in ATTENTION_OPS:
            totals["attention"] += event.self_cpu_time_total
        elif name in inside:  # the ops inside a scope count with it
            totals[name] += event.cpu_time_total
        elif name in ELEMENTWISE_OPS:  # (those inside sampling count there too: a small overlap)
            totals["elementwise"] += event.self_cpu_time_total
        elif name.startswith("aten::"):
            rest.append((event.self_cpu_time_total, name, event.count))
    step_ms = profiled_s * 1e3
    parts = {k: v / steps / 1e3 for k, v in totals.items()}
    parts["the rest"] = max(0.0, step_ms - sum(parts.values()))
    print(f"decode step, {rows} rows, {numerics}: {plain_s * 1e3:.1f} ms (mean of {steps} steps); "
          f"{step_ms:.1f} ms profiled:")  # fmt: skip
    for name, ms in parts.items():
        print(f"  {name:12} {ms:7.1f} ms  {100 * ms / step_ms:5.1f}%")
    if top:  # the small ops of "the rest" (some run inside sampling / output too), by self time
        print("largest ops besides linears and attention, per step (self time, calls):")
        for us, name, count in sorted(rest, reverse=True)[:top]:
            print(f"  {name:28} {us / steps / 1e3:6.2f} ms {count // steps:6d}")


def start_engine() -> tuple[Any, Engine]:
    """The model the server would load (settings from the environment) and a started in-process engine on it."""
    settings = Settings()
    loaded = load_model(settings)
    engine = Engine(loaded.model, loaded.tokenizer, engine_limits(settings), context_length=loaded.info.context_length,
                    eos_token_ids=loaded.info.eos_token_ids, threads=loaded.info.threads)  # fmt: skip
    engine.start()
    return loaded, engine


async def main(args: argparse.Namespace) -> None:
    loaded, engine = start_engine()
    executor_module.sample = _labelled("sampling", executor_module.sample)  # type: ignore[attr-defined]
    engine.output.accept = _labelled("output", engine.output.accept)  # type: ignore[method-assign]
    try:
        tasks = await _fill(engine, args.rows, args.steps + 200, args.seed)
        await asyncio.to_thread(_wait_for_rows, engine, args.rows)
        plain, prof, profiled, native = await asyncio.to_thread(_time_steps, engine, args.steps)
        report(plain, prof, profiled, args.steps, engine.stats().running_rows, loaded.info.numerics, args.top,
               native)  # fmt: skip
        for t in tasks:
            t.cancel()
    finally:
        engine.stop()


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top", type=int, default=10, help="list this many of the other ops")
    asyncio.run(main(parser.parse_args()))
