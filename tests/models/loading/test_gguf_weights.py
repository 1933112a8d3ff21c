"""GGUF files served from their own blocks: each type's levels against gguf's own dequantization, the index against
gguf's reader, the kernels' packing against the levels, and SmolLM2's file built from its blocks against transformers'
GGUF loader (fp32, token-exact) and in its own quantization (auto)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFWriter, dequantize, quantize
from gguf import GGMLQuantizationType as T

from app.config import Settings
from app.models.loading import gguf_weights
from app.models.loading.gguf_weights import GgufTensor, index
from app.models.loading.loader import LoadedModel, load_model
from app.models.loading.store import GGUF_FILE, OFFLINE_DEFAULT, ModelStore
from app.models.numerics import group_quant
from app.models.numerics.group_quant import Int8GroupLinear
from app.models.numerics.int4 import Int4Linear
from app.models.numerics.levels import LevelsEmbedding, SourceLinear, Stacked, concat
from tests.conftest import STORE

ROWS, COLS = 48, 512
# the fp16 fields (d, dmin) of each K-quant's block, by byte offset: set to sane values in random blocks
HALVES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}
EXACT = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K)


def _blocks(qtype: T, rng: np.random.Generator) -> np.ndarray:
    """(ROWS, bytes per row) of a (ROWS, COLS) weight in `qtype`: quantized by gguf where it can, else random
    blocks with small positive fp16 scales."""
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.F16, T.F32):
        return quantize(rng.standard_normal((ROWS, COLS)).astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (ROWS * COLS // block, size), dtype=np.uint8)
    for at in HALVES[qtype]:
        raw[:, at : at + 2] = (rng.random((raw.shape[0], 1)) * 0.01 + 1e-4).astype(np.float16).view(np.uint8)
    return raw.reshape(ROWS, -1)


@pytest.fixture(scope="module")
def typed_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[T, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "types.gguf"
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(path), "llama")
    expected = {}
    for qtype in (*EXACT, T.Q6_K, T.Q2_K, T.Q3_K, T.F16, T.F32):
        raw = _blocks(qtype, rng)
        writer.add_tensor(f"w.{qtype.name}", raw, raw_dtype=qtype)
        expected[qtype] = dequantize(raw, qtype).reshape(ROWS, COLS).astype(np.float32)
    writer.add_tensor("norm", rng.standard_normal(COLS).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, expected


def _tensor(path: Path, fh: object, qtype: T) -> GgufTensor:
    _, infos = index(path)
    info = next(t for t in infos if t.name == f"w.{qtype.name}")
    assert info.shape == (ROWS, COLS)
    return GgufTensor(fh.fileno(), info.name, T(info.qtype), (ROWS, COLS), info.offset, info.nbytes)  # type: ignore[attr-defined]


def test_the_index_is_gguf_readers_without_the_vocabulary(typed_file: tuple[Path, dict[T, np.ndarray]]) -> None:
    path, _ = typed_file
    fields, infos = index(path)
    reader = GGUFReader(path)
    assert fields["general.architecture"] == "llama"
    assert [(t.name, t.shape, t.qtype, t.offset, t.nbytes) for t in infos] == [
        (t.name, tuple(int(x) for x in reversed(t.shape.tolist())), int(t.tensor_type), int(t.data_offset),
         int(t.n_bytes)) for t in reader.tensors]  # fmt: skip


@pytest.mark.parametrize("qtype", [*EXACT, T.Q6_K, T.Q2_K, T.Q3_K, T.F16, T.F32], ids=lambda q: q.name)
def test_each_type_gives_the_files_own_weights(typed_file: tuple[Path, dict[T, np.ndarray]], qtype: T) -> None:
    path, expected = typed_file
    want = torch.from_numpy(expected[qtype])
    with path.open("rb") as fh:
        tensor = _tensor(path, fh, qtype)
        assert torch.equal(tensor.dense(), want)  # gguf's own dequantization, what transformers' loader computes
        if qtype in (T.F16, T.F32):
            assert tensor.bits is None
            return
        levels = concat(list(tensor.chunks()))
        got = levels.dequantize()
        if qtype in EXACT:  # the file's own levels: bit for bit
            assert levels.exact and torch.equal(got, want)
            assert tensor.bits == (4 if qtype in (T.Q4_0, T.Q4_1, T.Q4_K) else 5 if qtype != T.Q8_0 else 8)
        else:  # 16-weight sub-blocks: rounded to 255 levels per group of 32, within half a level
            assert not levels.exact and levels.bits == 8
            step = levels.d.repeat_interleave(32, dim=1)
            assert bool(((got - want).abs() <= 0.5 * step + 1e-5 * want.abs().max()).all())  # and fp32 rounding
        # the 8-bit form the kernel takes holds the same numbers
        assert torch.equal(levels.as_eight_bits().dequantize(), got)


@pytest.mark.skipif(group_quant.load() is None, reason="the group-quantized kernel does not build here")
@pytest.mark.parametrize("qtype", [T.Q4_K, T.Q4_0, T.Q8_0, T.Q5_K, T.Q6_K], ids=lambda q: q.name)
def test_the_kernel_computes_with_the_files_levels(typed_file: tuple[Path, dict[T, np.ndarray]], qtype: T) -> None:
    path, _ = typed_file
    kernel = group_quant.load()
    assert kernel is not None
    x = torch.randn(5, COLS, generator=torch.Generator().manual_seed(1))
    with path.open("rb") as fh:
        tensor = _tensor(path, fh, qtype)
        weight = concat(list(tensor.chunks())).dequantize()
        layer = (Int4Linear(tensor, None, kernel=kernel) if tensor.bits == 4
                 else Int8GroupLinear(tensor, None, kernel))  # fmt: skip
        # a fused pair packs its parts one after another
        pair = Int8GroupLinear(Stacked([tensor, _tensor(path, fh, T.Q8_0)]), None, kernel)
    want = x @ weight.T
    # int8 activations per group of 32 (and bf16 scales for 4 bits): ~1% of a product
    assert float((layer(x) - want).norm() / want.norm()) < 0.02
    assert torch.allclose(pair(x)[:, :ROWS], layer(x), rtol=0.02, atol=0.02 * float(want.abs().mean()))


@pytest.mark.skipif(gguf_weights._blocks_kernel() is None, reason="the Q6_K converter does not build here")
def test_q6_k_to_8_bits_in_c_is_the_torch_path_bit_for_bit(typed_file: tuple[Path, dict[T, np.ndarray]]) -> None:
    path, _ = typed_file
    with path.open("rb") as fh:
        blocks = _tensor(path, fh, T.Q6_K)._raw(0, ROWS).reshape(-1, GGML_QUANT_SIZES[T.Q6_K][1])
    u, d = gguf_weights._q6_k_to_q8(blocks)
    signed, want_d, _ = group_quant.quantize8(gguf_weights._q6_k(blocks), measure=False)
    assert torch.equal(u, (signed.to(torch.int16) + 128).to(torch.uint8)) and torch.equal(d, want_d)


@pytest.mark.skipif(group_quant.load() is None, reason="the group-quantized kernel does not build here")
def test_q4_k_runs_its_own_scales_exactly(typed_file: tuple[Path, dict[T, np.ndarray]]) -> None:
    """A Q4_K weight takes the kernel's Q4K kind (D sc and Dmin m per group, exact in fp32, where Q4's bf16 scales
    round them): its products are those of the same levels widened to 8 bits (Q8Z, exact too) to float rounding,
    on the VNNI path and the AMX one alike, each row alone as in a batch."""
    path, _ = typed_file
    kernel = group_quant.load()
    assert kernel is not None
    x = torch.randn(37, COLS, generator=torch.Generator().manual_seed(2))
    with path.open("rb") as fh:
        tensor = _tensor(path, fh, T.Q4_K)
        four = Int4Linear(tensor, None, kernel=kernel)
        eight = Int8GroupLinear(tensor, None, kernel)
    assert four.kind == group_quant.Q4K and eight.kind == group_quant.Q8Z
    assert four.scales_zeros.numel() == ROWS * (COLS // 256) * 20  # 2.5 bytes of scales per group of 32
    with torch.inference_mode():
        want = eight(x)
        got = four(x)
        alone = torch.cat([four(x[i : i + 1]) for i in range(37)])
        was = kernel.amx
        kernel.use_amx(False)
        try:
            vnni = four(x)
        finally:
            kernel.use_amx(was)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    assert torch.equal(got, alone) and torch.equal(got, vnni)


def test_an_embedding_table_stays_in_its_levels(typed_file: tuple[Path, dict[T, np.ndarray]]) -> None:
    path, expected = typed_file
    ids = torch.tensor([[0, 5], [47, 5]])
    with path.open("rb") as fh:
        for qtype in (T.Q4_K, T.Q8_0, T.Q5_0, T.Q4_0):
            table = LevelsEmbedding(_tensor(path, fh, qtype))
            assert torch.equal(table(ids), torch.from_numpy(expected[qtype])[ids])


@pytest.fixture(scope="module")
def smollm_file() -> Path:
    store = ModelStore(STORE)
    located = store.locate(OFFLINE_DEFAULT)
    if located is None or located.gguf is None:  # a store from before GGUFs were kept: pulled again
        located = store.pull(OFFLINE_DEFAULT, force=True)
    assert located.gguf is not None and located.gguf.name == GGUF_FILE
    assert not list(located.path.glob("*.safetensors"))  # no float copy
    return located.gguf


def _load(**settings: object) -> LoadedModel:
    return load_model(Settings(model=OFFLINE_DEFAULT, model_store=STORE, threads=2, **settings))  # type: ignore[arg-type]


@pytest.mark.smollm
@pytest.mark.own_process
def test_built_from_its_blocks_it_is_transformers_gguf_model(smollm_file: Path) -> None:
    from transformers import AutoModelForCausalLM

    ours = _load(dtype="float32", pack_weights=False)
    assert not any(isinstance(m, SourceLinear) for m in ours.model.modules())
    reference = AutoModelForCausalLM.from_pretrained(smollm_file.parent, gguf_file=smollm_file.name,
                                                     dtype=torch.float32).eval()  # fmt: skip
    ids = ours.tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    with torch.inference_mode():
        assert torch.equal(ours.model(ids).logits, reference(ids).logits)
        want = reference.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0)
        assert torch.equal(ours.model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=0), want)


@pytest.mark.smollm
@pytest.mark.own_process
def test_auto_serves_the_files_own_quantization(smollm_file: Path) -> None:
    auto = _load()
    assert auto.info.numerics.startswith("int4"), auto.info.numerics
    layers = [m for m in auto.model.modules() if isinstance(m, (Int4Linear, Int8GroupLinear))]
    assert layers and all(m.error == 0.0 for m in layers)  # every layer as the file holds it, none rounded again
    assert isinstance(auto.model.get_input_embeddings(), LevelsEmbedding)
    assert auto.info.parameters == sum(t.elements for t in index(smollm_file)[1])
    exact = _load(dtype="float32")
    ids = exact.tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    with torch.inference_mode():
        want, got = exact.model(ids).logits[0, -1], auto.model(ids).logits[0, -1]
    assert int(want.argmax()) == int(got.argmax())
    assert float((got - want).norm() / want.norm()) < 0.1  # int8 activations, bf16 scales
