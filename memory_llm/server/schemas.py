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

class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    max_tokens: Optional[int] = Field(None, gt=0)
    max_completion_tokens: Optional[int] = Field(None, gt=0)
    user: Optional[str] = None
    # memory_llm extensions (the openai client sends them with extra_body=...)
    session_id: Optional[str] = None
    remember: bool = False
    prompt: Optional[str] = None
    use_memory: bool = True
    exemplars: bool = True

class LearnRequest(BaseModel):
    text: str = Field(min_length=1)
    source: Optional[str] = None
    user: Optional[str] = None

class SearchRequest(BaseModel):
    query: str = Field(min_length=1)
    k: int = Field(5, gt=0, le=100)
    user: Optional[str] = None

class ForgetRequest(BaseModel):
    ids: list[int] = []
    source: Optional[str] = None
    all: bool = False
    user: Optional[str] = None

class FeedbackRequest(BaseModel):
    answer_id: int
    rating: Optional[Literal["good", "bad"]] = None
    correction: Optional[str] = None
    user: Optional[str] = None
