"""A Llama-7B-shaped GGUF of random blocks, for measuring a 7B-class model without a 7B download.

`python -m app.bench.synthetic_gguf OUT [--type q4_k|q4_0] [--tokenizer FILE]` writes 32 layers of hidden 4096, FFN
11008, 32 heads (Llama 2 7B's shapes) in random Q4_K (or Q4_0) blocks with small scales, the output layer in Q6_K as
llama.cpp's Q4_K_M keeps it, F32 norms, and the tokenizer metadata of a real GGUF (default: the offline default
model's file): ~3.9 GB. The weights are noise, so its text is noise; what it measures is loading (time to ready,
peak RSS) and speed, on textgen and on llama.cpp alike. tests/models/loading/test_synthetic_7b.py serves it
(marked slow); docs/benchmarks.md has the figures.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

HIDDEN, FFN, LAYERS, HEADS, CONTEXT = 4096, 11008, 32, 32, 4096


def _blocks(rng: np.random.Generator, qtype: str, rows: int, cols: int) -> np.ndarray:
    """(rows, bytes per row) of random `qtype` blocks whose scales keep the weights within ~±0.05."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    kind = GGMLQuantizationType[qtype.upper()]
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    halves = {"Q4_K": ((0, 3e-5), (2, 3e-4)), "Q4_0": ((0, 6e-3),), "Q6_K": ((208, 2e-5),)}[kind.name]
    for at, scale in halves:
        values = (scale * (0.5 + rng.random((raw.shape[0], 1)))).astype(np.float16)
        raw[:, at : at + 2] = values.view(np.uint8)
    return raw.reshape(rows, -1)


def write(out: Path, qtype: str = "q4_k", tokenizer: Path | None = None, seed: int = 0) -> Path:
    """Write the synthetic model to `out` (module docstring); the tokenizer metadata comes from the GGUF `tokenizer`."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

    if tokenizer is None:
        from app.config import Settings
        from app.models.loading.store import OFFLINE_DEFAULT, ModelStore

        located = ModelStore(Settings().model_store).pull(OFFLINE_DEFAULT)
        if located.gguf is None:
            raise SystemExit(f"{OFFLINE_DEFAULT} in the store is a converted folder; pull it again with --force")
        tokenizer = located.gguf
    donor = GGUFReader(tokenizer)
    writer = GGUFWriter(str(out), "llama")
    writer.add_name(f"synthetic-llama-7b-{qtype}")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    for key, field in donor.fields.items():
        if not key.startswith("tokenizer."):
            continue
        if field.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), GGUFValueType.ARRAY, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), field.types[0])
    vocab = len(donor.fields["tokenizer.ggml.tokens"].data)
    writer.add_vocab_size(vocab)
    plan: list[tuple[str, str, int, int]] = [("token_embd.weight", qtype, vocab, HIDDEN)]
    for i in range(LAYERS):
        plan += [(f"blk.{i}.attn_norm.weight", "f32", 1, HIDDEN), (f"blk.{i}.ffn_norm.weight", "f32", 1, HIDDEN)]
        plan += [(f"blk.{i}.attn_{p}.weight", qtype, HIDDEN, HIDDEN) for p in ("q", "k", "v", "output")]
        plan += [(f"blk.{i}.ffn_gate.weight", qtype, FFN, HIDDEN), (f"blk.{i}.ffn_up.weight", qtype, FFN, HIDDEN),
                 (f"blk.{i}.ffn_down.weight", qtype, HIDDEN, FFN)]  # fmt: skip
    plan += [("output_norm.weight", "f32", 1, HIDDEN), ("output.weight", "q6_k", vocab, HIDDEN)]
    rng = np.random.default_rng(seed)
    for name, kind, rows, cols in plan:
        if kind == "f32":
            writer.add_tensor_info(name, (cols,), np.dtype(np.float32), 4 * cols)
            continue
        raw_kind = GGMLQuantizationType[kind.upper()]
        block, size = GGML_QUANT_SIZES[raw_kind]
        writer.add_tensor_info(name, (rows, cols // block * size), np.dtype(np.uint8), rows * cols // block * size,
                               raw_dtype=raw_kind)  # fmt: skip
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, kind, rows, cols in plan:  # one tensor in memory at a time
        if kind == "f32":
            writer.write_tensor_data(np.ones(cols, dtype=np.float32))
        else:
            writer.write_tensor_data(_blocks(rng, kind, rows, cols))
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--type", choices=("q4_k", "q4_0"), default="q4_k")
    parser.add_argument("--tokenizer", type=Path, help="a GGUF whose tokenizer metadata to copy")
    args = parser.parse_args()
    path = write(args.out, args.type, args.tokenizer)
    print(f"{path}: {path.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
