"""Pydantic models of the OpenAI-compatible HTTP API: chat completions, models, and the request base.

Request models mirror OpenAI's field names, reject what they do not support with a 400 that names
the field (``extra="forbid"`` plus explicit validators), and own the translation to engine
parameters (:meth:`ChatCompletionRequest.to_sampling_params`), as vLLM's entrypoints do. The session
API's models are in :mod:`tmem.server.session_protocol`.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tmem.server.errors import UNSUPPORTED_PARAMETER, UNSUPPORTED_VALUE, ContextLengthExceeded, InvalidRequest

if TYPE_CHECKING:
    from vllm import SamplingParams

SSE_DONE = "data: [DONE]\n\n"
# Input bounds that keep one request from costing the engine more than its tokens: each stop string
# is searched for after every generated token, and a JSON schema is compiled into a grammar per request.
MAX_STOP_SEQUENCES = 4  # OpenAI's limit
MAX_STOP_CHARS = 256
MAX_SCHEMA_BYTES = 32_768
MAX_SCHEMA_DEPTH = 32  # nested JSON objects/arrays: about 10 levels of nested object properties
# Messages of unsupported-field errors; errors.py takes ``param`` from their ``field``.
_NOT_SUPPORTED = "'{field}' is not supported by this server."
_ONLY_VALUE = "Only {field}={value} is supported by this server."


class RequestModel(BaseModel):
    """Base of request bodies: unknown fields are a 400, and ``null`` means "not given"."""

    model_config = ConfigDict(extra="forbid")
    # Fields OpenAI knows but this server cannot honour → the one value that asks for nothing
    # (None: only empty values). Anything else is a 400 naming the field, never silently ignored.
    _unsupported: ClassVar[dict[str, Any]] = {}

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls_and_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for field, neutral in cls._unsupported.items():
            value = data.get(field)
            if value in (None, [], {}, "") or (neutral is not None and value == neutral):
                continue
            if neutral is None:
                raise PydanticCustomError(UNSUPPORTED_PARAMETER, _NOT_SUPPORTED, {"field": field})
            raise PydanticCustomError(UNSUPPORTED_VALUE, _ONLY_VALUE, {"field": field, "value": json.dumps(neutral)})
        # OpenAI clients send ``"x": null`` for unset options: treat it as absent so defaults apply.
        known = cls.model_fields
        return {k: v for k, v in data.items() if k not in cls._unsupported and (v is not None or k not in known)}


# --- chat requests ---------------------------------------------------------------------------


class ChatMessage(RequestModel):
    """One message of a conversation; ``developer`` is read as ``system`` and text parts are joined."""

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None
    # Empty in assistant messages echoed back from a previous response.
    _unsupported: ClassVar[dict[str, Any]] = dict.fromkeys(
        ("tool_calls", "function_call", "refusal", "audio", "annotations")
    )

    @property
    def text(self) -> str:
        """The message text (text parts already joined)."""
        return self.content

    @field_validator("role", mode="before")
    @classmethod
    def _developer_is_system(cls, role: Any) -> Any:
        if role in ("tool", "function"):
            raise PydanticCustomError(
                UNSUPPORTED_VALUE, "'{role}' messages are not supported by this server.", {"role": role}
            )
        return "system" if role == "developer" else role

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts: list[str] = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise PydanticCustomError(
                    UNSUPPORTED_VALUE,
                    "Only text content parts are supported; got a part of type '{kind}'.",
                    {"kind": kind},
                )
            if not isinstance(part.get("text"), str):
                raise PydanticCustomError("string_type", "A text content part needs a string 'text'.")
            texts.append(part["text"])
        return "\n".join(texts)


class StreamOptions(RequestModel):
    """Options of a streamed response."""

    include_usage: bool = False


class JsonSchemaSpec(RequestModel):
    """The ``json_schema`` member of ``response_format``; OpenAI calls the schema ``schema``."""

    name: str = "response"
    description: str | None = None
    # ``schema`` would shadow BaseModel.schema, hence the alias.
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None

    @field_validator("json_schema")
    @classmethod
    def _bounded(cls, schema: dict[str, Any]) -> dict[str, Any]:
        depth = _json_depth(schema)  # first: json.dumps of a very deep value would recurse too far
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"the schema nests {depth} levels deep; at most {MAX_SCHEMA_DEPTH} are allowed")
        size = len(json.dumps(schema, separators=(",", ":")).encode())
        if size > MAX_SCHEMA_BYTES:
            raise ValueError(f"the schema is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES} are allowed")
        return schema


def _json_depth(value: Any) -> int:
    """How deeply objects and arrays nest in a decoded JSON value (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


class ResponseFormat(RequestModel):
    """Constrain the reply to free text, any JSON object, or one JSON schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("'json_schema' is required when type is 'json_schema'")
        return self


class ChatCompletionRequest(RequestModel):
    """Body of ``POST /v1/chat/completions``."""

    model: str | None = None  # None: the server's default model
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    # vLLM's extension (its own OpenAI server accepts it too): no end-of-sequence before this many tokens.
    min_tokens: int = Field(0, ge=0)
    stop: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    seed: int | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    response_format: ResponseFormat | None = None
    user: str | None = None  # accepted for compatibility, not used

    _unsupported: ClassVar[dict[str, Any]] = {
        "n": 1,
        "logprobs": False,
        "top_logprobs": 0,
        **dict.fromkeys(("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "logit_bias")),
        **dict.fromkeys(("audio", "modalities", "prediction", "reasoning_effort", "web_search_options")),
    }

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, stop: Any) -> Any:
        stop = [stop] if isinstance(stop, str) else stop
        if isinstance(stop, list) and any(s == "" for s in stop):
            raise ValueError("stop sequences must not be empty strings")
        if isinstance(stop, list) and any(isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in stop):
            raise ValueError(f"each stop sequence may be at most {MAX_STOP_CHARS} characters")
        return stop

    @model_validator(mode="after")
    def _completion_tokens_win(self) -> ChatCompletionRequest:
        # ``max_tokens`` is OpenAI's deprecated spelling; when both are sent the new one counts.
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError("min_tokens must not exceed max_tokens")
        return self

    @property
    def stream_usage(self) -> bool:
        """Whether a stream ends with a usage chunk (``stream_options.include_usage``)."""
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def to_sampling_params(self, default_max_tokens: int, max_model_len: int, prompt_tokens: int) -> SamplingParams:
        """The vLLM sampling parameters of this request for a prompt of ``prompt_tokens`` tokens.

        Without ``max_tokens`` the completion gets ``default_max_tokens``, clamped to the room left
        in the context window; an explicit ``max_tokens`` that does not fit is a 400, as at OpenAI.
        """
        room = max_model_len - prompt_tokens
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {max_model_len} tokens. However, your messages "
                f"resulted in {prompt_tokens} tokens. Please reduce the length of the messages.",
                param="messages",
            )
        if self.max_tokens is not None and self.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt_tokens + self.max_tokens} tokens ({prompt_tokens} in the messages, {self.max_tokens} "
                "in the completion). Please reduce the length of the messages or completion.",
                param="messages",
            )
        from tmem.server.engine import Sampling, sampling_params  # vLLM is the engine module's alone

        max_tokens = self.max_tokens if self.max_tokens is not None else min(default_max_tokens, room)
        fmt = self.response_format
        schema = fmt.json_schema.json_schema if fmt is not None and fmt.json_schema is not None else None
        sampling = Sampling(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            min_tokens=min(self.min_tokens, max_tokens), stop=tuple(self.stop or ()), seed=self.seed,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            json_schema=schema if fmt is not None and fmt.type == "json_schema" else None,
            json_object=fmt is not None and fmt.type == "json_object",
        )
        try:
            return sampling_params(sampling)
        except ValueError as exc:  # vLLM's own checks, e.g. a malformed schema
            raise InvalidRequest(str(exc)) from exc


# --- chat responses --------------------------------------------------------------------------


FinishReason = Literal["stop", "length"]


def _completion_id(request_id: str | None = None) -> str:
    return f"chatcmpl-{request_id or uuid.uuid4().hex}"


# vLLM's finish reasons of a reply delivered whole; its others ("abort", "error") mean the reply was cut off.
_DELIVERED: dict[str | None, FinishReason] = {"stop": "stop", "length": "length"}


def delivered_finish_reason(engine_reason: str | None) -> FinishReason | None:
    """OpenAI's finish reason for vLLM's; None while the reply runs, and for a reply the engine cut off."""
    return _DELIVERED.get(engine_reason)


def _now() -> int:
    return int(time.time())


class Usage(BaseModel):
    """Token counts of one completion."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        """Usage with the total filled in."""
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ResponseMessage(BaseModel):
    """The assistant's message in a non-streamed reply."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatCompletionChoice(BaseModel):
    """One alternative of a non-streamed reply (this server makes exactly one)."""

    index: int = 0
    message: ResponseMessage
    finish_reason: FinishReason | None


class _CompletionObject(BaseModel):
    """The fields a reply and each chunk of a streamed reply share, in OpenAI's order."""

    id: str = Field(default_factory=_completion_id)
    object: str
    created: int = Field(default_factory=_now)
    model: str


class ChatCompletionResponse(_CompletionObject):
    """OpenAI's ``chat.completion`` object."""

    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None

    @classmethod
    def build(
        cls,
        request_id: str,
        model: str,
        text: str,
        finish_reason: str | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> ChatCompletionResponse:
        """The reply to one request; ``finish_reason`` may be vLLM's."""
        return cls(
            id=_completion_id(request_id),
            model=model,
            choices=[ChatCompletionChoice(message=ResponseMessage(content=text),
                                          finish_reason=delivered_finish_reason(finish_reason))],
            usage=Usage.of(prompt_tokens, completion_tokens),
        )


class ChunkDelta(BaseModel):
    """What a streamed chunk adds: the role once, then pieces of content."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    """One alternative of a streamed chunk."""

    index: int = 0
    delta: ChunkDelta = Field(default_factory=ChunkDelta)
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(_CompletionObject):
    """OpenAI's ``chat.completion.chunk`` object; the usage chunk has no choices."""

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChunkChoice] = Field(default_factory=list)
    usage: Usage | None = None
    system_fingerprint: str | None = None

    @classmethod
    def build(
        cls,
        request_id: str,
        model: str,
        *,
        role: Literal["assistant"] | None = None,
        content: str | None = None,
        finish_reason: str | None = None,
    ) -> ChatCompletionChunk:
        """One chunk of the stream of ``request_id``; ``finish_reason`` may be vLLM's."""
        delta = ChunkDelta(role=role, content=content)
        choice = ChunkChoice(delta=delta, finish_reason=delivered_finish_reason(finish_reason))
        return cls(id=_completion_id(request_id), model=model, choices=[choice])

    @classmethod
    def usage_only(cls, request_id: str, model: str, prompt_tokens: int, completion_tokens: int) -> ChatCompletionChunk:
        """The last chunk of a stream with ``include_usage``: no choices, only usage, as at OpenAI."""
        return cls(id=_completion_id(request_id), model=model, usage=Usage.of(prompt_tokens, completion_tokens))


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "tmem"


class ModelList(BaseModel):
    """The answer of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event: ``data: {json}`` and a blank line."""
    if isinstance(payload, BaseModel):
        text = payload.model_dump_json()
    else:
        text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"
