"""`textgen soak`: a bounded-time, seeded storm of good and bad traffic against a running server.

Clients pick actions at random: every endpoint, streaming or not, random sampling controls, prompts up
to (and past) the context limit, streams abandoned at a random point, bursts that overflow the queue,
malformed JSON, wrong types, invalid UTF-8, oversized bodies, and concurrent /metrics scrapes. Every
response is classified, and the table says what the server did with each request.

"Accepted but lost" is the number that must be 0: a request the server accepted (a 200 stream, or a
request that was sent in full) that neither completed nor got a typed error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

WORDS = [
    "the", "river", "town", "mill", "farm", "bridge", "railway", "factory", "market", "centre", "warehouse",
    "valley", "festival", "university", "club", "engineer", "housing", "renewal", "museum", "office", "ferry",
]  # fmt: skip
EXPECTED_5XX = {503, 504}  # typed: unavailable while shutting down, request timeout


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    by_action: Counter[str] = field(default_factory=Counter)
    lost: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def status(self, action: str, code: int, detail: str = "") -> None:
        self.by_action[action] += 1
        if 200 <= code < 300:
            self.outcomes["completed"] += 1
        elif code == 429:
            self.outcomes["429 overloaded"] += 1
        elif code == 504:
            self.outcomes["504 timeout"] += 1
        elif code >= 500 and code not in EXPECTED_5XX:
            self.outcomes[f"{code} UNEXPECTED"] += 1
            self.unexpected.append(f"{action}: {code} {detail[:200]}")
        else:
            self.outcomes[f"{code}"] += 1

    def other(self, action: str, outcome: str, detail: str = "") -> None:
        self.by_action[action] += 1
        self.outcomes[outcome] += 1
        if outcome == "LOST":
            self.lost.append(f"{action}: {detail[:200]}")


@dataclass
class Target:
    url: str
    context: int
    chat: bool
    max_body: int
    queue: int
    headers: dict[str, str]


def prompt_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(1, words)))


def sampling(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {"max_new_tokens": rng.randint(1, 48)}
    if rng.random() < 0.6:
        body |= {"temperature": round(rng.uniform(0, 1.5), 2), "seed": rng.randrange(2**31)}
        if rng.random() < 0.5:
            body["top_p"] = round(rng.uniform(0.05, 1.0), 2)
        if rng.random() < 0.5:
            body["top_k"] = rng.randint(0, 100)
    if rng.random() < 0.2:
        body["repetition_penalty"] = round(rng.uniform(0.8, 1.5), 2)
    if rng.random() < 0.2:
        body["stop"] = [rng.choice(WORDS), "\n"]
    if rng.random() < 0.1:
        body["ignore_eos"] = True
    return body


async def _sse(client: httpx.AsyncClient, tally: Tally, action: str, path: str, body: dict[str, Any],
               rng: random.Random, final: tuple[str, ...]) -> None:  # fmt: skip
    """A stream read to its end, or abandoned at a random event (a client that goes away)."""
    hang_up_at = rng.randint(0, 12) if rng.random() < 0.35 else None
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            tally.status(action, r.status_code, r.text)
            return
        events = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            data = line[6:]
            if data.startswith('{"error"'):  # OpenAI-style error inside the stream: typed, then [DONE]
                tally.status(action, int(json.loads(data).get("status", 500)), data)
                return
            if data == "[DONE]" or any(f'"type": "{kind}"' in data or f'"type":"{kind}"' in data for kind in final):
                if '"type": "error"' in data or '"type":"error"' in data:
                    tally.status(action, int(json.loads(data)["status"]), data)
                else:
                    tally.status(action, 200)
                return
            if hang_up_at is not None and events >= hang_up_at:
                tally.other(action, "client hung up (on purpose)")
                return
        tally.other(action, "LOST", f"stream ended after {events} events without a final one")


async def one_action(client: httpx.AsyncClient, target: Target, tally: Tally, rng: random.Random,
                     burst_lock: asyncio.Lock) -> None:  # fmt: skip
    roll = rng.random()
    if roll < 0.18:
        body = {"prompt": prompt_text(rng, rng.randint(1, 150)), **sampling(rng)}
        r = await client.post("/generate", json=body)
        tally.status("generate", r.status_code, r.text)
    elif roll < 0.36:
        body = {"prompt": prompt_text(rng, rng.randint(1, 150)), **sampling(rng), "stream": True}
        await _sse(client, tally, "generate stream", "/generate", body, rng, ("done", "error"))
    elif roll < 0.42:
        # near, at and past the context limit, as token ids
        length = rng.randint(max(2, target.context - 64), target.context + 16)
        body = {"prompt": [rng.randrange(100, 5000) for _ in range(length)], "max_tokens": rng.randint(1, 8),
                "temperature": 0}  # fmt: skip
        r = await client.post("/v1/completions", json=body)
        tally.status("long prompt", r.status_code, r.text)
    elif roll < 0.54:
        s = sampling(rng)
        body = {"prompt": prompt_text(rng, rng.randint(1, 100)), "max_tokens": s["max_new_tokens"],
                "temperature": min(s.get("temperature", 0.0), 2.0), "seed": s.get("seed")}  # fmt: skip
        if rng.random() < 0.3:
            body |= {"logprobs": rng.randint(0, 5), "echo": rng.random() < 0.5}
        if rng.random() < 0.5:
            await _sse(client, tally, "v1 completions stream", "/v1/completions", body | {"stream": True}, rng, ())
        else:
            r = await client.post("/v1/completions", json=body)
            tally.status("v1 completions", r.status_code, r.text)
    elif roll < 0.60:
        body = {"messages": [{"role": "user", "content": prompt_text(rng, rng.randint(1, 40))}],
                "max_tokens": rng.randint(1, 32), "temperature": round(rng.uniform(0, 1), 2)}  # fmt: skip
        if rng.random() < 0.5 and target.chat:
            await _sse(client, tally, "v1 chat stream", "/v1/chat/completions", body | {"stream": True}, rng, ())
        else:
            r = await client.post("/v1/chat/completions", json=body)
            tally.status("v1 chat", r.status_code, r.text)
    elif roll < 0.70:
        texts = [prompt_text(rng, rng.randint(3, 40)) for _ in range(rng.randint(1, 4))]
        task = rng.choice(["sentiment", "translate", "summarize"])
        body = {"texts": texts}
        if task == "translate":
            body |= {"target_lang": rng.choice(["fr", "de"]), "max_new_tokens": rng.randint(1, 24)}
        elif task == "summarize":
            body |= {"max_new_tokens": rng.randint(1, 24)}
        r = await client.post(f"/{task}", json=body)
        tally.status(task, r.status_code, r.text)
    elif roll < 0.73:
        r = await client.post("/tokenize", json={"text": prompt_text(rng, rng.randint(1, 300))})
        tally.status("tokenize", r.status_code, r.text)
    elif roll < 0.85:
        kind, content = rng.choice([
            ("malformed json", b'{"prompt": "unterminated'),
            ("wrong types", json.dumps({"prompt": 5, "max_new_tokens": "many"}).encode()),
            ("unknown field", json.dumps({"prompt": "hi", "bogus": True}).encode()),
            ("invalid utf-8", b'{"prompt": "\xff\xfe\xfa bad bytes"}'),
            ("out of range", json.dumps({"prompt": "hi", "temperature": -1, "top_p": 7}).encode()),
            ("empty body", b""),
            ("huge body", b'{"prompt": "' + b"a" * (target.max_body + 10) + b'"}'),
        ])  # fmt: skip
        path = rng.choice(["/generate", "/v1/completions", "/sentiment", "/v1/chat/completions"])
        r = await client.post(path, content=content, headers={"content-type": "application/json"})
        tally.status(kind, r.status_code, r.text)
    elif roll < 0.87:
        if burst_lock.locked():
            return
        async with burst_lock:  # one burst at a time: enough to overflow the queue
            bodies = [{"prompt": prompt_text(rng, 5), "max_new_tokens": rng.randint(1, 4)}
                      for _ in range(target.queue + 32)]  # fmt: skip
            answers = await asyncio.gather(*(client.post("/generate", json=b) for b in bodies),
                                           return_exceptions=True)  # fmt: skip
            for a in answers:
                if isinstance(a, httpx.Response):
                    tally.status("burst", a.status_code, a.text)
                else:
                    tally.other("burst", "LOST", repr(a))
    else:
        path = rng.choice(["/metrics", "/metrics", "/info", "/health", "/ready", "/v1/models"])
        r = await client.get(path)
        tally.status(f"GET {path}", r.status_code, r.text)


async def client_loop(i: int, target: Target, tally: Tally, seed: int, deadline: float, lock: asyncio.Lock) -> None:
    rng = random.Random(seed * 1000 + i)
    limits = httpx.Limits(max_connections=target.queue + 64)
    last: list[str] = [""]

    async def note(request: httpx.Request) -> None:  # which request a transport error belongs to
        last[0] = f"{request.method} {request.url.path} ({len(request.content) if request.content else 0} bytes)"

    async with httpx.AsyncClient(base_url=target.url, timeout=600, limits=limits, headers=target.headers,
                                 event_hooks={"request": [note]}) as client:  # fmt: skip
        while time.monotonic() < deadline:
            try:
                await one_action(client, target, tally, rng, lock)
            except httpx.HTTPError as exc:  # sent, and no answer: the server lost it
                tally.other("transport", "LOST", f"{last[0]}: {exc!r}")


def scrape(url: str, headers: dict[str, str]) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=30).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


# RSS under load swings by +-8% within seconds with what is in flight (a long prefill, a burst of rows):
# one reading at each end would measure that, not growth. Each end is the median of the readings over
# RSS_WINDOW_S, taken every RSS_EVERY_S.
RSS_EVERY_S = 5.0
RSS_WINDOW_S = 30.0


def window_median(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """Median RSS of the samples taken in [start, end] seconds; the nearest sample when none were."""
    if not samples:
        return 0.0
    inside = [v for t, v in samples if start <= t <= end]
    if not inside:
        inside = [min(samples, key=lambda tv: abs(tv[0] - end))[1]]
    return statistics.median(inside)


def run_soak(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    info = httpx.get(f"{args.url}/info", headers=headers, timeout=30).json()
    target = Target(args.url, info["context_length"], info["has_chat_template"],
                    args.max_body or 2 * 2**20, info["limits"]["max_queued_requests"], headers)  # fmt: skip
    tally = Tally()
    # what grows if memory leaks: the process's RSS on CPU; on CUDA the tensors live in the device's caching
    # allocator, whose reserved bytes /metrics reports
    cuda = str(info.get("device", "")).startswith("cuda")
    metric = "textgen_device_memory_reserved_bytes" if cuda else "process_resident_memory_bytes"
    label = "GPU reserved" if cuda else "RSS"
    rss = {"start": scrape(args.url, headers).get(metric, 0.0)}

    samples: list[tuple[float, float]] = []  # (seconds into the soak, RSS) under load, every RSS_EVERY_S

    async def sample_rss(stop: asyncio.Event, started: float) -> None:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                metrics = await asyncio.to_thread(scrape, args.url, headers)
                samples.append((time.monotonic() - started, metrics.get(metric, 0.0)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), RSS_EVERY_S)

    async def main() -> None:
        started = time.monotonic()
        deadline = started + args.duration
        lock = asyncio.Lock()
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample_rss(stop, started))
        tasks = [asyncio.create_task(client_loop(i, target, tally, args.seed, deadline, lock))
                 for i in range(args.clients)]  # fmt: skip
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
        stop.set()  # the end of load: the last in-flight requests still finish
        await sampler
        await asyncio.gather(*tasks)

    started = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - started
    time.sleep(1.0)  # let the server settle: abandoned streams are freed at its next step
    metrics = scrape(args.url, headers)
    warm_at = min(args.warmup, args.duration / 2)
    rss["after warm-up"] = window_median(samples, warm_at - RSS_WINDOW_S, warm_at)
    rss["end of load"] = window_median(samples, args.duration - RSS_WINDOW_S, args.duration)
    rss["peak"] = max([v for _, v in samples] + list(rss.values()))
    rss["idle after"] = metrics.get(metric, 0.0)
    ready = httpx.get(f"{args.url}/ready", headers=headers, timeout=30)
    state = httpx.get(f"{args.url}/info", headers=headers, timeout=30).json()["engine"]
    total = sum(tally.outcomes.values())

    print(f"soak: {args.url}, model {info['model']}, {args.clients} clients, {elapsed:.0f}s, seed {args.seed}: "
          f"{total} requests ({total / elapsed:.1f}/s)")  # fmt: skip
    print(f"{'outcome':34} {'requests':>9}")
    for outcome, n in sorted(tally.outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{outcome:34} {n:9}")
    print(f"{'accepted but lost':34} {len(tally.lost):9}")
    print(f"{'unexpected 5xx':34} {len(tally.unexpected):9}")
    print("by action: " + ", ".join(f"{a} {n}" for a, n in sorted(tally.by_action.items())))
    base = rss["after warm-up"] or 1.0
    growth = 100 * (rss["end of load"] - base) / base
    print(f"{label} MiB (after warm-up, end of load: medians over {RSS_WINDOW_S:g} s): "
          + ", ".join(f"{k} {v / 2**20:.0f}" for k, v in rss.items())
          + f"; growth from after warm-up to the end of load {growth:+.1f}%")  # fmt: skip
    buckets = {k: v for k, v in metrics.items() if k.startswith("textgen_batch_size_bucket")}
    count = metrics.get("textgen_batch_size_count", 0.0)
    mean = metrics.get("textgen_batch_size_sum", 0.0) / count if count else 0.0
    le = sorted(((float(k.split("le=")[1].rstrip("}")), v) for k, v in buckets.items()), key=lambda kv: kv[0])
    spread = ", ".join(f"<={int(b) if b != float('inf') else 'inf'}: {int(v - p)}"
                       for (b, v), (_, p) in zip(le, [(0.0, 0.0), *le], strict=False) if v - p)  # fmt: skip
    print(f"batch sizes over {int(count)} decode steps: mean {mean:.1f}; {spread}")
    print(f"after the soak: /ready {ready.status_code}, running requests {state['running_requests']}, rows "
          f"{state['running_rows']}, waiting {state['waiting']}, KV cache {state['kv_cache_bytes']} bytes")  # fmt: skip
    for line in (tally.lost + tally.unexpected)[:20]:
        print("  ! " + line)
    checks = {
        "0 accepted-but-lost": not tally.lost,
        "0 unexpected 5xx": not tally.unexpected,
        f"{label} growth after warm-up < {args.max_rss_growth:g}%": growth < args.max_rss_growth,
        "ready at the end": ready.status_code == 200,
    }
    print("verdict: " + ", ".join(f"{name} {'PASS' if ok else 'FAIL'}" for name, ok in checks.items()))
    return 0 if all(checks.values()) else 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--duration", type=float, default=600, help="seconds")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=float, default=30, help="seconds before the 'after warm-up' RSS")
    parser.add_argument("--max-body", type=int, help="the server's TEXTGEN_MAX_BODY_BYTES (default 2 MiB)")
    parser.add_argument("--api-key")
    parser.add_argument("--max-rss-growth", type=float, default=10.0, help="percent, after warm-up to the end")
