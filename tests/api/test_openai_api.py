"""The OpenAI-compatible routes, driven by the official `openai` package against a real uvicorn server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch

from app.eval import perplexity
from app.models.loading.loader import LoadedModel
from tests.conftest import LiveServer, live_server
from tests.engine.helpers import reference_greedy

WIKITEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "wikitext2" / "test.txt"


def client_for(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_model(tiny_server: LiveServer) -> None:
    models = client_for(tiny_server).models.list()
    assert [m.id for m in models.data] == ["tiny-gpt2"]


def test_completion_greedy_matches_transformers(tiny_server: LiveServer, tiny: LoadedModel) -> None:
    prompt = "The capital of France is"
    out = client_for(tiny_server).completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=12, temperature=0)
    assert out.object == "text_completion" and out.model == "tiny-gpt2"
    assert out.choices[0].text == tiny.tokenizer.decode(reference_greedy(tiny, prompt, 12))
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None and (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 12)


def test_completion_stream_equals_the_whole_answer(tiny_server: LiveServer) -> None:
    client = client_for(tiny_server)
    args = {"model": "tiny-gpt2", "prompt": "In 1990,", "max_tokens": 10, "temperature": 0.8, "seed": 7}
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(**args, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    # the raw stream ends with OpenAI's sentinel
    with httpx.stream("POST", f"{tiny_server.url}/v1/completions", json={**args, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == 10


def test_completion_list_of_prompts_and_n(tiny_server: LiveServer, tiny: LoadedModel) -> None:
    prompts = ["Hello world", "The quick brown fox"]
    out = client_for(tiny_server).completions.create(model="tiny-gpt2", prompt=prompts, max_tokens=5, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    for prompt, choice in zip(prompts, out.choices, strict=True):
        assert choice.text == tiny.tokenizer.decode(reference_greedy(tiny, prompt, 5))
    sampled = client_for(tiny_server).completions.create(model="tiny-gpt2", prompt=prompts, max_tokens=4, n=3, seed=1)
    assert [c.index for c in sampled.choices] == list(range(6))


def test_logprobs_of_generated_tokens_are_the_models(tiny_server: LiveServer, tiny: LoadedModel) -> None:
    prompt = "Once upon a time"
    out = client_for(tiny_server).completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=4, temperature=0,
                                                     logprobs=3)  # fmt: skip
    lp = out.choices[0].logprobs
    assert lp is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    ids = tiny.tokenizer(prompt, return_tensors="pt").input_ids
    gen = reference_greedy(tiny, prompt, 4)
    with torch.inference_mode():
        logits = tiny.model(torch.cat([ids, torch.tensor([gen])], 1)).logits[0, ids.shape[1] - 1 : -1]  # (4, V)
    expected = logits.log_softmax(-1).gather(1, torch.tensor(gen).unsqueeze(1)).squeeze(1).tolist()
    assert lp.token_logprobs == pytest.approx(expected, abs=1e-4)
    assert lp.tokens == [tiny.tokenizer.decode([t]) for t in gen]
    # greedy: the chosen token is the best alternative, and each position lists 3
    for chosen, lp_value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp_value) and top[chosen] == pytest.approx(lp_value)
    assert lp.text_offset == [0, *[sum(len(t) for t in lp.tokens[:i]) for i in range(1, 4)]]


def test_echo_logprobs_give_transformers_perplexity(tiny_server: LiveServer, tiny: LoadedModel) -> None:
    text = WIKITEXT.read_text()[:6000] if WIKITEXT.exists() else "The tower is 324 metres tall. " * 100
    with httpx.Client(base_url=tiny_server.url, timeout=120) as http:
        ids = perplexity.tokenize(http, text, lines_per_call=7)
        chunks = perplexity.windows(ids, 128)
        api = perplexity.via_api(http, chunks)
    ref = perplexity.direct(tiny.model, chunks)
    assert api.tokens == ref.tokens == sum(len(w) - 1 for w in chunks) and api.tokens > 500
    assert abs(api.value - ref.value) / ref.value < 1e-3
    assert abs(api.value - ref.value) / ref.value < 1e-5  # in fact the same numbers


def test_echo_returns_prompt_then_completion(tiny_server: LiveServer) -> None:
    client = client_for(tiny_server)
    out = client.completions.create(model="tiny-gpt2", prompt="Hello world", max_tokens=3, temperature=0, echo=True,
                                    logprobs=1)  # fmt: skip
    choice = out.choices[0]
    assert choice.text.startswith("Hello world")
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    assert choice.logprobs.tokens[:2] == ["Hello", " world"] and len(choice.logprobs.tokens) == 5
    assert choice.logprobs.token_logprobs[0] is None and all(v < 0 for v in choice.logprobs.token_logprobs[1:])
    only = client.completions.create(model="tiny-gpt2", prompt="Hello world", max_tokens=0, echo=True)
    assert only.choices[0].text == "Hello world" and only.usage is not None and only.usage.completion_tokens == 0


def test_openai_error_shape(tiny_server: LiveServer) -> None:
    client = client_for(tiny_server)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="tiny-gpt2", prompt="Hi", temperature=-1)
    assert bad.value.status_code == 400
    body = bad.value.body
    assert isinstance(body, dict) and body["param"] == "temperature" and body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as wrong_model:
        client.completions.create(model="gpt-4", prompt="Hi")
    assert "tiny-gpt2" in str(wrong_model.value) and wrong_model.value.body["param"] == "model"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as greedy_n:
        client.completions.create(model="tiny-gpt2", prompt="Hi", n=2, temperature=0)
    assert greedy_n.value.body["param"] == "n"  # type: ignore[index]
    r = httpx.post(f"{tiny_server.url}/v1/completions", content=b"{not json",
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(f"{tiny_server.url}/v1/nothing").json()["error"]["code"] == "not_found"


def test_chat_needs_a_chat_template(tiny_server: LiveServer) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        client_for(tiny_server).chat.completions.create(model="tiny-gpt2", messages=[{"role": "user", "content": "Hi"}])
    assert "chat template" in str(exc.value) and exc.value.body["param"] == "messages"  # type: ignore[index]


def test_tokenize_detokenize_round_trip(tiny_server: LiveServer) -> None:
    r = httpx.post(f"{tiny_server.url}/tokenize", json={"text": "Hello world", "return_pieces": True})
    assert r.status_code == 200
    assert r.json() == {"model": "tiny-gpt2", "tokens": [15496, 995], "count": 2, "pieces": ["Hello", " world"]}
    back = httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": [15496, 995]})
    assert back.json()["text"] == "Hello world"
    bad = httpx.post(f"{tiny_server.url}/detokenize", json={"tokens": [10**9]})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "tokens"


@pytest.fixture(scope="module")
def smollm_server(smollm: LoadedModel) -> Iterator[LiveServer]:
    with live_server(smollm) as server:
        yield server


def test_chat_completion_through_the_template(smollm_server: LiveServer, smollm: LoadedModel) -> None:
    client = client_for(smollm_server)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = client.chat.completions.create(model=smollm.info.name, messages=messages, max_tokens=8, temperature=0,  # type: ignore[arg-type]
                                         logprobs=True, top_logprobs=2)  # fmt: skip
    ids = smollm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)["input_ids"]  # fmt: skip
    with torch.inference_mode():
        ref = smollm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8,
                                    pad_token_id=smollm.info.eos_token_ids[0])[0, ids.shape[1]:]  # fmt: skip
    expected = smollm.tokenizer.decode(ref, skip_special_tokens=True)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == expected and "Paris" in expected
    assert out.choices[0].logprobs is not None and out.choices[0].logprobs.content is not None
    assert len(out.choices[0].logprobs.content[0].top_logprobs) == 2
    stream = client.chat.completions.create(model=smollm.info.name, messages=messages, max_tokens=8,  # type: ignore[arg-type]
                                            temperature=0, stream=True)  # fmt: skip
    chunks = [c for c in stream if c.choices]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_an_error_inside_a_stream_is_typed_and_still_ends_with_done(tiny: LoadedModel) -> None:
    with live_server(tiny, request_timeout=0.3) as server:
        body = {"prompt": "Hi", "max_tokens": 1000, "stream": True, "temperature": 0}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2][6:])
    assert error["status"] == 504 and error["error"]["type"] == "timeout_error"
