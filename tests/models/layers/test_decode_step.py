"""The written-out decode step (layers/decode_step.py) gives the model's own forward's logits, in every numeric
mode, as rows join a batch with different lengths; the ragged C kernel gives the torch path's attention."""

from __future__ import annotations

import itertools
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from app.config import Settings
from app.engine.model_runner import ModelRunner
from app.models.layers.attention import use_decode_attention
from app.models.layers.decode_step import Gpt2Step, LlamaStep, for_model
from app.models.loading.loader import LoadedModel, load_model
from app.models.loading.store import OFFLINE_DEFAULT, TINY_GPT2
from app.models.numerics import group_quant, modes
from app.models.numerics.int4 import Int4Linear
from app.models.numerics.int8 import Int8Linear
from tests.conftest import STORE, random_qwen2

PROMPTS = [[5, 17, 99, 3, 250], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42, 43]]
CPU_FEATURES = modes.cpu_features()


_IDS = itertools.count()


def _request(ids: list[int], room: int = 8) -> Any:
    return SimpleNamespace(id=f"req-{next(_IDS)}", prompt_len=len(ids), prompt_ids=ids, prompt_logprobs=None,
                           sequences=[], reserved_tokens=len(ids) + room, prefilled=0, done=False)  # fmt: skip


def _decode(model: Any, written_out: bool, prompts: list[list[int]], steps: int = 4, kernel: bool = False,
            feed: list[torch.Tensor] | None = None, native: bool = True) -> list[torch.Tensor]:  # fmt: skip
    """Logits (B, V) of `steps` greedy decode steps of `prompts` in one batch, through the step or the forward;
    `feed`: logits of another run, whose greedy tokens are fed instead of this run's (near-ties stay aligned);
    `native=False`: the step's layers from Python even where they would run in one C call."""
    batch = ModelRunner(model, max_rows=8, max_tokens=4096, kernel=kernel)
    if not written_out:
        batch.step = batch.prompt_step = None
    if not native and isinstance(batch.step, (LlamaStep, Gpt2Step)):
        batch.step.native = None
    with torch.inference_mode():
        for ids in prompts:
            request = _request(ids, room=steps + 1)
            logits, _, _ = batch.prefill(request)
            seq: Any = SimpleNamespace(request=request, segment=None, kv_len=0, tokens=[int(logits.argmax())])
            request.sequences.append(seq)
            batch.join(seq)
        out = []
        for step in range(steps):
            logits = batch.decode()  # (B, V)
            out.append(logits)
            chosen = (feed[step] if feed is not None else logits).argmax(-1).tolist()
            for s, token in zip(batch.seqs, chosen, strict=True):
                s.tokens.append(token)
    return out


def _assert_same(model: Any, kind: type) -> None:
    """The step equals the forward (both on the cache's torch path: per-row attention against padded windows, so
    equal to float rounding); the step with the C kernel equals the step without it (where the kernel builds)."""
    assert isinstance(for_model(model), kind)
    prompts = [[t % model.config.vocab_size for t in p] for p in PROMPTS]
    forward = _decode(model, False, prompts)
    # Modes that round activations to 8 bits turn float-rounding differences into a level now and then, and
    # that carries through the layers: SmolLM2 int4 x int8 and int8 measured up to 3.4% of the largest logit.
    eight_bit = any(isinstance(m, (Int8Linear, group_quant.Int8GroupLinear))
                    or (isinstance(m, Int4Linear) and m.kernel is not None) for m in model.modules())  # fmt: skip
    for kernel in (False, True):
        for got, expected in zip(_decode(model, True, prompts, kernel=kernel, feed=forward), forward, strict=True):
            scale = expected.abs().max()
            bf16 = torch.equal(expected, expected.to(torch.bfloat16).to(expected.dtype))  # a bf16 output layer
            tolerance = 6e-2 if eight_bit else 3e-2 if bf16 else 1e-4  # bf16: a step of its rounding
            assert (got - expected).abs().max() <= tolerance * scale


def _tiny_llama(mode: str) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320)  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    modes.apply(model, None, modes.choose(torch.device("cpu"), "auto", mode, True, CPU_FEATURES))
    assert use_decode_attention(model)
    return model


def _tiny_qwen2(mode: str, dtype: str = "auto") -> Any:
    model = random_qwen2(320)
    modes.apply(model, None, modes.choose(torch.device("cpu"), dtype, mode, True, CPU_FEATURES))
    assert use_decode_attention(model)
    return model


def _load(name: str, **settings: Any) -> LoadedModel:
    return load_model(Settings(model=name, model_store=STORE, threads=2, **settings))


MODES = [pytest.param({"dtype": "float32"}, id="fp32"), pytest.param({"dtype": "bfloat16"}, id="bf16"),
         pytest.param({"quantize": "int8"}, id="int8"), pytest.param({"quantize": "int4"}, id="int4")]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
def test_tiny_gpt2(mode: dict[str, str]) -> None:
    _assert_same(_load(TINY_GPT2, **mode).model, Gpt2Step)


# int8 without our kernel calibrates on a tokenizer this model lacks
@pytest.mark.parametrize("quantize", ["none", "int4", *(["int8"] if group_quant.usable(CPU_FEATURES) else [])])
def test_tiny_llama_fused_and_not(quantize: str) -> None:
    _assert_same(_tiny_llama(quantize), LlamaStep)
    # fp32 does not fuse q/k/v: the step's other branch
    fp32 = LlamaForCausalLM(_tiny_llama("none").config).eval()
    modes.apply(fp32, None, modes.choose(torch.device("cpu"), "float32", "none", True, CPU_FEATURES))
    use_decode_attention(fp32)
    _assert_same(fp32, LlamaStep)


@pytest.mark.parametrize("quantize", ["none", "int4", *(["int8"] if group_quant.usable(CPU_FEATURES) else [])])
def test_tiny_qwen2_biased_qkv(quantize: str) -> None:
    _assert_same(_tiny_qwen2(quantize), LlamaStep)
    _assert_same(_tiny_qwen2("none", "float32"), LlamaStep)  # fp32 does not fuse q/k/v: the step's other branch


@pytest.mark.smollm
@pytest.mark.parametrize("mode", [MODES[0], MODES[3]])
def test_smollm(mode: dict[str, str]) -> None:
    _assert_same(_load(OFFLINE_DEFAULT, **mode).model, LlamaStep)


def _segment_kv(batch: ModelRunner, request: Any) -> list[torch.Tensor]:
    return [torch.cat(kv) for kv in batch.prompt_kv(request)]  # per layer (2, H, P, D)


def _assert_prompt_pass(model: Any) -> None:
    """Prompts through the written-out pass, several at once: each prompt's logits are bit for bit those it gets
    alone (whatever else shares the pass, in any order), and the model's forward's to the 8-bit modes'
    tolerance; so is what lands in its segment. In chunks, or after a prefix read back from the cache, the
    same to that tolerance."""
    vocab = model.config.vocab_size
    prompts = [[(7 * i + 3 * n) % vocab for i in range(n)] for n in (5, 40, 1, 23, 64)]
    batch = ModelRunner(model, max_rows=8, max_tokens=8192)
    assert batch.prompt_step is not None
    with torch.inference_mode():
        alone = []
        for ids in prompts:
            request = _request(ids)
            alone.append((batch.prefill_chunk(request, len(ids)), _segment_kv(batch, request)))
            batch.discard(request)
        for order in (prompts, prompts[::-1]):
            requests = [_request(ids) for ids in order]
            results = batch.prefill_group([(r, r.prompt_len, None) for r in requests])
            for r, (logits, kv) in zip(requests, results, strict=True):
                expected, expected_kv = alone[prompts.index(r.prompt_ids)]
                assert torch.equal(logits, expected)
                assert all(torch.equal(a, b) for a, b in zip(_segment_kv(batch, r), expected_kv, strict=True))
                heads = getattr(model.config, "num_key_value_heads", model.config.num_attention_heads)
                assert kv[0][0].shape == (1, heads, r.prompt_len, kv[0][0].shape[-1])
                batch.discard(r)
        step, batch.prompt_step = batch.prompt_step, None  # the model's own forward
        for ids, (expected, expected_kv) in zip(prompts, alone, strict=True):
            request = _request(ids)
            logits = batch.prefill_chunk(request, len(ids))
            assert (logits - expected).abs().max() <= 6e-2 * logits.abs().max()
            for a, b in zip(_segment_kv(batch, request), expected_kv, strict=True):
                assert (a - b).abs().max() <= 6e-2 * a.abs().max()
            batch.discard(request)
        batch.prompt_step = step
        ids = prompts[-1]
        request = _request(ids)
        for stop in (20, 21, 50, len(ids)):  # chunks after what the segment holds
            logits = batch.prefill_chunk(request, stop)
        assert (logits - alone[-1][0]).abs().max() <= 6e-2 * logits.abs().max()
        batch.discard(request)


KERNEL = group_quant.load() is not None and group_quant.usable(CPU_FEATURES)


def _assert_native_layers(model: Any) -> None:
    """The step's layers in one C call give the Python loop's logits bit for bit, rows joining as they go."""
    step = for_model(model)
    assert isinstance(step, (LlamaStep, Gpt2Step)) and step.native is not None
    vocab = model.config.vocab_size
    prompts = [[(5 * i + n) % vocab for i in range(n)] for n in (3, 17, 1, 40, 9)]
    in_c = _decode(model, True, prompts, steps=6, kernel=True)
    in_python = _decode(model, True, prompts, steps=6, kernel=True, native=False)
    assert all(torch.equal(a, b) for a, b in zip(in_c, in_python, strict=True))


# int8 and int4 on the group-quantized kernel: 8-bit layers with a zero per group (tiny: random weights), and
# SmolLM2 int8's (4-bit weights held in 8 bits) beside its symmetric 8-bit output layer
ON_KERNEL = ["int4", "int8"]


@pytest.mark.skipif(not KERNEL, reason="the prompt pass runs with the group-quantized kernel")
@pytest.mark.parametrize("quantize", ON_KERNEL)
def test_prompts_in_one_pass_tiny_llama(quantize: str) -> None:
    _assert_prompt_pass(_tiny_llama(quantize))


@pytest.mark.skipif(not KERNEL, reason="the C layer loop runs with the group-quantized kernel")
@pytest.mark.parametrize("quantize", ON_KERNEL)
def test_layers_in_one_c_call_tiny_llama(quantize: str) -> None:
    _assert_native_layers(_tiny_llama(quantize))


@pytest.mark.skipif(not KERNEL, reason="the prompt pass and the C layer loop run with the group-quantized kernel")
@pytest.mark.parametrize("quantize", ON_KERNEL)
def test_prompts_in_one_pass_and_layers_in_one_c_call_tiny_qwen2(quantize: str) -> None:
    _assert_prompt_pass(_tiny_qwen2(quantize))
    _assert_native_layers(_tiny_qwen2(quantize))


@pytest.mark.skipif(not KERNEL, reason="the prompt pass and the C layer loop run with the group-quantized kernel")
@pytest.mark.parametrize("quantize", ON_KERNEL)
def test_prompts_in_one_pass_and_layers_in_one_c_call_tiny_gpt2(quantize: str) -> None:
    model = _load(TINY_GPT2, quantize=quantize).model
    _assert_prompt_pass(model)
    _assert_native_layers(model)


@pytest.mark.smollm
@pytest.mark.skipif(not KERNEL, reason="the C layer loop runs with the group-quantized kernel")
@pytest.mark.parametrize("quantize", ON_KERNEL)
def test_layers_in_one_c_call_smollm(quantize: str) -> None:
    _assert_native_layers(_load(OFFLINE_DEFAULT, quantize=quantize).model)


@pytest.mark.smollm
@pytest.mark.skipif(not KERNEL, reason="the prompt pass runs with the int4 x int8 kernel")
def test_prompts_in_one_pass_smollm() -> None:
    _assert_prompt_pass(_load(OFFLINE_DEFAULT, quantize="int4").model)


def test_rotary_lookups_are_the_modules_own_values() -> None:
    """The step looks cos / sin up by position (a table, grown as positions pass its end) instead of running the
    rotary module each step: the same values, bit for bit, as the module gives for those positions."""
    model = _tiny_llama("none")
    step = for_model(model)
    assert isinstance(step, LlamaStep) and step._fixed_rope
    x = torch.zeros(3, model.config.hidden_size)
    with torch.inference_mode():
        for positions in (torch.tensor([0, 7, 1023]), torch.tensor([5, 2500, 1024, 3])):  # the second grows it
            cos, sin = step._cos_sin(x, positions)
            own_cos, own_sin = model.model.rotary_emb(x[None], positions[None])  # (1, N, D)
            assert torch.equal(cos, own_cos[0]) and torch.equal(sin, own_sin[0])
    assert step._rope_table is not None and step._rope_table[0].shape[0] >= 2501


def test_models_it_does_not_know_keep_their_forward(tiny: LoadedModel) -> None:
    stock = _load(TINY_GPT2, pack_weights=False)  # sdpa attention: the stock model, as baselines run it
    assert for_model(stock.model) is None
    assert for_model(tiny.model) is not None
