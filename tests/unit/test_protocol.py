"""Request validation, translation to vLLM sampling parameters, and the shapes of responses."""

from __future__ import annotations

import json
from typing import Any

import openai.types.chat as oai
import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from vllm.sampling_params import SamplingType

from tmem.adapters.memory_prompts import ExtractionFormat
from tmem.server.errors import ContextLengthExceeded, TMEMHTTPError, to_http_error
from tmem.server.protocol import (
    MAX_SCHEMA_DEPTH,
    MAX_STOP_CHARS,
    MAX_STOP_SEQUENCES,
    SSE_DONE,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ModelCard,
    ModelList,
    sse_event,
)
from tmem.server.session_protocol import DeleteResponse, FlushRequest, QAPairIn, SessionMessagesRequest, TeachRequest

HI = [{"role": "user", "content": "hi"}]


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": HI, **fields})


def first_error(exc: pytest.ExceptionInfo[ValidationError]) -> tuple[str, tuple[Any, ...], str]:
    err = exc.value.errors()[0]
    return err["type"], err["loc"], err["msg"]


# --- messages ----------------------------------------------------------------------------------


def test_developer_role_is_read_as_system() -> None:
    req = chat(messages=[{"role": "developer", "content": "be brief"}, *HI])
    assert [m.role for m in req.messages] == ["system", "user"]


def test_text_parts_are_joined_with_newlines() -> None:
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    req = chat(messages=[{"role": "user", "content": parts}])
    assert req.messages[0].content == "first\nsecond"
    assert req.messages[0].text == "first\nsecond"


@pytest.mark.parametrize(
    ("content", "error_type", "needle"),
    [
        ([{"type": "image_url", "image_url": {"url": "http://x/y.png"}}], "unsupported_value", "'image_url'"),
        ([{"type": "text", "text": "a"}, {"type": "input_audio"}], "unsupported_value", "'input_audio'"),
        (["just a string"], "unsupported_value", "'None'"),
        ([{"type": "text", "text": 3}], "string_type", "string 'text'"),
    ],
    ids=["image", "audio-after-text", "bare-string-part", "non-string-text"],
)
def test_non_text_content_is_rejected_at_the_content(content: Any, error_type: str, needle: str) -> None:
    with pytest.raises(ValidationError) as exc:
        chat(messages=[{"role": "user", "content": content}])
    kind, loc, msg = first_error(exc)
    assert (kind, loc) == (error_type, ("messages", 0, "content"))
    assert needle in msg


def test_tool_role_is_rejected_with_a_clear_message() -> None:
    with pytest.raises(ValidationError) as exc:
        chat(messages=[{"role": "tool", "content": "42", "tool_call_id": "c1"}])
    kind, loc, msg = first_error(exc)
    assert (kind, loc) == ("unsupported_value", ("messages", 0, "role"))
    assert msg == "'tool' messages are not supported by this server."


def test_an_echoed_assistant_message_is_accepted_while_its_extras_are_empty() -> None:
    echoed: dict[str, Any] = {
        "role": "assistant",
        "content": "hello",
        "refusal": None,
        "tool_calls": [],
        "annotations": [],
    }
    req = chat(messages=[*HI, echoed])
    assert req.messages[1].content == "hello"
    with pytest.raises(ValidationError) as exc:
        chat(messages=[{**echoed, "tool_calls": [{"id": "c1", "type": "function"}]}])
    kind, loc, _ = first_error(exc)
    assert (kind, loc) == ("unsupported_parameter", ("messages", 0))
    assert exc.value.errors()[0]["ctx"]["field"] == "tool_calls"


# --- request options ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"max_tokens": 10}, 10),
        ({"max_completion_tokens": 7}, 7),
        ({"max_tokens": 10, "max_completion_tokens": 7}, 7),
        ({"max_tokens": 10, "max_completion_tokens": None}, 10),
        ({}, None),
    ],
    ids=["legacy", "new", "both-new-wins", "new-null", "neither"],
)
def test_max_completion_tokens_wins(fields: dict[str, Any], expected: int | None) -> None:
    assert chat(**fields).max_tokens == expected


def test_nulls_mean_not_given() -> None:
    req = chat(temperature=None, top_p=None, stop=None, tools=None, n=None, stream_options=None)
    assert (req.temperature, req.top_p, req.stop) == (1.0, 1.0, None)


def test_neutral_values_of_unsupported_options_are_accepted() -> None:
    req = chat(n=1, logprobs=False, top_logprobs=0, tools=[], functions=[], user="u-1")
    assert req.messages[0].content == "hi"


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "'tools' is not supported"),
        ({"tool_choice": "auto"}, "tool_choice", "'tool_choice' is not supported"),
        ({"logit_bias": {"50256": -100}}, "logit_bias", "'logit_bias' is not supported"),
        ({"parallel_tool_calls": True}, "parallel_tool_calls", "is not supported"),
        ({"modalities": ["text", "audio"]}, "modalities", "is not supported"),
        ({"n": 2}, "n", "Only n=1 is supported"),
        ({"logprobs": True}, "logprobs", "Only logprobs=false is supported"),
        ({"top_logprobs": 3}, "top_logprobs", "Only top_logprobs=0 is supported"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_unsupported_options_name_the_field(fields: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(ValidationError) as exc:
        chat(**fields)
    err = exc.value.errors()[0]
    assert err["ctx"]["field"] == field
    assert message in err["msg"]


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"temperature": 2.5}, ("temperature",)),
        ({"temperature": -0.1}, ("temperature",)),
        ({"top_p": 0}, ("top_p",)),
        ({"max_tokens": 0}, ("max_tokens",)),
        ({"stop": ["a", "b", "c", "d", "e"]}, ("stop",)),
        ({"presence_penalty": 2.5}, ("presence_penalty",)),
        ({"frequency_penalty": -3}, ("frequency_penalty",)),
        ({"store": True}, ("store",)),
        ({"response_format": {"type": "json_schema"}}, ("response_format",)),
        ({"response_format": {"type": "xml"}}, ("response_format", "type")),
        ({"messages": []}, ("messages",)),
    ],
    ids=lambda v: None,
)
def test_out_of_range_and_unknown_fields_are_located(fields: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as exc:
        chat(**fields)
    assert exc.value.errors()[0]["loc"] == loc


def test_a_single_stop_string_becomes_a_list() -> None:
    assert chat(stop="END").stop == ["END"]


@pytest.mark.parametrize(
    ("stream", "options", "expected"),
    [
        (True, {"include_usage": True}, True),
        (True, None, False),
        (True, {}, False),
        (False, {"include_usage": True}, False),
    ],
)
def test_stream_usage(stream: bool, options: dict[str, Any] | None, expected: bool) -> None:
    assert chat(stream=stream, stream_options=options).stream_usage is expected


# --- to_sampling_params ------------------------------------------------------------------------


def test_temperature_zero_is_greedy() -> None:
    params = chat(temperature=0).to_sampling_params(64, 1024, 10)
    assert params.sampling_type == SamplingType.GREEDY
    assert chat(temperature=0.7, seed=3).to_sampling_params(64, 1024, 10).sampling_type == SamplingType.RANDOM_SEED


@pytest.mark.parametrize(
    ("default_max", "max_model_len", "prompt_tokens", "expected"),
    [(64, 1024, 10, 64), (256, 100, 40, 60), (256, 100, 99, 1)],
    ids=["default", "clamped-to-context", "one-token-left"],
)
def test_default_max_tokens_is_clamped_to_the_context(
    default_max: int, max_model_len: int, prompt_tokens: int, expected: int
) -> None:
    assert chat().to_sampling_params(default_max, max_model_len, prompt_tokens).max_tokens == expected


def test_a_requested_max_tokens_that_fits_is_used_as_is() -> None:
    assert chat(max_completion_tokens=60).to_sampling_params(16, 100, 40).max_tokens == 60


def test_a_requested_max_tokens_over_the_context_is_a_400() -> None:
    with pytest.raises(ContextLengthExceeded) as exc:
        chat(max_tokens=61).to_sampling_params(16, 100, 40)
    err = exc.value
    assert (err.status, err.type, err.code, err.param) == (
        400,
        "invalid_request_error",
        "context_length_exceeded",
        "messages",
    )
    assert err.message == (
        "This model's maximum context length is 100 tokens. However, you requested 101 tokens "
        "(40 in the messages, 61 in the completion). Please reduce the length of the messages or completion."
    )


def test_a_prompt_that_fills_the_context_is_a_400() -> None:
    with pytest.raises(ContextLengthExceeded) as exc:
        chat().to_sampling_params(16, 100, 100)
    assert exc.value.code == "context_length_exceeded"
    assert "your messages resulted in 100 tokens" in exc.value.message


def test_options_reach_the_sampling_params() -> None:
    req = chat(stop=["\n\n", "END"], seed=7, presence_penalty=0.5, frequency_penalty=-0.5, top_p=0.9, temperature=0.3)
    params = req.to_sampling_params(16, 100, 10)
    assert params.stop == ["\n\n", "END"]
    assert (params.seed, params.presence_penalty, params.frequency_penalty) == (7, 0.5, -0.5)
    assert (params.top_p, params.temperature) == (0.9, 0.3)
    assert params.structured_outputs is None


SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


@pytest.mark.parametrize(
    ("response_format", "json_value", "json_object"),
    [
        ({"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}, SCHEMA, None),
        ({"type": "json_object"}, None, True),
    ],
    ids=["json_schema", "json_object"],
)
def test_response_format_becomes_structured_outputs(
    response_format: dict[str, Any], json_value: Any, json_object: bool | None
) -> None:
    params = chat(response_format=response_format).to_sampling_params(16, 100, 10)
    assert params.structured_outputs is not None
    assert params.structured_outputs.json == json_value
    assert params.structured_outputs.json_object is json_object


def test_text_response_format_is_unconstrained() -> None:
    assert chat(response_format={"type": "text"}).to_sampling_params(16, 100, 10).structured_outputs is None


# --- responses ---------------------------------------------------------------------------------


def test_a_completion_parses_as_openais_type() -> None:
    resp = ChatCompletionResponse.build("abc", "tiny", "Lisbon.", "stop", prompt_tokens=12, completion_tokens=3)
    parsed = oai.ChatCompletion.model_validate(resp.model_dump())
    assert parsed.id == "chatcmpl-abc" and parsed.object == "chat.completion"
    assert parsed.choices[0].message.content == "Lisbon."
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.usage is not None and parsed.usage.total_tokens == 15


# vLLM's "abort" and "error" end a reply cut off: it is never reported as finished (chat answers them with an error).
@pytest.mark.parametrize(("engine", "openai_reason"),
                         [("stop", "stop"), ("length", "length"), ("abort", None), ("error", None), (None, None)])
def test_engine_finish_reasons_map_to_openais(engine: str | None, openai_reason: str | None) -> None:
    assert ChatCompletionResponse.build("r", "m", "", engine, 1, 0).choices[0].finish_reason == openai_reason
    assert ChatCompletionChunk.build("r", "m", finish_reason=engine).choices[0].finish_reason == openai_reason


def test_chunks_parse_as_openais_type() -> None:
    chunks = [
        ChatCompletionChunk.build("abc", "tiny", role="assistant"),
        ChatCompletionChunk.build("abc", "tiny", content="Lis"),
        ChatCompletionChunk.build("abc", "tiny", finish_reason="length"),
        ChatCompletionChunk.usage_only("abc", "tiny", prompt_tokens=5, completion_tokens=2),
    ]
    parsed = [oai.ChatCompletionChunk.model_validate(json.loads(sse_event(c)[len("data: ") :])) for c in chunks]
    assert {p.id for p in parsed} == {"chatcmpl-abc"}
    assert parsed[0].choices[0].delta.role == "assistant"
    assert parsed[1].choices[0].delta.content == "Lis" and parsed[1].choices[0].finish_reason is None
    assert parsed[2].choices[0].finish_reason == "length"
    assert parsed[3].choices == [] and parsed[3].usage is not None and parsed[3].usage.total_tokens == 7


def test_sse_framing() -> None:
    assert sse_event({"a": "é"}) == 'data: {"a":"é"}\n\n'
    assert sse_event(ModelList(data=[ModelCard(id="m", created=1)])).startswith('data: {"object":"list"')
    assert SSE_DONE == "data: [DONE]\n\n"


# --- session API -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "body"),
    [
        (QAPairIn, {"instruction": "  ", "output": "x"}),
        (QAPairIn, {"instruction": "q", "output": ""}),
        (TeachRequest, {"pairs": []}),
        (SessionMessagesRequest, {"messages": []}),
        (FlushRequest, {"timeout": 0}),
        (FlushRequest, {"timeout": 601}),
        (FlushRequest, {"timeout": 5, "wait": True}),
    ],
    ids=["blank-instruction", "empty-output", "no-pairs", "no-messages", "zero-timeout", "long-timeout", "extra"],
)
def test_session_requests_reject_bad_bodies(model: type[Any], body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        model.model_validate(body)


def test_session_requests_accept_good_bodies() -> None:
    teach = TeachRequest.model_validate({"pairs": [{"instruction": "Where does Ann live?", "output": "Lisbon"}]})
    assert teach.pairs[0].output == "Lisbon"
    assert FlushRequest.model_validate({}).timeout is None
    assert FlushRequest.model_validate({"timeout": 600}).timeout == 600
    assert DeleteResponse(id="s1").model_dump() == {"id": "s1", "object": "session.deleted", "deleted": True}


def test_min_tokens_reaches_the_engine_and_may_not_exceed_max_tokens() -> None:
    from pydantic import ValidationError

    from tmem.server.protocol import ChatCompletionRequest

    req = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=20, min_tokens=10)
    assert req.to_sampling_params(16, 2048, 10).min_tokens == 10
    with pytest.raises(ValidationError, match="min_tokens"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=5, min_tokens=10)


def test_empty_stop_string_is_a_400_not_an_engine_error() -> None:
    from pydantic import ValidationError

    from tmem.server.protocol import ChatCompletionRequest

    with pytest.raises(ValidationError, match="empty"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], stop=["ok", ""])


# --- input bounds (issue 12, item 14) ----------------------------------------------------------


def http_error(**fields: Any) -> TMEMHTTPError:
    """The error a client gets for a chat body with these fields, through the server's one mapper."""
    with pytest.raises(ValidationError) as exc:
        chat(**fields)
    return to_http_error(RequestValidationError(exc.value.errors()))


def nested_schema(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"inner": schema}}
    return schema


def test_stop_strings_are_capped_in_count_and_length() -> None:
    longest = "x" * MAX_STOP_CHARS
    assert chat(stop=["END", longest]).to_sampling_params(16, 100, 10).stop == ["END", longest]
    err = http_error(stop=["END", longest + "x"])
    assert (err.status, err.type, err.param, err.code) == (400, "invalid_request_error", "stop", "invalid_value")
    assert f"at most {MAX_STOP_CHARS} characters" in err.message
    err = http_error(stop=[str(i) for i in range(MAX_STOP_SEQUENCES + 1)])
    assert (err.status, err.param) == (400, "stop") and f"at most {MAX_STOP_SEQUENCES} items" in err.message


def test_the_workers_extraction_schema_is_within_the_bounds() -> None:
    schema = ExtractionFormat(max_pairs=32).schema()
    req = chat(response_format={"type": "json_schema", "json_schema": {"name": "qa_pairs", "schema": schema}})
    assert req.to_sampling_params(16, 100, 10).structured_outputs.json == schema  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        (nested_schema(MAX_SCHEMA_DEPTH), "levels deep"),
        ({"type": "object", "properties": {f"p{i:05d}": {"type": "string"} for i in range(2000)}}, "bytes of JSON"),
        ({"enum": ["v" * 1000] * 40}, "bytes of JSON"),
    ],
    ids=["too-deep", "too-many-properties", "too-many-bytes"],
)
def test_an_oversized_json_schema_is_a_400_naming_the_schema(schema: dict[str, Any], needle: str) -> None:
    err = http_error(response_format={"type": "json_schema", "json_schema": {"name": "big", "schema": schema}})
    assert (err.status, err.type, err.code) == (400, "invalid_request_error", "invalid_value")
    assert err.param == "response_format.json_schema.schema"
    assert needle in err.message


def test_a_schema_just_inside_the_depth_bound_is_accepted() -> None:
    # Each nested object property adds two levels (the property map, then the property's schema).
    levels = (MAX_SCHEMA_DEPTH - 1) // 2
    fmt = {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested_schema(levels)}}
    params = chat(response_format=fmt).to_sampling_params(16, 100, 10)
    assert params.structured_outputs is not None
    assert params.structured_outputs.json == nested_schema(levels)  # handed to the engine whole
