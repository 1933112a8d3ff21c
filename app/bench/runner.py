"""The benchmark: N concurrent HTTP clients send a seeded mixed workload and we measure what they see.

Workload (defaults): 64 requests, prompts of 20-200 tokens, max_new_tokens 16-128, 32 in flight, greedy
with ignore_eos so every system generates exactly the same number of tokens.
`--compare` starts each system itself (textgen's engine and the two baselines in app/bench/baselines.py)
on the same model, one after the other, and reads each server's peak RSS from /proc. With `--modes` the engine
runs once per numeric mode, the modes side by side in rounds (`compare_modes`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from app.bench import llama_cpp

TEXT = (
    "The history of the river town begins with a ferry crossing, a mill and a handful of farms along the "
    "northern bank. Over three centuries the settlement grew into a market centre, then an industrial city "
    "whose brick warehouses still line the water. Engineers built a stone bridge in the eighteenth century, "
    "and the arrival of the railway brought textile factories, workers from the surrounding valleys and a "
    "rapid expansion of housing. The twentieth century saw decline as the mills closed, followed by a slow "
    "renewal in which the old docks became offices, museums and apartments. Today the town is known for its "
    "festivals, its university and a football club that has spent most of its existence in the lower divisions. "
)
WORDS_PER_TOKEN = 0.75  # English prose with GPT-2-style BPE


@dataclass(frozen=True)
class Job:
    prompt: str
    max_new_tokens: int


@dataclass
class Result:
    ok: bool
    status: int
    ttft: float
    latency: float
    completion_tokens: int


def workload(n: int, seed: int, prompt_tokens: tuple[int, int], new_tokens: tuple[int, int]) -> list[Job]:
    rng = random.Random(seed)
    words = TEXT.split()
    jobs = []
    for _ in range(n):
        count = max(1, int(rng.randint(*prompt_tokens) * WORDS_PER_TOKEN))
        start = rng.randrange(len(words))
        prompt = " ".join(words[(start + i) % len(words)] for i in range(count))
        jobs.append(Job(prompt, rng.randint(*new_tokens)))
    return jobs


def one_stream_jobs(seed: int, new_tokens: int = 128) -> list[Job]:
    """One request at a time: a short fresh prompt, `new_tokens` generated (ignore_eos): tokens/s of one user.
    Three of them, so the figure is not one request's noise."""
    return [Job(j.prompt, new_tokens) for j in workload(3, seed + 1, (20, 40), (new_tokens, new_tokens))]


# --constrained: the same jobs, each answer held to this small schema (one free string: it runs as long as the
# model writes it, up to max_new_tokens, as the unconstrained answers do)
BENCH_SCHEMA = {"type": "object", "properties": {"topic": {"enum": ["news", "science", "sport", "other"]},
                                                 "text": {"type": "string"}},
                "required": ["topic", "text"], "additionalProperties": False}  # fmt: skip


async def _one(session: Any, url: str, job: Job, stream: bool, constraint: dict[str, Any] | None = None,
               peer: bool = False) -> Result:  # fmt: skip
    """One request through an aiohttp `session`, timed: status, time to the first token event, tokens. `peer`: the
    server is llama.cpp's (its /completion, app/bench/llama_cpp.py)."""
    import aiohttp

    if peer:
        return await _one_peer(session, url, job)
    body: dict[str, Any] = {"prompt": job.prompt, "max_new_tokens": job.max_new_tokens, "ignore_eos": True,
                            "stream": stream}  # fmt: skip
    if constraint is not None:
        body["constraint"] = constraint
    started = time.perf_counter()
    ttft = None
    tokens = 0
    try:
        async with session.post(f"{url}/generate", json=body) as r:
            status = r.status
            if stream:
                async for line in r.content:  # SSE: one `data: {...}` line per event
                    if not line.startswith(b"data: "):
                        continue
                    event = json.loads(line[6:])
                    if event["type"] == "token" and ttft is None:
                        ttft = time.perf_counter() - started
                    elif event["type"] == "done":
                        tokens = event["usage"]["completion_tokens"]
                    elif event["type"] == "error":
                        return Result(False, event.get("status", 500), 0, time.perf_counter() - started, 0)
            elif status == 200:
                tokens = (await r.json())["usage"]["completion_tokens"]
    except (TimeoutError, aiohttp.ClientError):
        return Result(False, 0, 0, time.perf_counter() - started, 0)
    latency = time.perf_counter() - started
    return Result(status == 200, status, ttft if ttft is not None else latency, latency, tokens)


async def _one_peer(session: Any, url: str, job: Job) -> Result:
    """One job through llama.cpp's /completion, always streamed (the time to its first token event)."""
    import aiohttp

    started = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with session.post(f"{url}/completion", json=llama_cpp.body(job.prompt, job.max_new_tokens)) as r:
            status = r.status
            async for line in r.content:
                text, count = llama_cpp.event(line)
                if text and ttft is None:
                    ttft = time.perf_counter() - started
                if count is not None:
                    tokens = count
    except (TimeoutError, aiohttp.ClientError):
        return Result(False, 0, 0, time.perf_counter() - started, 0)
    latency = time.perf_counter() - started
    return Result(status == 200, status, ttft if ttft is not None else latency, latency, tokens)


async def drive(url: str, jobs: list[Job], concurrency: int, stream: bool, constraint: dict[str, Any] | None = None,
                peer: bool = False) -> tuple[list[Result], float]:  # fmt: skip
    """`jobs` against `url`, `concurrency` at a time. The client is aiohttp: on two cores it shares the CPU with
    the server it measures, and per W1 run (~5,000 token events) httpx's client took 0.63-0.72 s of CPU, aiohttp's
    0.21-0.25 s (docs/benchmarks.md)."""
    try:
        import aiohttp
    except ImportError:
        raise SystemExit("textgen bench needs aiohttp: pip install 'textgen[bench]'") from None
    gate = asyncio.Semaphore(concurrency)
    # llama-server closes a kept-alive connection after a stream, so the next request on it fails: a fresh one each
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=peer)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3600)) as session:

        async def gated(job: Job) -> Result:
            async with gate:
                return await _one(session, url, job, stream, constraint, peer)

        started = time.perf_counter()
        results = await asyncio.gather(*(gated(j) for j in jobs))
        return list(results), time.perf_counter() - started


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(name: str, results: list[Result], wall: float, rss_mb: float | None,
              gpu_mb: float | None = None) -> dict[str, object]:  # fmt: skip
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    row: dict[str, object] = {
        "system": name,
        "ok": f"{len(ok)}/{len(results)}",
        "gen tokens": tokens,
        "wall s": round(wall, 1),
        "tok/s": round(tokens / wall, 1),
        "req/s": round(len(ok) / wall, 2),
        "TTFT p50": round(statistics.median([r.ttft for r in ok]), 2) if ok else None,
        "TTFT p95": round(_pct([r.ttft for r in ok], 0.95), 2),
        "lat p50": round(statistics.median([r.latency for r in ok]), 2) if ok else None,
        "lat p95": round(_pct([r.latency for r in ok], 0.95), 2),
        "peak RSS MB": None if rss_mb is None else round(rss_mb),
    }
    if gpu_mb:  # a CUDA server: what its caching allocator's tensors took at most
        row["peak GPU MB"] = round(gpu_mb)
    return row


def print_table(rows: list[dict[str, object]]) -> None:
    cols = list(dict.fromkeys(c for r in rows for c in r))
    widths = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in cols}
    print("  ".join(c.rjust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c)).rjust(widths[c]) for c in cols))


def print_engine_time(url: str, wall: float, before: dict[str, float] | None = None) -> None:
    """Where the engine's time went, from its own counters in /info: since `before` (what `_engine_counters` read
    then), or since the server's warm-up."""
    try:
        e = _engine_counters(url)
    except (httpx.HTTPError, KeyError, ValueError):
        return
    d = {k: e[k] - (before or {}).get(k, 0) for k in ("decode_seconds", "prefill_seconds", "busy_seconds", "steps",
                                                      "prompt_tokens")}  # fmt: skip
    print(f"engine time: decode {d['decode_seconds']:.1f} s, prefill {d['prefill_seconds']:.1f} s, "
          f"busy {d['busy_seconds']:.1f} s of {wall:.1f} s wall; {d['steps']:.0f} steps, "
          f"{d['prompt_tokens']:.0f} prompt tokens")  # fmt: skip


def _engine_counters(url: str) -> dict[str, float]:
    return dict(httpx.get(f"{url}/info", timeout=10).json()["engine"])


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_gpu_mb(url: str) -> float | None:
    """The peak of a CUDA server's allocated device memory: the engine's /info, a baseline's /ready."""
    try:
        info = httpx.get(f"{url}/info", timeout=10)
        if info.status_code == 200:
            peak = info.json()["engine"]["device_memory_peak_bytes"]
        else:
            peak = httpx.get(f"{url}/ready", timeout=10).json().get("device_memory_peak_bytes", 0)
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    return peak / 2**20 if peak else None


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 600, path: str = "/ready") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


# TEXTGEN_DTYPE / TEXTGEN_QUANTIZE per numeric mode (app/models/numerics/modes.py), for `--modes`
MODES = {
    "auto": {},
    "fp32": {"TEXTGEN_DTYPE": "float32", "TEXTGEN_QUANTIZE": "none"},
    "bf16": {"TEXTGEN_DTYPE": "bfloat16", "TEXTGEN_QUANTIZE": "none"},
    "int8": {"TEXTGEN_DTYPE": "auto", "TEXTGEN_QUANTIZE": "int8"},
    "int4": {"TEXTGEN_DTYPE": "auto", "TEXTGEN_QUANTIZE": "int4"},
}


def mode_env(mode: str) -> dict[str, str]:
    return {**os.environ, **MODES[mode]}


@contextmanager
def serving_all(servers: list[tuple[list[str], dict[str, str], str]],
                ready: str = "/ready") -> Iterator[list[subprocess.Popen[bytes]]]:  # fmt: skip
    """Server processes, each (command, env, url), started together and ready at their urls (`ready`: the path that
    answers 200 once loaded; llama.cpp's is /health); stopped (Ctrl-C, then kill) on the way out."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for command, env, _ in servers:
            procs.append(subprocess.Popen(command, env=env))
        for proc, (_, _, url) in zip(procs, servers, strict=True):
            _wait_ready(url, proc, path=ready)
        yield procs
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


@contextmanager
def serving(command: list[str], env: dict[str, str], url: str,
            ready: str = "/ready") -> Iterator[subprocess.Popen[bytes]]:  # fmt: skip
    """A server process started with `command`, ready at `url`; stopped (Ctrl-C, then kill) on the way out."""
    with serving_all([(command, env, url)], ready) as procs:
        yield procs[0]


def engine_command(model: str | None, port: int) -> list[str]:
    return _command("engine", model, port, 0, False)


def _command(system: str, model: str | None, port: int, max_batch: int, packed: bool) -> list[str]:
    model_args = ["--model", model] if model else []
    if system.startswith("engine"):
        return [sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--log-level", "warning", *model_args]
    return [sys.executable, "-m", "app.bench.baselines", "--system", system, "--port", str(port),
            "--max-batch", str(max_batch), *model_args, *(["--packed"] if packed else [])]  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server to load (without --compare)")
    parser.add_argument("--pid", type=int, help="server pid, to report its peak RSS (without --compare)")
    parser.add_argument("--compare", action="store_true", help="start engine, static and sequential servers in turn")
    parser.add_argument("--systems", default="engine,static,sequential", help="with --compare: which, in order")
    parser.add_argument("--modes", default="",
                        help="with --compare: run the engine once per numeric mode, e.g. fp32,bf16,int8 "
                        "(each also gets a one-stream row)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=None,
                        help="with --modes: rounds of every mode side by side, each on fresh servers and a fresh "
                        "workload (seed, seed + 1, ...), the order rotated each round; rows pool the rounds "
                        "(default 3)")  # fmt: skip
    parser.add_argument("--model", help="with --compare: model for every system (default: the server's default)")
    parser.add_argument(
        "--packed-baselines", action="store_true", help="with --compare: baselines use prepacked CPU weights too"
    )
    parser.add_argument("--port", type=int, default=8123, help="with --compare: port for the servers it starts")
    parser.add_argument("--llama-server", type=Path, metavar="PATH",
                        help="with --compare and the system llama.cpp: its llama-server binary (docs/benchmarks.md)")
    parser.add_argument("--gguf", type=Path, metavar="FILE",
                        help="with --compare: the GGUF file every system serves (the engine's --model too)")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(20, 200), metavar=("MIN", "MAX"))
    parser.add_argument("--new-tokens", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sequential-requests", type=int, default=0, metavar="N",
                        help="with --compare: the sequential baseline runs only the first N requests (it serves one "
                        "at a time, so its rate does not depend on how many; a big load would take hours)")  # fmt: skip
    parser.add_argument("--json", metavar="PATH", help="also write the workload and the rows as JSON")
    parser.add_argument("--constrained", action="store_true",
                        help="with --compare: each engine also runs the same jobs held to a small JSON schema")


def _constrained_row(system: str, url: str, jobs: list[Job], concurrency: int, rss: float | None
                     ) -> dict[str, object]:  # fmt: skip
    """The same jobs held to BENCH_SCHEMA, and what the token masks took."""
    before = _engine_counters(url)
    held, wall = asyncio.run(drive(url, jobs, concurrency, stream=True,
                                   constraint={"type": "json_schema", "schema": BENCH_SCHEMA}))  # fmt: skip
    after = _engine_counters(url)
    steps = after["constraint_mask_steps"] - before["constraint_mask_steps"]
    spent = after["constraint_mask_seconds"] - before["constraint_mask_seconds"]
    print(f"{system} json-schema: token masks {1000 * spent / max(steps, 1):.2f} ms per step over "
          f"{steps} steps ({100 * spent / wall:.1f}% of the wall time)")  # fmt: skip
    return summarize(f"{system} json-schema", held, wall, rss, peak_gpu_mb(url))


def compare_modes(args: argparse.Namespace, modes: list[str]) -> tuple[list[dict[str, object]], dict[str, list[float]]]:
    """The engine once per numeric mode, in `args.rounds` rounds: each round starts every mode's server afresh and
    all together (so no round finds another's prompts cached), runs the workload of seed `args.seed` + round on
    each in turn, the order rotated a place per round, then each one's one stream. On a shared machine whose speed
    drifts within minutes, modes measured minutes apart compare the drift as much as the modes; interleaved and
    repeated, each round's ratio is taken over a few seconds. The rows pool every round's requests (tokens over
    summed wall time, percentiles over all requests); also returned: each row's tokens/s per round."""
    pooled: dict[str, tuple[list[Result], list[float]]] = {}
    memory: dict[str, tuple[float | None, float | None]] = {}  # row -> (peak RSS MB, peak GPU MB), worst round
    rates: dict[str, list[float]] = {}

    def record(name: str, results: list[Result], wall: float, proc: subprocess.Popen[bytes], url: str) -> None:
        kept, walls = pooled.setdefault(name, ([], []))
        kept.extend(results)
        walls.append(wall)
        rates.setdefault(name, []).append(sum(r.completion_tokens for r in results if r.ok) / wall)
        rss, gpu = peak_rss_mb(proc.pid), peak_gpu_mb(url)
        seen = memory.get(name, (None, None))
        memory[name] = (max(filter(None, (rss, seen[0])), default=None),
                        max(filter(None, (gpu, seen[1])), default=None))  # fmt: skip

    urls = [f"http://127.0.0.1:{args.port + i}" for i in range(len(modes))]
    for r in range(args.rounds):
        seed = args.seed + r
        jobs = workload(args.requests, seed, tuple(args.prompt_tokens), tuple(args.new_tokens))
        order = [(i + r) % len(modes) for i in range(len(modes))]
        servers = [(engine_command(args.model, args.port + i), mode_env(m), urls[i]) for i, m in enumerate(modes)]
        with serving_all(servers) as procs:
            if r == 0:
                for m, url in zip(modes, urls, strict=True):
                    print(f"engine {m}: numerics {httpx.get(f'{url}/info', timeout=10).json().get('numerics')}")
            for i in order:
                system, url = f"engine {modes[i]}", urls[i]
                before = _engine_counters(url)  # the servers warmed up together: count this run's time only
                results, wall = asyncio.run(drive(url, jobs, args.concurrency, stream=True))
                print(f"round {r + 1}/{args.rounds} (seed {seed}) {system}: ", end="")
                print_engine_time(url, wall, before)
                record(system, results, wall, procs[i], url)
                if args.constrained:
                    row = _constrained_row(system, url, jobs, args.concurrency, peak_rss_mb(procs[i].pid))
                    rates.setdefault(str(row["system"]), []).append(float(row["tok/s"]))  # type: ignore[arg-type]
            for i in order:
                system, url = f"engine {modes[i]} 1-stream", urls[i]
                results, wall = asyncio.run(drive(url, one_stream_jobs(seed), 1, stream=True))
                record(system, results, wall, procs[i], url)
        print(f"round {r + 1}/{args.rounds} tokens/s: " + ", ".join(f"{name} {v[-1]:.1f}" for name, v in rates.items()))
    rows = [summarize(name, results, sum(walls), *memory[name]) for name, (results, walls) in pooled.items()]
    return rows, rates


def run_bench(args: argparse.Namespace) -> int:
    jobs = workload(args.requests, args.seed, tuple(args.prompt_tokens), tuple(args.new_tokens))
    print(f"workload: {len(jobs)} requests, {args.concurrency} concurrent, prompts {args.prompt_tokens[0]}-"
          f"{args.prompt_tokens[1]} tokens, max_new_tokens {args.new_tokens[0]}-{args.new_tokens[1]}, greedy, "
          f"ignore_eos; {os.cpu_count()} CPUs")  # fmt: skip
    rows = []
    rounds: dict[str, list[float]] = {}  # with --modes: each row's tokens/s per round
    if args.gguf is not None and not args.model:  # the engine serves the peer's file
        args.model = str(args.gguf)
    if args.rounds is None:
        args.rounds = 3 if args.modes else 1
    if not args.compare:
        results, wall = asyncio.run(drive(args.url, jobs, args.concurrency, stream=True))
        rows.append(summarize(args.url, results, wall, peak_rss_mb(args.pid) if args.pid else None))
    else:
        url = f"http://127.0.0.1:{args.port}"
        for system in args.systems.split(","):
            if system == "engine" and args.modes:  # the engine once per numeric mode, in place of the one engine row
                mode_rows, rounds = compare_modes(args, args.modes.split(","))
                rows.extend(mode_rows)
                print_table(rows)
                continue
            peer = system == llama_cpp.NAME
            if peer:
                if args.llama_server is None or args.gguf is None:
                    raise SystemExit("the llama.cpp system needs --llama-server PATH and --gguf FILE")
                command = llama_cpp.command(args.llama_server, args.gguf, args.port, args.concurrency)
            else:
                command = _command(system, args.model, args.port, args.concurrency, args.packed_baselines)
            with serving(command, mode_env("auto"), url, "/health" if peer else "/ready") as proc:
                engine = system == "engine"
                if engine:
                    print(f"{system}: numerics {httpx.get(f'{url}/info', timeout=10).json().get('numerics')}")
                load = jobs[: args.sequential_requests] if system == "sequential" and args.sequential_requests else jobs
                results, wall = asyncio.run(drive(url, load, args.concurrency, stream=engine, peer=peer))
                rows.append(summarize(system, results, wall, peak_rss_mb(proc.pid), peak_gpu_mb(url)))
                if engine:
                    print_engine_time(url, wall)
                if args.constrained and engine:
                    rows.append(_constrained_row(system, url, jobs, args.concurrency, peak_rss_mb(proc.pid)))
                if engine or peer:  # one user: the same fresh prompts on both
                    results, wall = asyncio.run(drive(url, one_stream_jobs(args.seed), 1, stream=True, peer=peer))
                    rows.append(summarize(f"{system} 1-stream", results, wall, peak_rss_mb(proc.pid)))
            print_table(rows)  # as it goes: the sequential run is long
    print()
    print_table(rows)
    by = {str(r["system"]): float(r["tok/s"]) for r in rows}  # type: ignore[arg-type]
    for name in by:  # a constrained row against the same engine's unconstrained one
        if name.endswith(" json-schema") and by.get(name.removesuffix(" json-schema")):
            print(f"{name} / {name.removesuffix(' json-schema')}: "
                  f"{by[name] / by[name.removesuffix(' json-schema')]:.2f}x tokens/s")
    for name in by:  # each mode against fp32, the W1 rows and the one-stream rows apart
        ref = "engine fp32 1-stream" if name.endswith(" 1-stream") else "engine fp32"
        if name.startswith("engine ") and name != ref and not name.endswith(" json-schema") and by.get(ref):
            each = [a / b for a, b in zip(rounds.get(name, []), rounds.get(ref, []), strict=True)]
            spread = (f" (by round: {', '.join(f'{x:.2f}x' for x in each)}; median {statistics.median(each):.2f}x)"
                      if len(each) > 1 else "")  # fmt: skip
            print(f"{name} / {ref}: {by[name] / by[ref]:.2f}x tokens/s{spread}")
    ratios = {}
    for name in ("engine", "engine 1-stream"):  # against the peer on the same file
        peer_name = name.replace("engine", llama_cpp.NAME)
        if by.get(name) and by.get(peer_name):
            ratios[f"{name} / {peer_name}"] = round(by[name] / by[peer_name], 2)
            print(f"{name} / {peer_name}: {ratios[f'{name} / {peer_name}']:.2f}x tokens/s")
    for other in ("static", "sequential"):
        if "engine" in by and other in by and by[other]:
            ratios[f"engine / {other}"] = round(by["engine"] / by[other], 2)
            print(f"engine / {other}: {ratios[f'engine / {other}']:.2f}x tokens/s")
    if args.json:
        workload_info = {"requests": len(jobs), "concurrency": args.concurrency, "prompt_tokens": args.prompt_tokens,
                         "new_tokens": args.new_tokens, "sequential_requests": args.sequential_requests or None,
                         "model": args.model, "cpus": os.cpu_count(), "rounds": args.rounds if args.modes else 1}
        Path(args.json).write_text(json.dumps({"workload": workload_info, "rows": rows, "ratios": ratios,
                                               "tokens_per_s_by_round": rounds}, indent=1))  # fmt: skip
    return 0
