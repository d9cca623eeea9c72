"""The request bodies the server accepts (pydantic): OpenAI's chat completion and memory_llm's memory routes."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ContentPart(BaseModel):
    type: str
    text: str = ""

class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[ContentPart]]

    @field_validator("content")
    @classmethod
    def text_only(cls, v):
        return v if isinstance(v, str) else "".join(p.text for p in v if p.type == "text")

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = Field(False, strict=True)

# fields accepted only where they change nothing: (allowed values, why others are refused)
REFUSED = {
    "n": ((None, 1), "only n=1 is supported: one choice per request"),
    "presence_penalty": ((None, 0, 0.0), "penalties are not supported: only 0"),
    "frequency_penalty": ((None, 0, 0.0), "penalties are not supported: only 0"),
    "logprobs": ((None, False), "log probabilities are not returned: only false"),
    "top_logprobs": ((None, 0), "log probabilities are not returned: only 0"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
    "response_format": ((None, {"type": "text"}), "only {\"type\": \"text\"}: answers are free text"),
    "tools": ((None, []), "tool calls are not supported"),
    "tool_choice": ((None, "none"), "tool calls are not supported: only \"none\""),
}

class ChatRequest(BaseModel):
    """OpenAI's chat completion request. Every documented field is validated (a 400 names it); those marked
    "refused" are accepted only at the value that changes nothing (docs/server.md lists them)."""
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = Field(False, strict=True)
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[int] = Field(None, gt=0, strict=True)
    max_completion_tokens: Optional[int] = Field(None, gt=0, strict=True)
    temperature: Optional[float] = Field(None, ge=0, le=2, strict=True)
    top_p: Optional[float] = Field(None, gt=0, le=1, strict=True)
    seed: Optional[int] = Field(None, strict=True)
    stop: Optional[Union[str, list[str]]] = None
    # accepted only at the value that changes nothing (REFUSED; the handler says why in a 400)
    n: Optional[int] = Field(None, ge=1, strict=True)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, strict=True)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, strict=True)
    logprobs: Optional[bool] = Field(None, strict=True)
    top_logprobs: Optional[int] = Field(None, ge=0, le=20, strict=True)
    logit_bias: Optional[dict[str, float]] = None
    response_format: Optional[dict] = None
    tools: Optional[list[dict]] = None
    tool_choice: Optional[Union[str, dict]] = None
    user: Optional[str] = None

    @field_validator("stop")
    @classmethod
    def up_to_four(cls, v):
        v = [v] if isinstance(v, str) else v
        if v is not None and (len(v) > 4 or any(not s for s in v)):
            raise ValueError("give at most 4 non-empty stop strings")
        return v
    # memory_llm extensions (the openai client sends them with extra_body=...)
    session_id: Optional[str] = None
    k: Optional[int] = Field(None, gt=0, le=100, strict=True)  # memories retrieved (default the top_k setting)
    remember: bool = False
    prompt: Optional[str] = None
    use_memory: bool = True
    exemplars: bool = True

class LearnRequest(BaseModel):
    text: str = Field(min_length=1)
    source: Optional[str] = None
    key: Optional[str] = None  # a later text under the same key supersedes this one
    supersedes: list[int] = []  # memory ids the new memory supersedes
    date: Optional[str] = None  # when it became true (ISO 8601)
    detect: Optional[bool] = None  # look for memories it restates with other values (default: the setting)
    user: Optional[str] = None

class UpdateRequest(BaseModel):
    text: str = Field(min_length=1)
    date: Optional[str] = None
    user: Optional[str] = None

class SearchRequest(BaseModel):
    query: str = Field(min_length=1)
    k: int = Field(5, gt=0, le=100)
    history: bool = False  # superseded memories too (marked by their status)
    user: Optional[str] = None

class ForgetRequest(BaseModel):
    ids: list[int] = []
    source: Optional[str] = None
    all: bool = False
    superseded: bool = False  # the superseded memories only
    user: Optional[str] = None

class FeedbackRequest(BaseModel):
    answer_id: int
    rating: Optional[Literal["good", "bad"]] = None
    correction: Optional[str] = None
    user: Optional[str] = None

class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    input: Union[str, list[str]]  # token arrays are refused: the embedder has its own tokenizer
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = Field(None, gt=0, strict=True)
    user: Optional[str] = None
