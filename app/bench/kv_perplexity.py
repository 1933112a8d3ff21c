"""`python -m app.bench.kv_perplexity`: what the KV cache's dtype costs, as perplexity through decode steps.

`textgen eval perplexity` scores each window in one prompt pass, which attends over the pass's own fp32 K/V:
it never reads the cache, so it cannot see what storing K/V in bf16 or int8 costs. Here every token goes
through the decode step the server runs (teacher-forced: window token t is fed at step t, and the next one's
log-probability is read from that step's logits), so each attends over everything before it as the cache
holds it. The model loads as the server would (settings from the environment: `TEXTGEN_QUANTIZE=int4`), and
the windows run once per `--kv` dtype, same windows, same rows together, in-process. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from app.config import Settings
from app.engine.kv_views import DecodeView
from app.engine.model_runner import ModelRunner
from app.models.loading.loader import load_model


def decode_nll(batch: ModelRunner, windows: torch.Tensor) -> float:
    """Summed negative log-likelihood (nats) of windows (B, W) [:, 1:], each token fed through a decode step."""
    rows, width = windows.shape
    cache = batch.cache
    segments = [cache.hold(width) for _ in range(rows)]
    nll = 0.0
    try:
        for t in range(width - 1):
            view = DecodeView(cache, segments, [t] * rows)
            logits = batch.forward_step(view, windows[:, t], torch.full((rows,), t))  # (B, V)
            nll -= float(torch.log_softmax(logits.float(), -1).gather(1, windows[:, t + 1 : t + 2]).sum())
    finally:
        for seg in segments:
            cache.drop(seg)
    return nll


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/wikitext2/test.txt"))
    parser.add_argument("--kv", default="model,bfloat16,int8", help="TEXTGEN_KV_CACHE_DTYPE values to compare")
    parser.add_argument("--windows", type=int, default=32, help="windows (rows decoded together)")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    args = parser.parse_args()
    settings = Settings()
    loaded = load_model(settings)
    torch.set_num_threads(loaded.info.threads or torch.get_num_threads())
    ids = loaded.tokenizer(args.data.read_text(), add_special_tokens=False)["input_ids"]
    count = min(args.windows, len(ids) // args.window)
    windows = torch.tensor(ids[: count * args.window]).view(count, args.window)  # (B, W)
    print(f"{loaded.info.name} ({loaded.info.numerics}), {args.data}: {count} windows of {args.window} tokens, "
          f"each token through a decode step")  # fmt: skip
    print(f"{'KV cache':10} {'stores':>8} {'perplexity':>10} {'seconds':>8}")
    with torch.inference_mode():
        for kv in args.kv.split(","):
            batch = ModelRunner(loaded.model, count, count * args.window, kv_cache=kv)
            batch.allocate()
            started = time.perf_counter()
            nll = decode_nll(batch, windows)
            value = math.exp(nll / (count * (args.window - 1)))
            store = str(batch.cache.store).removeprefix("torch.")
            print(f"{kv:10} {store:>8} {value:10.4f} {time.perf_counter() - started:8.1f}", flush=True)


if __name__ == "__main__":
    main()
