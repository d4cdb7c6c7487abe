"""The HTTP API's request bodies, its limits, and the error it answers in OpenAI's shape."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MAX_TOKENS = 256
# A chat request is text; 1 MiB is ~250k tokens, far past any context this serves, and caps what one
# request can make the server buffer and tokenize before the context check turns it away.
MAX_BODY_BYTES = 1 << 20
# torch.Generator.manual_seed takes any 64-bit value, signed or unsigned; anything wider raises in the worker.
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of an OpenAI chat request; text parts of a content list are joined."""

    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of `POST /v1/chat/completions` the server honours; every other field is ignored.

    Every number is checked here, per request, so that a value the worker cannot use is this request's 400
    and never an error in the batch it would have joined.
    """

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AdapterRequest(BaseModel):
    """The body of `POST /admin/adapters`."""

    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


class ApiError(Exception):
    """An error answered in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
