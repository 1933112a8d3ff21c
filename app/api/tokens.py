"""POST /tokenize and /detokenize: the served model's tokenizer, so clients can count and cut tokens."""

from __future__ import annotations

from functools import partial

from fastapi import APIRouter
from pydantic import Field

from app.api.deps import EngineDep, ModelInfoDep
from app.api.schemas import StrictModel
from app.engine.errors import InvalidRequest

router = APIRouter(tags=["tokens"])


class TokenizeRequest(StrictModel):
    text: str = Field(description="Text to tokenize.")
    add_special_tokens: bool = Field(default=True, description="As the model's tokenizer adds them to prompts.")
    return_pieces: bool = Field(default=False, description="Also return each token's text.")


class TokenizeResponse(StrictModel):
    model: str
    tokens: list[int]
    count: int
    pieces: list[str] | None = None


class DetokenizeRequest(StrictModel):
    tokens: list[int] = Field(description="Token ids.")
    skip_special_tokens: bool = False


class DetokenizeResponse(StrictModel):
    model: str
    text: str


@router.post("/tokenize", response_model=TokenizeResponse, summary="Text -> the served model's token ids")
async def tokenize(body: TokenizeRequest, engine: EngineDep, info: ModelInfoDep) -> TokenizeResponse:
    # off the event loop (a long text takes the tokenizer a while), on the thread that tokenizes requests
    ids = list(await engine.on_input(partial(engine.tokenizer.encode, body.text,
                                             add_special_tokens=body.add_special_tokens)))  # fmt: skip
    pieces = None
    if body.return_pieces:
        pieces = [engine.tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in ids]
    return TokenizeResponse(model=info.name, tokens=ids, count=len(ids), pieces=pieces)


@router.post("/detokenize", response_model=DetokenizeResponse, summary="Token ids -> text")
async def detokenize(body: DetokenizeRequest, engine: EngineDep, info: ModelInfoDep) -> DetokenizeResponse:
    bad = next((t for t in body.tokens if not 0 <= t < info.vocab_size), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary [0, {info.vocab_size})", field="tokens")
    text = engine.tokenizer.decode(body.tokens, skip_special_tokens=body.skip_special_tokens,
                                   clean_up_tokenization_spaces=False)  # fmt: skip
    return DetokenizeResponse(model=info.name, text=text)
