"""The request bodies of the OpenAI-compatible API (and vLLM's tokenizer routes), as pydantic models. Unknown fields
are ignored, as vLLM and OpenAI do; wrong types and out-of-range values are a 400 that names the field (web/api.py's
read_json). A generation request turns itself into the engine's sampling parameters (`sampling_params`)."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from nextbit.infer.decoding import SamplingParams

TokenIds = list[int]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Optional[str] = None
    temperature: float = Field(1.0, ge=0, le=100)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; 0 or -1 = off
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    n: int = Field(1, ge=1)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None  # token id (a JSON key, so a string) -> added to its logit
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit()) or len(key) > 12:
                raise ValueError(f"logit_bias keys must be token ids, got {key[:40]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return v

    def token_bias(self) -> Optional[dict[int, float]]:
        return {int(k): b for k, b in self.logit_bias.items()} if self.logit_bias else None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else [s for s in self.stop if s]

    def sampling_params(self, max_new_tokens: int, vocab_size: int, stop_token_ids: Optional[list[int]] = None) -> SamplingParams:
        """The engine's sampling parameters for one choice of this request (a new object each call: the engine's
        request owns it). A top_k of -1, 0 or past the vocabulary keeps every candidate."""
        top_k = self.top_k if 0 < self.top_k < vocab_size else 0
        return SamplingParams(max_new_tokens=max(1, max_new_tokens), temperature=self.temperature, top_k=top_k,
                              top_p=self.top_p, stop=self.stops(), stop_token_ids=stop_token_ids,
                              frequency_penalty=self.frequency_penalty, presence_penalty=self.presence_penalty,
                              logit_bias=self.token_bias())


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], TokenIds, list[TokenIds]]
    max_tokens: Optional[int] = Field(16, ge=0)
    logprobs: Optional[int] = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: Optional[int] = Field(None, ge=1)  # only equal to n: nextbit returns the n samples it draws

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be an empty list")
        return v

    def prompts(self) -> list[Union[str, TokenIds]]:
        """The prompt as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]  # "developer" is OpenAI's newer name for system
    content: Union[str, list[TextPart]]  # a string, or OpenAI's content parts (text only), joined

    @field_validator("role")
    @classmethod
    def _system(cls, v):
        return "system" if v == "developer" else v

    @field_validator("content")
    @classmethod
    def _text(cls, v):
        return v if isinstance(v, str) else "".join(p.text for p in v)


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class TokenizeRequest(_Body):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[Message]] = None
    add_special_tokens: bool = True  # prepend <|endoftext|>, the token every document starts after
    add_generation_prompt: bool = True  # with messages: end with <|assistant|>


class DetokenizeRequest(_Body):
    model: Optional[str] = None
    tokens: TokenIds


class ReloadRequest(_Body):
    checkpoint: str

