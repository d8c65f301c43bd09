"""The OpenAI wire format (sessions_app/openai_format.py, SPEC 14): every validation rule of
a chat request, and every rendered shape checked against the official `openai` SDK (its
pydantic models, and its own client fed through an in-memory transport). No database."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from types import SimpleNamespace

import pytest

from llm_gateway import ToolCall, Usage
from sessions_app import openai_format as fmt
from sessions_app.openai_format import OpenAIError, parse_chat_request

try:  # the official SDK, pinned in requirements.txt; without it only the tests marked needs_sdk are skipped
    import httpx2  # the SDK's HTTP client (openai 3.x depends on it)
    import openai
    from openai.types import Model
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
except ImportError:  # pragma: no cover
    openai = None
needs_sdk = pytest.mark.skipif(openai is None, reason="the openai SDK is not installed (requirements.txt)")

USER = {"role": "user", "content": "hi"}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}
ASKS_TOOL = {"role": "assistant", "content": None, "tool_calls": [CALL]}
TOOL_ANSWER = {"role": "tool", "tool_call_id": "call_1", "content": "12 C"}
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "The weather",
                                                 "parameters": {"type": "object", "properties": {}}}}
TURN_ID = uuid.UUID("12345678-1234-5678-1234-567812345678")
CREATED = 1_750_000_000


def body(**fields) -> bytes:
    """A valid request with `fields` replaced; a field set to ... is left out."""
    data = {"model": "openai/gpt-4o-mini", "messages": [USER]}
    data.update(fields)
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


def parse(**fields) -> fmt.ChatRequest:
    return parse_chat_request(body(**fields))


def refused(raw: bytes | str, code: str, param: object = None, **limits) -> OpenAIError:
    """The 400 parsing `raw` raises; `param` ... : any."""
    with pytest.raises(OpenAIError) as caught:
        parse_chat_request(raw, **limits)
    error = caught.value
    assert (error.status, error.code) == (400, code), error
    assert param is ... or error.param == param, error
    assert error.type == "invalid_request_error"
    assert error.message
    return error


# --- OpenAIError ----------------------------------------------------------------------------

@pytest.mark.parametrize(("status", "type_"), [
    (400, "invalid_request_error"), (401, "invalid_request_error"), (403, "invalid_request_error"),
    (404, "invalid_request_error"), (409, "invalid_request_error"), (402, "insufficient_quota"),
    (429, "rate_limit_error"), (500, "api_error"), (502, "api_error"), (503, "api_error"), (504, "api_error"),
])
def test_error_type_follows_the_status(status, type_):
    error = OpenAIError(status, "some_code", "Something.", "model")
    assert error.type == type_ == fmt.error_type(status)
    assert error.body() == {"error": {"message": "Something.", "type": type_, "param": "model", "code": "some_code"}}
    assert str(error) == "Something."


def test_error_carries_headers_apart_from_the_body():
    error = OpenAIError(429, "rate_limited", "Slow down.", headers={"Retry-After": "3"})
    assert error.headers == {"Retry-After": "3"}
    assert error.body()["error"]["param"] is None
    assert "headers" not in json.dumps(error.body())


# --- The body as JSON ------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"{", b"", b"\xff\xfe\xfa", b"{'model': 1}", b"[1, 2]", b'"text"', b"null", b"42",
                                 b"1" * 5000])
def test_not_a_json_object_is_invalid_json(raw):
    refused(raw, "invalid_json")


def test_json_nested_beyond_the_parser_is_invalid_json():
    refused(b"[" * 200_000 + b"]" * 200_000, "invalid_json")


def test_json_nested_beyond_max_depth_is_invalid_json_even_in_an_ignored_field():
    deep = "[" * 5000 + "]" * 5000  # the C parser follows this; Python code downstream would not
    refused(f'{{"model": "m", "messages": [{{"role": "user", "content": "hi"}}], "metadata": {deep}}}',
            "invalid_json")
    nested: object = "x"
    for _ in range(fmt.MAX_DEPTH - 1):  # the body itself is level 0
        nested = [nested]
    assert parse(metadata=nested).model == "openai/gpt-4o-mini"
    refused(body(metadata=[nested]), "invalid_json")


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_non_finite_number_is_invalid_json_with_its_path(number):
    refused(f'{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], "temperature": {number}}}',
            "invalid_json", "temperature")
    refused(f'{{"model": "m", "messages": [{{"role": "user", "content": "x"}}], "metadata": {{"a": [1, {number}]}}}}',
            "invalid_json", "metadata.a[1]")


def test_a_str_body_is_accepted_like_bytes():
    assert parse_chat_request(body().decode()).messages == ({"role": "user", "content": "hi"},)


# --- NUL and unpaired surrogates, anywhere ---------------------------------------------------

TEXT_FIELDS = [
    ('"model": "gpt{bad}"', "model"),
    ('"models": ["a", "b{bad}"]', "models[1]"),
    ('"messages": [{{"role": "user", "content": "a{bad}b"}}]', "messages[0].content"),
    ('"messages": [{{"role": "user", "content": [{{"type": "text", "text": "ok"}}, '
     '{{"type": "text", "text": "{bad}"}}]}}]', "messages[0].content[1].text"),
    ('"messages": [{{"role": "user", "name": "al{bad}", "content": "x"}}]', "messages[0].name"),
    ('"messages": [{{"role": "{bad}user", "content": "x"}}]', "messages[0].role"),
    ('"messages": [{{"role": "user", "content": "x"}}, {{"role": "assistant", "content": null, "tool_calls": '
     '[{{"id": "c1", "type": "function", "function": {{"name": "f", "arguments": "{{\\"a\\": \\"{bad}\\"}}"}}}}]}}]',
     "messages[1].tool_calls[0].function.arguments"),
    ('"messages": [{{"role": "user", "content": "x"}}, {{"role": "assistant", "tool_calls": '
     '[{{"id": "c1", "type": "function", "function": {{"name": "f{bad}", "arguments": "{{}}"}}}}]}}]',
     "messages[1].tool_calls[0].function.name"),
    ('"messages": [{{"role": "user", "content": "x"}}, {{"role": "assistant", "tool_calls": '
     '[{{"id": "c{bad}", "type": "function", "function": {{"name": "f", "arguments": "{{}}"}}}}]}}]',
     "messages[1].tool_calls[0].id"),
    ('"messages": [{{"role": "tool", "tool_call_id": "c{bad}", "content": "x"}}]', "messages[0].tool_call_id"),
    ('"stop": "END{bad}"', "stop"),
    ('"stop": ["ok", "{bad}"]', "stop[1]"),
    ('"user": "u{bad}"', "user"),
    ('"tools": [{{"type": "function", "function": {{"name": "f", "description": "d{bad}"}}}}]',
     "tools[0].function.description"),
    ('"response_format": {{"type": "json_schema", "json_schema": {{"name": "n", "schema": {{"title": "{bad}"}}}}}}',
     "response_format.json_schema.schema.title"),
    ('"tool_choice": {{"type": "function", "function": {{"name": "{bad}"}}}}', "tool_choice.function.name"),
    ('"metadata": {{"note": "{bad}"}}', "metadata.note"),  # an ignored field too
    ('"metadata": {{"k{bad}": "v"}}', "metadata"),  # a key: its object, the param echoes no bad text
]


@pytest.mark.parametrize("bad", ["\\u0000", "\\ud800", "\\udfff", "\\ud83d"])
@pytest.mark.parametrize(("field", "param"), TEXT_FIELDS)
def test_nul_or_a_lone_surrogate_in_any_string_is_invalid_text(field, param, bad):
    fields = field.format(bad=bad)
    base = '"model": "m", ' if not fields.startswith('"model"') else ""
    if '"messages"' not in fields:
        base += '"messages": [{"role": "user", "content": "x"}], '
    refused("{" + base + fields + "}", "invalid_text", param)


def test_a_bad_key_of_the_body_itself_has_no_param():
    refused('{"model": "m", "messages": [{"role": "user", "content": "x"}], "\\u0000": 1}', "invalid_text", None)


def test_params_and_messages_quote_client_text_briefly():
    long_key = "k" * 5000
    error = refused(body(metadata={"a": {long_key: "\x00"}}), "invalid_text", ...)
    assert error.param.startswith("metadata.a.kkk") and len(error.param) == fmt.MAX_PARAM_CHARS
    error = refused(body(messages=[{"role": "user", "content": [{"type": "x" * 5000}]}]), "unsupported_content",
                    "messages[0].content[0].type")
    assert len(error.message) < 300


def test_a_surrogate_pair_is_text_not_an_error():
    request = parse_chat_request('{"model": "m", "messages": [{"role": "user", "content": "\\ud83d\\ude00 ok"}]}')
    assert request.last_message_text == "\U0001f600 ok"


# --- model and models --------------------------------------------------------------------------

@pytest.mark.parametrize("model", [..., None, "", 5, ["m"], True])
def test_model_must_be_a_non_empty_string(model):
    refused(body(model=model), "invalid_request", "model")


def test_models_alone_give_the_model():
    request = parse(model=..., models=["a/one", "b/two"])
    assert (request.model, request.models, request.candidates) == ("a/one", ("a/one", "b/two"), ("a/one", "b/two"))


def test_model_goes_first_and_candidates_are_unique():
    request = parse(model="b/two", models=["a/one", "b/two", "a/one"])
    assert request.models == ("a/one", "b/two", "a/one")
    assert request.candidates == ("b/two", "a/one")


def test_no_models_means_configured_fallbacks_and_an_empty_list_means_none():
    assert parse().models is None
    assert parse().candidates == ("openai/gpt-4o-mini",)
    assert parse(models=[]).models == ()
    refused(body(model=..., models=[]), "invalid_request", "model")


@pytest.mark.parametrize("models", ["a/one", [""], ["a", 1], {"a": 1}, ["m"] * (fmt.MAX_MODELS + 1)])
def test_models_must_be_a_short_list_of_non_empty_strings(models):
    refused(body(models=models), "invalid_request", "models")


# --- messages ----------------------------------------------------------------------------------

@pytest.mark.parametrize("messages", [..., None, [], "hi", {"role": "user", "content": "hi"}])
def test_messages_must_be_a_non_empty_list(messages):
    refused(body(messages=messages), "invalid_request", "messages")


@pytest.mark.parametrize(("message", "param"), [
    ("hi", "messages[0]"),
    ({"content": "hi"}, "messages[0].role"),
    ({"role": "function", "content": "hi"}, "messages[0].role"),
    ({"role": "User", "content": "hi"}, "messages[0].role"),
    ({"role": ["user"], "content": "hi"}, "messages[0].role"),  # unhashable: no TypeError
    ({"role": "user"}, "messages[0].content"),
    ({"role": "user", "content": None}, "messages[0].content"),
    ({"role": "system", "content": 5}, "messages[0].content"),
    ({"role": "user", "content": []}, "messages[0].content"),
    ({"role": "user", "content": {"type": "text", "text": "hi"}}, "messages[0].content"),
    ({"role": "user", "content": ["hi"]}, "messages[0].content[0]"),
    ({"role": "user", "content": [{"text": "hi"}]}, "messages[0].content[0]"),
    ({"role": "user", "content": [{"type": "text"}]}, "messages[0].content[0].text"),
    ({"role": "user", "content": [{"type": "text", "text": None}]}, "messages[0].content[0].text"),
    ({"role": "user", "content": "hi", "name": 5}, "messages[0].name"),
    ({"role": "assistant", "content": None}, "messages[0].content"),
    ({"role": "assistant"}, "messages[0].content"),
    ({"role": "assistant", "content": None, "tool_calls": []}, "messages[0].content"),
    ({"role": "user", "content": "hi", "tool_calls": [CALL]}, "messages[0].tool_calls"),
    ({"role": "tool", "tool_call_id": "call_1", "content": "x", "tool_calls": [CALL]}, "messages[0].tool_calls"),
])
def test_malformed_messages_are_refused_with_their_path(message, param):
    refused(body(messages=[message]), "invalid_request", param)


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
    {"type": "file", "file": {"file_id": "file-1"}},
    {"type": "refusal", "refusal": "no"},
    {"type": "TEXT", "text": "hi"},
])
def test_a_part_other_than_text_is_unsupported_content(part):
    error = refused(body(messages=[{"role": "user", "content": [{"type": "text", "text": "Look:"}, part]}]),
                    "unsupported_content", "messages[0].content[1].type")
    assert repr(part["type"]) in error.message


def test_text_parts_are_joined_into_one_string():
    request = parse(messages=[{"role": "system", "content": [{"type": "text", "text": "Be "},
                                                             {"type": "text", "text": "brief."}]},
                              {"role": "user", "content": [{"type": "text", "text": "Hello, "},
                                                           {"type": "text", "text": "world", "cache_control": {}}]}])
    assert request.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, world"})
    assert request.last_message_text == "Hello, world"


def test_developer_is_sent_as_system_and_name_is_kept():
    named = {"role": "user", "content": "hi", "name": "al"}
    request = parse(messages=[{"role": "developer", "content": "Rules."}, named])
    assert request.messages == ({"role": "system", "content": "Rules."}, named)


def test_empty_string_content_is_allowed():
    assert parse(messages=[{"role": "user", "content": ""}]).last_message_text == ""


def test_assistant_with_tool_calls_and_null_content_then_a_tool_message():
    request = parse(messages=[USER, ASKS_TOOL, TOOL_ANSWER])
    assert request.messages == (
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "content": "12 C", "tool_call_id": "call_1"},
    )
    assert request.last_message_text == "12 C"


def test_assistant_tool_calls_without_content_key_and_with_content():
    no_key = {"role": "assistant", "tool_calls": [CALL]}
    assert parse(messages=[USER, no_key]).messages[1] == {"role": "assistant", "content": None, "tool_calls": [CALL]}
    assert parse(messages=[USER, no_key]).last_message_text == ""
    with_text = {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]}
    assert parse(messages=[USER, with_text]).last_message_text == "Let me look."


def test_tool_calls_keep_only_what_the_provider_needs_and_default_their_type():
    echoed = {"role": "assistant", "content": None, "refusal": None, "audio": None, "function_call": None,
              "annotations": [], "tool_calls": [{"index": 0, "id": "call_1",
                                                 "function": {"name": "get_weather", "arguments": "{}"}}]}
    message = parse(messages=[USER, echoed]).messages[1]
    assert message == {"role": "assistant", "content": None,
                       "tool_calls": [{"id": "call_1", "type": "function",
                                       "function": {"name": "get_weather", "arguments": "{}"}}]}


def test_an_empty_tool_calls_list_is_no_calls():
    assert parse(messages=[{"role": "assistant", "content": "hi", "tool_calls": []}]).messages[0] == {
        "role": "assistant", "content": "hi"}


@pytest.mark.parametrize(("tool_calls", "param"), [
    ("call", "messages[1].tool_calls"),
    ({"id": "c"}, "messages[1].tool_calls"),
    (["call"], "messages[1].tool_calls[0]"),
    ([{**CALL, "id": ""}], "messages[1].tool_calls[0].id"),
    ([{k: v for k, v in CALL.items() if k != "id"}], "messages[1].tool_calls[0].id"),
    ([{**CALL, "type": "custom"}], "messages[1].tool_calls[0].type"),
    ([{**CALL, "function": None}], "messages[1].tool_calls[0].function"),
    ([{**CALL, "function": {"arguments": "{}"}}], "messages[1].tool_calls[0].function.name"),
    ([{**CALL, "function": {"name": "f"}}], "messages[1].tool_calls[0].function.arguments"),
    ([{**CALL, "function": {"name": "f", "arguments": {"city": "Oslo"}}}],
     "messages[1].tool_calls[0].function.arguments"),
    ([CALL, {**CALL, "id": None}], "messages[1].tool_calls[1].id"),
])
def test_malformed_tool_calls_are_refused(tool_calls, param):
    refused(body(messages=[USER, {"role": "assistant", "content": None, "tool_calls": tool_calls}]),
            "invalid_request", param)


@pytest.mark.parametrize("tool_message", [
    {"role": "tool", "content": "12 C"},
    {"role": "tool", "tool_call_id": "", "content": "12 C"},
    {"role": "tool", "tool_call_id": 1, "content": "12 C"},
])
def test_a_tool_message_without_tool_call_id_is_refused(tool_message):
    refused(body(messages=[USER, ASKS_TOOL, tool_message]), "invalid_request", "messages[2].tool_call_id")


def test_a_tool_message_must_answer_an_earlier_call():
    refused(body(messages=[USER, TOOL_ANSWER]), "invalid_request", "messages[1].tool_call_id")
    refused(body(messages=[USER, ASKS_TOOL, {**TOOL_ANSWER, "tool_call_id": "call_2"}]),
            "invalid_request", "messages[2].tool_call_id")
    refused(body(messages=[USER, TOOL_ANSWER, ASKS_TOOL]), "invalid_request", "messages[1].tool_call_id")


def test_a_tool_message_needs_content_and_may_use_text_parts():
    refused(body(messages=[USER, ASKS_TOOL, {**TOOL_ANSWER, "content": None}]), "invalid_request",
            "messages[2].content")
    parts = {**TOOL_ANSWER, "content": [{"type": "text", "text": "12 "}, {"type": "text", "text": "C"}]}
    assert parse(messages=[USER, ASKS_TOOL, parts]).last_message_text == "12 C"


def test_tool_call_id_on_another_role_is_dropped():
    assert parse(messages=[{"role": "user", "content": "hi", "tool_call_id": "x"}]).messages == (
        {"role": "user", "content": "hi"},)


def test_too_many_messages_is_context_length_exceeded():
    assert len(parse(messages=[USER] * fmt.MAX_MESSAGES).messages) == fmt.MAX_MESSAGES
    refused(body(messages=[USER] * (fmt.MAX_MESSAGES + 1)), "context_length_exceeded", "messages")
    refused(body(messages=[USER] * 3), "context_length_exceeded", "messages", max_messages=2)


def test_total_text_is_limited_above_a_two_megabyte_prompt():
    assert fmt.MAX_TOTAL_CHARS >= 4_000_000
    prompt = "x" * 2_000_000  # must reach the preflight: a small wallet makes it a 402, not a 400
    assert parse(messages=[{"role": "user", "content": prompt}]).last_message_text == prompt
    refused(body(messages=[{"role": "user", "content": "x" * (fmt.MAX_TOTAL_CHARS + 1)}]),
            "context_length_exceeded", "messages")


def test_total_text_counts_every_string_value():
    fields = {"model": "mm", "messages": [{"role": "user", "content": "abcd"}], "user": "uuuu"}
    parse_chat_request(body(**fields), max_total_chars=14)  # "mm" + "user" + "abcd" + "uuuu"
    refused(body(**fields), "context_length_exceeded", "messages", max_total_chars=13)
    refused(body(**fields, metadata={"note": "x"}), "context_length_exceeded", "messages", max_total_chars=14)


def test_chat_messages_are_fresh_copies():
    request = parse(messages=[USER, ASKS_TOOL, TOOL_ANSWER])
    copied = request.chat_messages()
    copied.append({"role": "user", "content": "more"})
    copied[1]["tool_calls"][0]["id"] = "changed"
    assert request.chat_messages() == list(request.messages)
    assert request.messages[1]["tool_calls"][0]["id"] == "call_1"


# --- stream, stream_options, max_tokens ------------------------------------------------------

def test_stream_and_include_usage():
    assert (parse().stream, parse().include_usage) == (False, False)
    request = parse(stream=True, stream_options={"include_usage": True, "include_obfuscation": False})
    assert (request.stream, request.include_usage) == (True, True)
    assert parse(stream=True, stream_options={"include_usage": False}).include_usage is False
    assert parse(stream=True, stream_options=None).include_usage is False
    assert parse(stream=None).stream is False


@pytest.mark.parametrize(("fields", "param"), [
    ({"stream": "true"}, "stream"),
    ({"stream": 1}, "stream"),
    ({"stream": True, "stream_options": True}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
])
def test_stream_fields_must_be_booleans(fields, param):
    refused(body(**fields), "invalid_request", param)


@pytest.mark.parametrize(("fields", "expected"), [
    ({}, None),
    ({"max_tokens": 100}, 100),
    ({"max_completion_tokens": 50}, 50),
    ({"max_tokens": 100, "max_completion_tokens": 50}, 50),
    ({"max_tokens": 20, "max_completion_tokens": 50}, 20),
    ({"max_tokens": None, "max_completion_tokens": 7}, 7),
])
def test_max_tokens_or_max_completion_tokens_the_smaller_wins(fields, expected):
    assert parse(**fields).max_tokens == expected


@pytest.mark.parametrize("key", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("value", [0, -1, 1.5, 10.0, True, "10", [10]])
def test_max_tokens_must_be_a_positive_integer(key, value):
    refused(body(**{key: value}), "invalid_request", key)


# --- refused and ignored fields --------------------------------------------------------------------

@pytest.mark.parametrize("n", [..., None, 1])
def test_n_of_one_is_fine(n):
    assert parse(n=n).messages


@pytest.mark.parametrize("n", [2, 0, -1, 10])
def test_n_other_than_one_is_unsupported(n):
    refused(body(n=n), "unsupported_parameter", "n")


@pytest.mark.parametrize("n", ["1", 1.0, True])
def test_n_must_be_an_integer(n):
    refused(body(n=n), "invalid_request", "n")


@pytest.mark.parametrize(("fields", "param"), [
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 3}, "logprobs"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"modalities": ["audio"]}, "modalities"),
    ({"logit_bias": {"50256": -100}}, "logit_bias"),
    ({"web_search_options": {}}, "web_search_options"),
])
def test_fields_whose_meaning_cannot_be_honoured_are_unsupported(fields, param):
    refused(body(**fields), "unsupported_parameter", param)


@pytest.mark.parametrize(("fields", "param"), [
    ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": "3"}, "top_logprobs"),
])
def test_logprob_fields_of_the_wrong_type(fields, param):
    refused(body(**fields), "invalid_request", param)


def test_harmless_values_of_refusable_fields_and_unknown_fields_are_ignored():
    request = parse(logprobs=False, top_logprobs=0, modalities=["text"], logit_bias={}, functions=None,
                    function_call=None, audio=None, web_search_options=None, store=True, metadata={"a": "b"},
                    service_tier="auto", reasoning_effort="low", prediction={"type": "content", "content": "x"},
                    prompt_cache_key="k", something_new={"x": [1, 2]})
    assert request.passthrough == {}


# --- passthrough -------------------------------------------------------------------------------------

PASSTHROUGH = {
    "temperature": 0.7, "top_p": 1, "stop": ["\n\n", "END"], "seed": -42, "presence_penalty": -2,
    "frequency_penalty": 1.5, "response_format": {"type": "json_schema", "json_schema": {
        "name": "answer", "strict": True, "schema": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
    "tools": [WEATHER_TOOL, {"type": "custom", "custom": {"name": "grammar"}}],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False, "user": "user-123",
}


def test_passthrough_is_kept_exactly():
    request = parse(**PASSTHROUGH)
    assert request.passthrough == PASSTHROUGH
    assert json.dumps(request.passthrough, sort_keys=True) == json.dumps(PASSTHROUGH, sort_keys=True)
    assert request.tools == PASSTHROUGH["tools"]


def test_passthrough_leaves_out_nulls_and_keeps_simple_forms():
    assert parse(**dict.fromkeys(PASSTHROUGH)).passthrough == {}
    assert parse(stop="END", tool_choice="required", temperature=0, top_p=0.0).passthrough == {
        "stop": "END", "tool_choice": "required", "temperature": 0, "top_p": 0.0}
    assert parse().tools is None


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": [1]}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": "1"}, "frequency_penalty"),
    ({"seed": 1.5}, "seed"),
    ({"seed": True}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"seed": "7"}, "seed"),
    ({"stop": 5}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop": {"a": 1}}, "stop"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {}}, "response_format.type"),
    ({"response_format": {"type": 1}}, "response_format.type"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": ["get_weather"]}, "tools[0]"),
    ({"tools": [{"function": {"name": "f"}}]}, "tools[0]"),
    ({"tools": [WEATHER_TOOL, {"type": "function"}]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}]}, "tools[0].function.parameters"),
    ({"tool_choice": 5}, "tool_choice"),
    ({"tool_choice": ["auto"]}, "tool_choice"),
    ({"parallel_tool_calls": "false"}, "parallel_tool_calls"),
    ({"user": 5}, "user"),
])
def test_passthrough_of_the_wrong_type_is_refused_with_its_param(fields, param):
    refused(body(**fields), "invalid_request", param)


def test_seed_bounds_are_the_signed_64_bit_range():
    assert parse(seed=2**63 - 1).passthrough == {"seed": 2**63 - 1}
    assert parse(seed=-(2**63)).passthrough == {"seed": -(2**63)}


def test_canonical_ignores_key_order_and_spacing():
    one = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 1}')
    two = parse_chat_request(b'{"temperature":1,"messages":[{"content":"hi","role":"user"}],"model":"m"}')
    assert one == two
    assert one.canonical() == two.canonical()
    assert one.canonical() != parse_chat_request(body(model="m", temperature=0.5)).canonical()


# --- What the official SDK sends is accepted --------------------------------------------------------

class FakeServer:
    """An httpx2 transport standing in for Pantheon: records each request's JSON body and answers
    with what the test queued (status, body bytes or dict, headers), the last answer again once
    the queue is empty (SDK retries)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.answers: list[tuple[int, bytes | dict, dict]] = []
        self.last: tuple[int, bytes | dict, dict] | None = None

    def queue(self, status: int, content: bytes | dict, headers: dict | None = None) -> None:
        self.answers.append((status, content, headers or {}))

    def handler(self, request):
        self.requests.append(json.loads(request.content) if request.content else {})
        if self.answers:
            self.last = self.answers.pop(0)
        status, content, headers = self.last
        if isinstance(content, dict):
            return httpx2.Response(status, json=content, headers=headers)
        return httpx2.Response(status, content=content,
                               headers={"content-type": "text/event-stream", **headers})

    def client(self, max_retries: int = 0):
        return openai.OpenAI(api_key="pk-test", base_url="http://pantheon.test/v1", max_retries=max_retries,
                             http_client=httpx2.Client(transport=httpx2.MockTransport(self.handler)))

    def async_client(self):
        return openai.AsyncOpenAI(api_key="pk-test", base_url="http://pantheon.test/v1", max_retries=0,
                                  http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(self.handler)))


@pytest.fixture
def server() -> FakeServer:
    return FakeServer()


def a_completion(content="Hello!", tool_calls=None, finish="stop") -> dict:
    return fmt.completion_body(TURN_ID, CREATED, "openai/gpt-4o-mini", content, tool_calls, finish,
                               Usage(prompt_tokens=12, completion_tokens=3), Decimal("0.0000123"))


@needs_sdk
def test_what_the_sdk_sends_parses(server):
    server.queue(200, a_completion())
    client = server.client()
    client.chat.completions.create(model="openai/gpt-4o-mini", messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
        max_completion_tokens=64, temperature=0.2, stop=["END"], seed=7, user="u1", n=1,
        extra_body={"models": ["openai/gpt-4o-mini", "fake/echo"]})
    request = parse_chat_request(json.dumps(server.requests[-1]))
    assert request.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"})
    assert (request.max_tokens, request.models) == (64, ("openai/gpt-4o-mini", "fake/echo"))
    assert request.passthrough == {"temperature": 0.2, "stop": ["END"], "seed": 7, "user": "u1"}

    server.queue(200, fmt.DONE)
    list(client.chat.completions.create(model="m", messages=[USER], stream=True,
                                        stream_options={"include_usage": True}))
    request = parse_chat_request(json.dumps(server.requests[-1]))
    assert (request.stream, request.include_usage) == (True, True)


@needs_sdk
def test_a_tool_round_trip_from_the_sdk_parses(server):
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city":"Oslo"}')
    server.queue(200, a_completion(content="", tool_calls=[call], finish="tool_calls"))
    client = server.client()
    messages: list = [{"role": "user", "content": "Weather in Oslo?"}]
    first = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    assert first.choices[0].finish_reason == "tool_calls"
    assert first.choices[0].message.content is None
    asked = first.choices[0].message.tool_calls[0]
    # The common client pattern: the SDK's own message object goes back into the history.
    messages += [first.choices[0].message, {"role": "tool", "tool_call_id": asked.id, "content": "12 C"}]
    server.queue(200, a_completion(content="12 C in Oslo."))
    second = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == "12 C in Oslo."
    request = parse_chat_request(json.dumps(server.requests[-1]))
    assert request.messages[1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]}
    assert request.last_message_text == "12 C"
    assert request.tools == [WEATHER_TOOL]


# --- Rendering -------------------------------------------------------------------------------------

@needs_sdk
def test_completion_body_is_a_chat_completion():
    completion = a_completion()
    assert completion == {
        "id": "chatcmpl-12345678-1234-5678-1234-567812345678", "object": "chat.completion", "created": CREATED,
        "model": "openai/gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15, "cost": "0.000012"},
    }
    parsed = ChatCompletion.model_validate(completion)
    assert parsed.usage.total_tokens == 15
    assert parsed.usage.model_extra["cost"] == "0.000012"
    assert parsed.choices[0].message.content == "Hello!"


@needs_sdk
def test_completion_body_with_tool_calls():
    calls = [ToolCall(id="c1", name="get_weather", arguments='{"city":"Oslo"}'), ToolCall(id="c2", name="now",
                                                                                           arguments="")]
    completion = a_completion(content="", tool_calls=calls, finish="")
    message = completion["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
        {"id": "c2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}
    assert completion["choices"][0]["finish_reason"] == "tool_calls"
    parsed = ChatCompletion.model_validate(completion)
    assert [call.function.name for call in parsed.choices[0].message.tool_calls] == ["get_weather", "now"]
    assert a_completion(content="Checking.", tool_calls=calls)["choices"][0]["message"]["content"] == "Checking."


@pytest.mark.parametrize("cost", [Decimal("0"), Decimal("1.5"), Decimal("0.0000005"), Decimal("123.4567894")])
def test_cost_is_a_six_place_string(cost):
    rendered = fmt.completion_body("t", CREATED, "m", "x", None, "stop", Usage(1, 1), cost)["usage"]["cost"]
    assert rendered == f"{cost.quantize(Decimal('0.000001'), rounding='ROUND_HALF_UP'):f}"
    assert len(rendered.split(".")[1]) == 6


@pytest.mark.parametrize(("reason", "tool_calls", "expected"), [
    ("stop", False, "stop"), ("length", False, "length"), ("tool_calls", True, "tool_calls"),
    ("content_filter", False, "content_filter"), ("max_tokens", False, "length"), ("tool_use", True, "tool_calls"),
    ("end_turn", False, "stop"), ("", False, "stop"), (None, False, "stop"), ("", True, "tool_calls"),
    ("weird", False, "stop"), ("stop", True, "stop"),
])
def test_finish_reasons_are_openai_ones(reason, tool_calls, expected):
    assert fmt.normalize_finish_reason(reason, tool_calls=tool_calls) == expected


def sse_payload(line: bytes):
    assert line.startswith(b"data: ") and line.endswith(b"\n\n")
    assert line.count(b"\n") == 2  # one SSE line, whatever the text holds
    return json.loads(line[6:].decode())


@needs_sdk
def test_chunks_are_compact_utf8_data_lines():
    first = fmt.chunk(TURN_ID, CREATED, "m", fmt.role_delta())
    assert first == (b'data: {"id":"chatcmpl-12345678-1234-5678-1234-567812345678","object":"chat.completion.chunk",'
                     b'"created":1750000000,"model":"m","choices":[{"index":0,"delta":{"role":"assistant",'
                     b'"content":""},"finish_reason":null}]}\n\n')
    line = fmt.chunk(TURN_ID, CREATED, "m", fmt.content_delta("Grüße\nzwei Zeilen\r\u2028"))
    assert "Grüße".encode() in line
    assert sse_payload(line)["choices"][0]["delta"] == {"content": "Grüße\nzwei Zeilen\r\u2028"}
    for each in (first, line):
        parsed = ChatCompletionChunk.model_validate(sse_payload(each))
        assert parsed.id == "chatcmpl-12345678-1234-5678-1234-567812345678"


@needs_sdk
def test_last_chunk_and_usage_chunk():
    last = sse_payload(fmt.chunk(TURN_ID, CREATED, "m", {}, "max_tokens"))
    assert last["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    ChatCompletionChunk.model_validate(last)
    usage = sse_payload(fmt.usage_chunk(TURN_ID, CREATED, "m", Usage(10, 5), Decimal("0.25")))
    assert usage["choices"] == []
    assert usage["usage"] == {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15, "cost": "0.250000"}
    assert ChatCompletionChunk.model_validate(usage).usage.completion_tokens == 5


@needs_sdk
def test_tool_call_deltas():
    first = fmt.tool_call_delta(0, id="c1", name="get_weather")
    assert first == {"tool_calls": [{"index": 0, "id": "c1", "type": "function",
                                     "function": {"arguments": "", "name": "get_weather"}}]}
    assert fmt.tool_call_delta(0, arguments='{"ci') == {"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}
    for delta in (first, fmt.tool_call_delta(1, arguments="x")):
        ChatCompletionChunk.model_validate(sse_payload(fmt.chunk(TURN_ID, CREATED, "m", delta)))


def test_a_lone_surrogate_in_a_chunk_does_not_raise():
    line = fmt.chunk(TURN_ID, CREATED, "m", fmt.content_delta("a\ud800b"))
    assert b"\\ud800" in line
    line.decode("utf-8")


def test_error_line_and_the_fixed_lines():
    error = OpenAIError(502, "upstream_error", "The provider failed.")
    expected = {"error": {"message": "The provider failed.", "type": "api_error", "param": None,
                          "code": "upstream_error"}}
    assert sse_payload(fmt.error_line(error)) == expected
    assert sse_payload(fmt.error_line(expected["error"])) == expected
    assert sse_payload(fmt.error_line(expected)) == expected
    assert fmt.DONE == b"data: [DONE]\n\n"
    assert fmt.ping() == b": ping\n\n"


@pytest.mark.parametrize(("model", "owner"), [
    ("openai/gpt-4o-mini", "openai"), ("fake/echo", "fake"), ("meta-llama/llama-3.1-8b:free", "meta-llama"),
    ("gpt-4o", "pantheon"), ("/odd", "pantheon"), ("a/b/c", "a"),
])
def test_owned_by(model, owner):
    assert fmt.owned_by(model) == owner


@needs_sdk
def test_models_list():
    listed = fmt.models_list(["openai/gpt-4o-mini", SimpleNamespace(model="fake/echo"), "local"], CREATED)
    assert listed == {"object": "list", "data": [
        {"id": "openai/gpt-4o-mini", "object": "model", "created": CREATED, "owned_by": "openai"},
        {"id": "fake/echo", "object": "model", "created": CREATED, "owned_by": "fake"},
        {"id": "local", "object": "model", "created": CREATED, "owned_by": "pantheon"}]}
    assert [Model.model_validate(entry).id for entry in listed["data"]] == ["openai/gpt-4o-mini", "fake/echo", "local"]
    assert fmt.models_list([], CREATED) == {"object": "list", "data": []}


# --- Rendered answers through the SDK's own client --------------------------------------------------

def a_stream(*, include_usage: bool = True, fail: OpenAIError | None = None) -> bytes:
    """What the adapter will send for a streamed turn that calls a tool in two fragments."""
    lines = [fmt.chunk(TURN_ID, CREATED, "m", fmt.role_delta()), fmt.ping(),
             fmt.chunk(TURN_ID, CREATED, "m", fmt.content_delta("Checking ")),
             fmt.chunk(TURN_ID, CREATED, "m", fmt.content_delta("Oslo.")), fmt.ping()]
    if fail:
        return b"".join([*lines, fmt.error_line(fail)])
    lines += [fmt.chunk(TURN_ID, CREATED, "m", fmt.tool_call_delta(0, id="call_1", name="get_weather")),
              fmt.chunk(TURN_ID, CREATED, "m", fmt.tool_call_delta(0, arguments='{"city":')),
              fmt.chunk(TURN_ID, CREATED, "m", fmt.tool_call_delta(0, arguments='"Oslo"}')),
              fmt.chunk(TURN_ID, CREATED, "m", {}, fmt.normalize_finish_reason("", tool_calls=True))]
    if include_usage:
        lines.append(fmt.usage_chunk(TURN_ID, CREATED, "m", Usage(9, 4), Decimal("0.000042")))
    return b"".join([*lines, fmt.DONE])


@needs_sdk
def test_the_sdk_reads_a_completion(server):
    server.queue(200, a_completion(), {"X-Pantheon-Turn-Id": str(TURN_ID)})
    completion = server.client().chat.completions.create(model="m", messages=[USER])
    assert completion.id == f"chatcmpl-{TURN_ID}"
    assert (completion.choices[0].message.content, completion.usage.prompt_tokens) == ("Hello!", 12)


@needs_sdk
def test_the_sdk_reads_a_stream_with_pings_tool_fragments_and_usage(server):
    server.queue(200, a_stream())
    chunks = list(server.client().chat.completions.create(model="m", messages=[USER], stream=True,
                                                          stream_options={"include_usage": True}))
    assert {c.id for c in chunks} == {f"chatcmpl-{TURN_ID}"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Checking Oslo."
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 13

    # The SDK's stream helper joins tool call fragments by index.
    with server.client().chat.completions.stream(model="m", messages=[USER]) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.message.content == "Checking Oslo."
    assert choice.finish_reason == "tool_calls"
    assert [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("call_1", "get_weather", '{"city":"Oslo"}')]


@needs_sdk
def test_the_sdk_reads_a_stream_without_usage(server):
    server.queue(200, a_stream(include_usage=False))
    chunks = list(server.client().chat.completions.create(model="m", messages=[USER], stream=True))
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


@needs_sdk
def test_an_error_line_mid_stream_raises_api_error(server):
    server.queue(200, a_stream(fail=OpenAIError(502, "upstream_error", "The provider failed mid-answer.")))
    received = []
    with pytest.raises(openai.APIError) as caught:
        for c in server.client().chat.completions.create(model="m", messages=[USER], stream=True):
            received.append(c)
    assert len(received) == 3
    assert caught.value.message == "The provider failed mid-answer."
    assert (caught.value.code, caught.value.type) == ("upstream_error", "api_error")


@needs_sdk
@pytest.mark.parametrize(("status", "code", "exception"), [
    (400, "invalid_json", "BadRequestError"),
    (401, "invalid_api_key", "AuthenticationError"),
    (403, "model_not_allowed", "PermissionDeniedError"),
    (404, "model_not_found", "NotFoundError"),
    (429, "rate_limited", "RateLimitError"),
    (502, "upstream_error", "InternalServerError"),
    (504, "upstream_timeout", "InternalServerError"),
])
def test_the_sdk_maps_error_bodies_to_its_exceptions(server, status, code, exception):
    server.queue(status, OpenAIError(status, code, "No.", "model").body())
    with pytest.raises(getattr(openai, exception)) as caught:
        server.client().chat.completions.create(model="m", messages=[USER])
    assert (caught.value.status_code, caught.value.code, caught.value.param) == (status, code, "model")
    assert caught.value.type == fmt.error_type(status)


@needs_sdk
@pytest.mark.parametrize("code", ["insufficient_credits", "key_budget_exceeded"])
def test_a_402_is_an_api_status_error_the_sdk_does_not_retry(server, code):
    server.queue(402, OpenAIError(402, code, "Not enough credits.").body())
    with pytest.raises(openai.APIStatusError) as caught:
        server.client(max_retries=2).chat.completions.create(model="m", messages=[USER])
    assert type(caught.value) is openai.APIStatusError
    assert (caught.value.status_code, caught.value.code, caught.value.type) == (402, code, "insufficient_quota")
    assert len(server.requests) == 1  # a retry could not help, and none is made


@needs_sdk
def test_the_sdk_lists_models(server):
    server.queue(200, fmt.models_list(["openai/gpt-4o-mini", "fake/echo"], CREATED))
    models = list(server.client().models.list())
    assert [(m.id, m.owned_by, m.created) for m in models] == [("openai/gpt-4o-mini", "openai", CREATED),
                                                                ("fake/echo", "fake", CREATED)]


@needs_sdk
async def test_the_async_sdk_reads_a_stream(server):
    server.queue(200, a_stream())
    stream = await server.async_client().chat.completions.create(model="m", messages=[USER], stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Checking Oslo."


@pytest.mark.parametrize("text", ["p0", "", "a \"quoted\" \\ line\nbreak", "é ünïcode 🙂", "\u2028", "\ud800 lone"])
def test_content_chunks_render_exactly_as_chunk_does(text):
    import uuid

    from sessions_app.openai_format import ContentChunks, chunk, content_delta

    turn = uuid.uuid4()
    rendered = ContentChunks(turn, 1700000000, "openai/gpt-4o-mini")(text)
    assert rendered == chunk(turn, 1700000000, "openai/gpt-4o-mini", content_delta(text))
