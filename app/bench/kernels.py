"""Kernel measurements, run by hand: each prints a table of one kernel against what it replaced.

    python -m app.bench.kernels attention|packing|int4|int8|group_quant|prompt_attention|ragged_attention

Timings only, on random weights of SmolLM2-135M's shapes; 2 threads. The figures behind the docstrings of
app/models (and docs/numerics.md) come from here.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from app.engine.kv_cache import RaggedCache
from app.engine.kv_views import DecodeView
from app.models.layers.attention import decode_attention
from app.models.layers.prompt_attention import load as load_prompt_attention
from app.models.layers.prompt_attention import reference
from app.models.numerics.group_quant import Int8GroupLinear
from app.models.numerics.group_quant import load as load_group_quant
from app.models.numerics.int4 import Int4Linear
from app.models.numerics.int8 import Int8Linear
from app.models.numerics.packing import PackedLinear


def seconds(f: Any, n: int = 30) -> float:
    """Mean seconds of one call of f, after three warm-up calls."""
    for _ in range(3):
        f()
    t = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - t) / n


def attention() -> None:
    torch.set_num_threads(2)

    module = nn.Module()
    module.num_key_value_groups = 3  # type: ignore[assignment]
    print(" rows  window  sdpa ms  decode ms   (SmolLM2: 30 layers, 9 query heads, 3 kv heads, 64 dims)")
    for rows, window in ((8, 200), (32, 250), (32, 500)):
        # one cache per layer, as in the model (a single one would sit in the CPU's cache), each a slice of
        # a larger buffer (B, Hkv, capacity, D), as the slot cache hands them out
        layers = [
            (torch.randn(rows, 3, window + 64, 64)[:, :, :window], torch.randn(rows, 3, window + 64, 64)[:, :, :window])
            for _ in range(30)
        ]
        q = torch.randn(rows, 9, 1, 64)
        mask = torch.zeros(rows, 1, 1, window)
        with torch.inference_mode():
            a = seconds(lambda: [sdpa_attention_forward(module, q, k, v, mask) for k, v in layers], n=20) * 1000  # noqa: B023
            b = seconds(lambda: [decode_attention(module, q, k, v, mask) for k, v in layers], n=20) * 1000  # noqa: B023
        print(f"{rows:>5} {window:>7} {a:>8.1f} {b:>10.1f}")


def packing() -> None:
    torch.set_num_threads(2)

    print("  K      N   rows  F.linear GFLOP/s  packed GFLOP/s")
    for k, n in ((576, 960), (576, 3072), (1536, 576), (576, 49152)):
        w = torch.randn(n, k)
        layer = PackedLinear(w, None)
        for m in (8, 32, 128):
            x = torch.randn(m, k)
            with torch.inference_mode():
                a = seconds(lambda: torch.nn.functional.linear(x, w))  # noqa: B023
                b = seconds(lambda: layer(x))  # noqa: B023
            flops = 2 * m * k * n
            print(f"{k:>4} {n:>6} {m:>5} {flops / a / 1e9:>17.0f} {flops / b / 1e9:>15.0f}")


def int4() -> None:
    torch.set_num_threads(2)
    print("  K      N   rows  bf16 us  int4 us   (30 weights each, so none stays in cache)")
    for k, n in ((576, 960), (576, 3072), (1536, 576)):
        weights = [torch.randn(n, k) * 0.02 for _ in range(30)]
        bf16 = [PackedLinear(w, None, dtype=torch.bfloat16) for w in weights]
        int4 = [Int4Linear(w, None) for w in weights]
        for m in (1, 4, 32, 128):
            x = torch.randn(m, k)
            with torch.inference_mode():
                a = seconds(lambda: [layer(x) for layer in bf16], n=5) / 30  # noqa: B023
                b = seconds(lambda: [layer(x) for layer in int4], n=5) / 30  # noqa: B023
            print(f"{k:>4} {n:>6} {m:>5} {a * 1e6:>8.0f} {b * 1e6:>8.0f}")


def int8() -> None:
    torch.set_num_threads(2)

    print("  K      N   rows  packed fp32 GFLOP/s  int8 layer GOP/s (quantize + product + scale)")
    for k, n in ((576, 1536), (1536, 576), (576, 49152)):
        w = torch.randn(n, k)
        packed, int8 = PackedLinear(w, None), Int8Linear(w, None)
        for m in (1, 8, 32, 128):
            x = torch.randn(m, k)
            with torch.inference_mode():
                a = seconds(lambda: packed(x))  # noqa: B023
                b = seconds(lambda: int8(x))  # noqa: B023
            flops = 2 * m * k * n
            print(f"{k:>4} {n:>6} {m:>5} {flops / a / 1e9:>20.0f} {flops / b / 1e9:>17.0f}")


def group_quant() -> None:
    from app.models.int4 import Int4Linear
    torch.set_num_threads(2)
    kernel = load_group_quant()
    assert kernel is not None, "the kernel does not run on this CPU"
    wide = torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32  # AVX2: no bf16
    amx = kernel.amx  # then also the 4-bit layers on the VNNI path alone
    print(f"  K      N   rows  torch int4 us  4-bit here us  8-bit here us  {str(wide)[6:]} us"
          f"{'  4-bit VNNI only us' if amx else ''}   ({kernel.isa}; weights cycled: none in cache)")
    for k, n in ((576, 960), (576, 3072), (1536, 576), (576, 49152)):
        count = 30 if n < 10_000 else 2
        weights = [torch.randn(n, k) * 0.02 for _ in range(count)]
        torch_int4 = [Int4Linear(w, None) for w in weights]
        four = [Int4Linear(w, None, kernel=kernel) for w in weights]
        eight = [Int8GroupLinear(w, None, kernel) for w in weights]
        bf16 = [PackedLinear(w, None, dtype=wide) for w in weights]
        for m in (1, 4, 32, 128, 256):
            x = torch.randn(m, k)
            with torch.inference_mode():
                us = [seconds(lambda: [layer(x) for layer in layers], n=5) / count * 1e6  # noqa: B023
                      for layers in (torch_int4, four, eight, bf16)]  # fmt: skip
                if amx:
                    kernel.use_amx(False)
                    us.append(seconds(lambda: [layer(x) for layer in four], n=5) / count * 1e6)  # noqa: B023
                    kernel.use_amx(True)
            vnni = f" {us[4]:>20.0f}" if amx else ""
            print(f"{k:>4} {n:>6} {m:>5} {us[0]:>14.0f} {us[1]:>14.0f} {us[2]:>14.0f} {us[3]:>8.0f}{vnni}")


def prompt_attention() -> None:
    torch.set_num_threads(2)
    kv_heads, group, dim, layers = 3, 3, 64, 30  # SmolLM2-135M
    kernel = load_prompt_attention(kv_heads, group, dim)
    assert kernel is not None, "the kernel does not build here"
    print(" prompts (tokens)      sdpa ms  kernel ms   (30 layers, 3 kv heads x 3, 64 dims)")
    for lengths in ([30], [110], [200], [500], [110, 57, 89]):
        total = sum(lengths)
        q = torch.randn(total, kv_heads * group, dim)
        k, v = torch.randn(total, kv_heads, dim), torch.randn(total, kv_heads, dim)
        times = []
        for fn in (reference, kernel):
            with torch.inference_mode():
                fn(q, k, v, lengths, dim**-0.5)
                started = time.perf_counter()
                for _ in range(layers):
                    fn(q, k, v, lengths, dim**-0.5)
            times.append((time.perf_counter() - started) * 1000)
        print(f" {lengths!s:<20} {times[0]:>8.1f} {times[1]:>10.1f}")


def ragged_attention() -> None:
    torch.set_num_threads(2)
    layers, kv_heads, group, dim = 30, 3, 3, 64  # SmolLM2-135M
    random.seed(0)
    cases = {
        "W1-like: 32 rows of 40-330": [random.randint(40, 330) for _ in range(32)],
        "one 6000 + 31 of 20-84": [6000] + [random.randint(20, 84) for _ in range(31)],
        "one row of 300": [300],
    }
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.int8}
    print(f"{'rows':<28} {'tokens':>7}" + "".join(f" {'kernel ' + n + ' ms':>15}" for n in dtypes)
          + f" {'torch ms':>9}   (30 layers, 3 kv heads x 3, 64 dims)")  # fmt: skip
    for name, lengths in cases.items():
        times = []
        for use_kernel, kv_dtype in [*((True, d) for d in dtypes.values()), (False, torch.float32)]:
            cache = RaggedCache(layers, sum(lengths) + 16 * len(lengths), kernel=use_kernel, kv_dtype=kv_dtype)
            example = [(torch.zeros(1, kv_heads, 1, dim), torch.zeros(1, kv_heads, 1, dim))] * layers
            cache.allocate(example, kv_heads * group)
            segments = [cache.hold(n + 1) for n in lengths]
            for layer in range(layers):
                for seg, n in zip(segments, lengths, strict=True):
                    cache.write(layer, seg, 0, torch.randn(1, kv_heads, n, dim), torch.randn(1, kv_heads, n, dim))
            q = torch.randn(len(lengths), kv_heads * group, 1, dim)
            k = torch.randn(len(lengths), kv_heads, 1, dim)

            def run() -> None:
                view = DecodeView(cache, segments, lengths)  # noqa: B023
                for layer in range(layers):
                    view.attend(layer, nn.Module(), q, k, k, dim**-0.5)  # noqa: B023

            with torch.inference_mode():
                for _ in range(3):
                    run()
                best = float("inf")
                for _ in range(5):  # the best of five: this machine's speed swings between runs
                    started = time.perf_counter()
                    for _ in range(5):
                        run()
                    best = min(best, (time.perf_counter() - started) / 5 * 1000)
            times.append(best)
        print(f"{name:<28} {sum(lengths):>7}" + "".join(f" {t:>15.1f}" for t in times))


BENCHES: dict[str, Callable[[], None]] = {
    "attention": attention,
    "packing": packing,
    "int4": int4,
    "int8": int8,
    "group_quant": group_quant,
    "prompt_attention": prompt_attention,
    "ragged_attention": ragged_attention,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kernel", choices=sorted(BENCHES))
    BENCHES[parser.parse_args().kernel]()


if __name__ == "__main__":
    main()
