"""The OpenAI wire format `hrjax serve` speaks: request schemas (pydantic, strict types: a known field
of the wrong type is a 400, an unknown field is ignored as OpenAI's own server ignores it), error bodies
and response bodies.

The router answers single questions, so a chat request carries exactly one user message, and a
completion's `prompt` is a string or a list of strings (one choice per string, routed as a batch).
Fields hrjax does not implement (`n` > 1, `logprobs`, tools, ...) are refused by name rather than
silently ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hrjax.errors import HrjaxError


class ApiError(HrjaxError):
    """A request the server refuses: HTTP `status` and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """`{"error": {"message", "type", "param", "code"}}`, as the OpenAI API writes errors."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class HrjaxOptions(_Strict):
    """The `hrjax` extension field of a request (`extra_body={"hrjax": {...}}` in the openai client)."""

    cost_budget: Optional[float] = Field(None, gt=0)  # mean cost per query: the calibrated lambda that meets it


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class _Common(_Strict):
    """Fields both endpoints share. Absent max_tokens: the bundle's per-hop default; absent temperature:
    0 (greedy, what the router was trained on), unlike OpenAI's default of 1."""

    model: str
    max_tokens: Optional[int] = None  # per hop
    temperature: Optional[float] = Field(None, ge=0, le=2)
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[int] = None
    user: Optional[str] = None
    ignore_eos: bool = False  # vLLM's and llama.cpp's extension: every hop generates exactly max_tokens
    hrjax: Optional[HrjaxOptions] = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop: give at most 4 non-empty strings.", param="stop")
        return stops

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage]
    max_completion_tokens: Optional[int] = None  # the newer name of max_tokens
    logprobs: Optional[bool] = None
    tools: Optional[list[Any]] = None

    def question(self) -> str:
        if len(self.messages) != 1 or self.messages[0].role != "user":
            raise ApiError(400, "messages: send exactly one message with role 'user' (the question); the router "
                                "answers single questions, without a system prompt or history.", param="messages")
        return self.messages[0].text()

    def hop_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Common):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    suffix: Optional[str] = None

    def questions(self) -> list[str]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)
        if not prompts:
            raise ApiError(400, "prompt: give a string or a non-empty list of strings.", param="prompt")
        return prompts

    def hop_max_tokens(self) -> Optional[int]:
        return self.max_tokens


def unsupported_fields(request: _Common) -> Optional[str]:
    """The first field the request sets that hrjax does not implement, or None."""
    if request.n not in (None, 1):
        return "n"
    for name in ("logprobs", "tools", "echo", "suffix"):
        if getattr(request, name, None) not in (None, False):
            return name
    return None


def parse_request(schema: type[_Common], payload: Any) -> _Common:
    """A decoded JSON body -> the request model; ApiError 400 naming the first bad field."""
    if not isinstance(payload, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    try:
        request = schema.model_validate(payload)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not isinstance(p, int) and p not in ("str", "list[str]"))
        raise ApiError(400, f"{param or 'body'}: {first['msg']} (got {first.get('input')!r:.80}).",
                       param=param or None) from None
    name = unsupported_fields(request)
    if name is not None:
        raise ApiError(400, f"{name}: not supported by hrjax serve; leave it unset.", param=name)
    return request


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
