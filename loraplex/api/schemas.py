"""Request bodies of both dialects (pydantic v2). Unknown fields are ignored, as the hosted APIs
do; known ones are checked strictly for type (no "yes" for a boolean, no `true` or 1.5 for an
integer; an integer is accepted for a number) and range, so a bad value is a 400 naming the field.

The bounds a request may ask for live here and in loraplex/config.py (those SamplingParams
enforces too); docs/RELIABILITY.md lists them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraplex.config import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, MIN_REPETITION_PENALTY

MAX_PROMPT_CHARS = 1 << 20  # a prompt, or all messages' contents together; checked before tokenizing
MAX_CHOICES = 16  # OpenAI `n`


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: Literal["text"] = "text"
    text: str


class Message(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] = ""

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}

    @property
    def num_chars(self) -> int:
        return len(self.content) if isinstance(self.content, str) else sum(len(p.text) for p in self.content)


def _check_messages(messages: list[Message]) -> list[Message]:
    if sum(m.num_chars for m in messages) > MAX_PROMPT_CHARS:
        raise ValueError(f"the messages hold more than {MAX_PROMPT_CHARS} characters")
    return messages


Messages = Annotated[list[Message], Field(min_length=1, max_length=1024)]
Penalty = Annotated[float, Field(ge=-2, le=2)]
StopString = Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]
Stop = StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


class _Sampling(_Strict):
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    lora: str | None = Field(None, min_length=1, max_length=256)


class RunRequest(_Sampling):
    """POST …/ai/run/{model}: `prompt` or `messages` (not both)."""

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: Messages | None = None
    raw: bool = False
    stream: bool = False
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.6, ge=0, le=5)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=10)

    @model_validator(mode="after")
    def _one_input(self) -> RunRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        if self.messages is not None:
            _check_messages(self.messages)
        return self


class StreamOptions(_Strict):
    include_usage: bool = False


class _OpenAIRequest(_Sampling):
    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)


class ChatCompletionRequest(_OpenAIRequest):
    messages: Messages
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _bounded(self) -> ChatCompletionRequest:
        _check_messages(self.messages)
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


class CompletionRequest(_OpenAIRequest):
    prompt: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | Annotated[
        list[Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]], Field(min_length=1, max_length=1)]  # one prompt
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API: how many alternatives per token
    echo: Literal[False] = False


class FinetuneCreate(_Strict):

    model: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    description: str = Field("", max_length=4096)
    public: bool = False


def _inline_refs(schema: dict) -> dict:
    """The schema with every local `$ref` into `$defs` replaced by its target (our models are
    not recursive), so it can be embedded in an OpenAPI operation on its own."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(defs[node["$ref"].rsplit("/", 1)[-1]])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def json_body(schema: type[BaseModel]) -> dict:
    """`openapi_extra` for a route that parses its own JSON body with `schema`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": _inline_refs(schema.model_json_schema())}}}}


ASSET_UPLOAD_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file_name", "file"],
    "properties": {"file_name": {"type": "string", "enum": ["adapter_config.json", "adapter_model.safetensors"]},
                   "file": {"type": "string", "format": "binary"}}}}}}}
