"""Request bodies of both dialects (pydantic v2). Unknown fields are ignored, as the hosted APIs
do; known ones are checked for type and range, so a bad value is a 400 naming the field."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_PROMPT_CHARS = 1 << 20  # the body limit bounds this too; the context window bounds tokens


class TextPart(BaseModel):
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] = ""

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


Messages = Annotated[list[Message], Field(min_length=1, max_length=1024)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    lora: str | None = Field(None, min_length=1, max_length=256)


class RunRequest(_Sampling):
    """POST …/ai/run/{model}: `prompt` or `messages` (not both)."""

    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    messages: Messages | None = None
    raw: bool = False  # lax: "true" / "false" strings are accepted too
    stream: bool = False
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.6, ge=0, le=5)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    repetition_penalty: float | None = Field(None, gt=0, le=10)

    @model_validator(mode="after")
    def _one_input(self) -> RunRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of `prompt` or `messages`")
        return self


class StreamOptions(BaseModel):
    include_usage: bool = False


class _OpenAIRequest(_Sampling):
    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: Literal[1] = 1


class ChatCompletionRequest(_OpenAIRequest):
    messages: Messages
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_OpenAIRequest):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]  # one prompt per request
    max_tokens: int | None = Field(16, ge=1)


class FinetuneCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

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
