"""The OpenAI Chat Completions wire format (SPEC section 14): parse a request body, render
answers, chunks and errors. Pure: no database, no views, no settings; the `/v1` views
(the adapter over the turn lifecycle) call it. docs/openai.md is the client-facing contract.

Request fields (`parse_chat_request`); a null value is the same as an absent field:

| field                                  | treatment                                                    |
|----------------------------------------|--------------------------------------------------------------|
| `model`                                | non-empty string; required unless `models` is non-empty      |
| `models` (Pantheon's, SPEC 15)         | at most MAX_MODELS non-empty strings; `[]`: no fallbacks     |
| `messages`                             | 1..MAX_MESSAGES messages, see below                          |
| `stream`                               | bool                                                         |
| `stream_options.include_usage`         | bool (other `stream_options` keys ignored)                   |
| `max_tokens`, `max_completion_tokens`  | positive int; both given: the smaller (stricter) cap         |
| `temperature`                          | number in [0, 2]; passed                                     |
| `top_p`                                | number in [0, 1]; passed                                     |
| `presence_penalty`, `frequency_penalty` | number in [-2, 2]; passed                                   |
| `seed`                                 | signed 64-bit int; passed                                    |
| `stop`                                 | string or list of strings; passed                            |
| `response_format`                      | object with a string `type`; passed                          |
| `tools`                                | objects with a string `type` (`function`: with a name); passed |
| `tool_choice`                          | string or object; passed                                     |
| `parallel_tool_calls`                  | bool; passed                                                 |
| `user`                                 | string; passed                                               |
| `n` other than 1                       | 400 `unsupported_parameter`: one choice is rendered          |
| `logprobs: true`, `top_logprobs` > 0   | 400 `unsupported_parameter`: answers carry no logprobs       |
| `functions`, `function_call`           | 400 `unsupported_parameter`: deprecated, use `tools`         |
| `audio`, `modalities` but `["text"]`   | 400 `unsupported_parameter`: text only                       |
| `logit_bias` (non-empty), `web_search_options` | 400 `unsupported_parameter`: dropping them changes the answer |
| anything else (`store`, `metadata`, `service_tier`, `reasoning_effort`, `prediction`, ...) | ignored |

Messages: `role` is `system`, `developer`, `user`, `assistant` or `tool`; `developer` is sent
upstream as `system` (every OpenAI-compatible provider knows `system`; OpenAI itself treats
`system` as `developer` on the models that have the distinction). `content` is a string or a
non-empty list of `{"type": "text", "text": ...}` parts, joined with no separator (as LiteLLM
does for providers without part lists); any other part type is 400 `unsupported_content`.
`content` may be null or absent only on an assistant message with `tool_calls` (a list of
`{"id", "type": "function", "function": {"name", "arguments": <string>}}`). A `tool` message
needs a `tool_call_id` naming a call of an earlier assistant message (as OpenAI requires;
otherwise the provider's 400 would reach the client as a 502). `name` (a string) is kept; other
message keys (`refusal`, `audio`, `annotations`, ... which SDKs echo back) are dropped.

Whole request: any string anywhere (keys too, ignored fields too) with NUL or an unpaired
surrogate is 400 `invalid_text` (PostgreSQL cannot store it, core/text.py); a number that is
not finite (`NaN`, `1e999`) is 400 `invalid_json` (it would be invalid JSON upstream); more
than MAX_TOTAL_CHARS characters of string values is 400 `context_length_exceeded` (OpenAI's
code for a prompt too long, which clients already handle by trimming). The limit is a
sanity bound, well above a 2 MB prompt: a prompt the wallet cannot afford is the preflight's
402, not a 400. PANTHEON_MAX_MESSAGE_CHARS (the turn API's limit on the one new message) is
not applied: here the whole `messages` list is the prompt, and it is billed as such.

400 codes: `invalid_json` (not JSON, not UTF-8, not an object, nested deeper than
MAX_DEPTH or than the parser follows, a non-finite number), `invalid_text`,
`invalid_request` (a field missing or of the wrong type or value; `param` names it, e.g.
`messages[2].content[0].text`), `unsupported_parameter`, `unsupported_content`,
`context_length_exceeded`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, Protocol

from core.json_body import InvalidJson, load_json
from core.money import format_money
from core.text import find_unstorable

__all__ = [
    "DONE",
    "MAX_DEPTH",
    "MAX_MESSAGES",
    "MAX_MODELS",
    "MAX_PARAM_CHARS",
    "MAX_TOTAL_CHARS",
    "ChatRequest",
    "OpenAIError",
    "chunk",
    "chunk_body",
    "completion_body",
    "completion_id",
    "content_delta",
    "data_line",
    "error_line",
    "error_type",
    "models_list",
    "normalize_finish_reason",
    "owned_by",
    "parse_chat_request",
    "ping",
    "role_delta",
    "tool_call_delta",
    "usage_chunk",
]

MAX_MESSAGES = 2048
# Characters of all string values in a request: 4x a 2 MB prompt, so such a prompt reaches the
# preflight (a 402 on a small wallet); 4 M ASCII characters also fit Django's default body cap.
MAX_TOTAL_CHARS = 4_000_000
MAX_MODELS = 16
# Nesting of the whole body. The C parser follows ~10^4 levels, but Python code downstream
# (deepcopy, dataclasses.asdict, recursive walks) stops near 1000; real tool schemas use ~10.
MAX_DEPTH = 64
# An error's `param` and message quote the client's keys and values at most this long.
MAX_PARAM_CHARS = 200
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
_INT64 = 2**63
_PARTS_NOTE = "a string or a non-empty list of text parts"


# --- Errors -------------------------------------------------------------------------------

def error_type(status: int) -> str:
    """The OpenAI `type` for an HTTP status (SPEC 14)."""
    if status == 402:
        return "insufficient_quota"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "api_error"
    return "invalid_request_error"  # 400, 401, 403, 404 and any other 4xx


class OpenAIError(Exception):
    """A refusal in OpenAI's shape: `status`, `code`, `message`, `param`, `type`; `headers`
    the response needs besides the body (a 429's Retry-After)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None, *,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return error_type(self.status)

    def error(self) -> dict[str, Any]:
        """The inner object: `{"message", "type", "param", "code"}`."""
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}

    def body(self) -> dict[str, Any]:
        return {"error": self.error()}

    def __repr__(self) -> str:
        return f"OpenAIError({self.status}, {self.code!r}, {self.message!r}, param={self.param!r})"


def _bad(param: str | None, message: str, code: str = "invalid_request") -> OpenAIError:
    return OpenAIError(400, code, message, param)


# --- Parsing ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A validated `/v1/chat/completions` body. `messages` are the gateway's ChatMessage dicts
    (string content, `developer` as `system`); `passthrough` the provider fields as given
    (nulls left out); `models` None when the request gave none (configured fallbacks apply)."""

    model: str
    messages: tuple[dict[str, Any], ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    models: tuple[str, ...] | None = None
    passthrough: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def last_message_text(self) -> str:
        """What the turn stores as its user message: the last message's text ("" for an
        assistant message that only calls tools)."""
        return self.messages[-1]["content"] or ""

    @property
    def candidates(self) -> tuple[str, ...]:
        """`model`, then the request's `models`, each once (SPEC 15: `model` goes first)."""
        return tuple(dict.fromkeys((self.model, *(self.models or ()))))

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        return self.passthrough.get("tools")

    def chat_messages(self) -> list[dict[str, Any]]:
        """Fresh copies of `messages` for the gateway (which may append to the list)."""
        return copy.deepcopy(list(self.messages))

    def canonical(self) -> str:
        """This request as sorted compact JSON: what an Idempotency-Key fingerprint hashes,
        the same whatever the body's key order and spacing."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_chat_request(raw: bytes | str, *, max_messages: int = MAX_MESSAGES,
                       max_total_chars: int = MAX_TOTAL_CHARS) -> ChatRequest:
    """Validate a `/v1/chat/completions` body; raises OpenAIError (a 400) naming the problem."""
    try:
        data = load_json(raw)
    except InvalidJson as exc:
        # load_json's `parse_error` (malformed) and `invalid_json` (too deep) are one code here.
        raise _bad(None, exc.detail, "invalid_json") from None
    if not isinstance(data, dict):
        raise _bad(None, "The body must be a JSON object.", "invalid_json")
    _check_values(data, max_total_chars)

    messages = _messages(data.get("messages"), max_messages)
    model, models = _model(data)
    stream = _bool(data, "stream") or False
    stream_options = _object(data, "stream_options") or {}
    include_usage = _bool(stream_options, "include_usage", "stream_options.include_usage") or False
    _refuse_unsupported(data)
    return ChatRequest(model=model, models=models, messages=messages, stream=stream, include_usage=include_usage,
                       max_tokens=_max_tokens(data), passthrough=_passthrough(data))


def _check_values(data: Any, max_total_chars: int) -> None:
    """One pass over every value: nesting depth, text the database can store, finite
    numbers, total size."""
    total, bad_text, bad_number = 0, False, False
    # Iterative: the parser accepts nesting far deeper than Python's recursion limit.
    stack = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            total += len(value)
            bad_text = bad_text or find_unstorable(value) >= 0
        elif isinstance(value, dict | list):
            if depth >= MAX_DEPTH:
                raise _bad(None, f"The JSON body is nested more than {MAX_DEPTH} levels deep.", "invalid_json")
            if isinstance(value, dict):
                bad_text = bad_text or any(find_unstorable(key) >= 0 for key in value)
                value = value.values()
            stack.extend((item, depth + 1) for item in value)
        elif isinstance(value, float) and not math.isfinite(value):
            bad_number = True
    # Paths are built only for the error (a second walk), not for every value of a good request.
    if bad_number:
        raise _bad(_locate(data, lambda v: isinstance(v, float) and not math.isfinite(v)),
                   "Numbers must be finite.", "invalid_json")
    if bad_text:
        raise _bad(_locate(data, _unstorable), "Text must not contain NUL characters or unpaired surrogates.",
                   "invalid_text")
    if total > max_total_chars:
        raise _bad("messages", f"The request has more than {max_total_chars} characters of text.",
                   "context_length_exceeded")


def _unstorable(value: Any) -> bool:
    if isinstance(value, str):
        return find_unstorable(value) >= 0
    return isinstance(value, dict) and any(find_unstorable(key) >= 0 for key in value)  # a bad key: its object


def _locate(data: Any, found: Callable[[Any], bool]) -> str | None:
    """The path (`messages[0].content`) of the first value for which found(value) holds, cut
    to MAX_PARAM_CHARS (it names keys the client chose); None: the body itself."""
    stack: list[tuple[Any, str]] = [(data, "")]
    while stack:
        value, path = stack.pop()
        if found(value):
            return (path if len(path) <= MAX_PARAM_CHARS else path[:MAX_PARAM_CHARS - 1] + "\u2026") or None
        if isinstance(value, dict):
            stack.extend((item, f"{path}.{k}" if path else k) for k, item in reversed(value.items()))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value))))
    return None


def _bool(data: Mapping[str, Any], key: str, param: str | None = None) -> bool | None:
    value = data.get(key)
    if value is not None and not isinstance(value, bool):
        raise _bad(param or key, f"{param or key} must be true or false.")
    return value


def _object(data: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    value = data.get(key)
    if value is not None and not isinstance(value, dict):
        raise _bad(key, f"{key} must be an object.")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _non_empty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _model(data: Mapping[str, Any]) -> tuple[str, tuple[str, ...] | None]:
    models = data.get("models")
    if models is not None:
        if not isinstance(models, list) or not all(_non_empty_str(m) for m in models):
            raise _bad("models", "models must be a list of non-empty strings.")
        if len(models) > MAX_MODELS:
            raise _bad("models", f"models must have at most {MAX_MODELS} entries.")
        models = tuple(models)
    model = data.get("model")
    if model is None and models:
        return models[0], models
    if not _non_empty_str(model):
        raise _bad("model", "model is required and must be a non-empty string.")
    return model, models


def _max_tokens(data: Mapping[str, Any]) -> int | None:
    caps = []
    for key in ("max_tokens", "max_completion_tokens"):
        value = data.get(key)
        if value is None:
            continue
        if not _is_int(value) or value < 1:
            raise _bad(key, f"{key} must be a positive integer.")
        caps.append(value)
    return min(caps) if caps else None


def _refuse_unsupported(data: Mapping[str, Any]) -> None:
    """Known OpenAI fields whose meaning Pantheon cannot honour: refused, not silently dropped."""
    n = data.get("n")
    if n is not None:
        if not _is_int(n):
            raise _bad("n", "n must be an integer.")
        if n != 1:
            raise _bad("n", "Only n=1 is supported: one choice per request.", "unsupported_parameter")
    if _bool(data, "logprobs"):
        raise _bad("logprobs", "logprobs are not supported.", "unsupported_parameter")
    top_logprobs = data.get("top_logprobs")
    if top_logprobs is not None:
        if not _is_int(top_logprobs):
            raise _bad("top_logprobs", "top_logprobs must be an integer.")
        if top_logprobs:
            raise _bad("top_logprobs", "logprobs are not supported.", "unsupported_parameter")
    for key in ("functions", "function_call"):
        if data.get(key) is not None:
            raise _bad(key, f"{key} is deprecated and not supported; use tools and tool_choice.",
                       "unsupported_parameter")
    if data.get("audio") is not None:
        raise _bad("audio", "Audio output is not supported.", "unsupported_parameter")
    modalities = data.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise _bad("modalities", 'Only modalities ["text"] is supported.', "unsupported_parameter")
    if data.get("logit_bias"):
        raise _bad("logit_bias", "logit_bias is not supported.", "unsupported_parameter")
    if data.get("web_search_options") is not None:
        raise _bad("web_search_options", "web_search_options is not supported.", "unsupported_parameter")


def _passthrough(data: Mapping[str, Any]) -> dict[str, Any]:
    """The provider fields, type-checked lightly: a value the provider would refuse is the
    client's 400 here, not a provider 400 answered as 502 upstream_error (SPEC 15)."""
    kept: dict[str, Any] = {}
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1), ("presence_penalty", -2, 2),
                           ("frequency_penalty", -2, 2)):
        value = data.get(key)
        if value is None:
            continue
        if not _is_number(value) or not low <= value <= high:
            raise _bad(key, f"{key} must be a number from {low} to {high}.")
        kept[key] = value
    seed = data.get("seed")
    if seed is not None:
        if not _is_int(seed) or not -_INT64 <= seed < _INT64:
            raise _bad("seed", "seed must be a 64-bit integer.")
        kept["seed"] = seed
    stop = data.get("stop")
    if stop is not None:
        if not isinstance(stop, str) and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise _bad("stop", "stop must be a string or a list of strings.")
        kept["stop"] = stop
    response_format = _object(data, "response_format")
    if response_format is not None:
        if not _non_empty_str(response_format.get("type")):
            raise _bad("response_format.type", "response_format.type must be a string.")
        kept["response_format"] = response_format
    tools = data.get("tools")
    if tools is not None:
        kept["tools"] = _tools(tools)
    tool_choice = data.get("tool_choice")
    if tool_choice is not None:
        if not isinstance(tool_choice, str | dict):
            raise _bad("tool_choice", "tool_choice must be a string or an object.")
        kept["tool_choice"] = tool_choice
    parallel = _bool(data, "parallel_tool_calls")
    if parallel is not None:
        kept["parallel_tool_calls"] = parallel
    user = data.get("user")
    if user is not None:
        if not isinstance(user, str):
            raise _bad("user", "user must be a string.")
        kept["user"] = user
    return kept


def _tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("tools", "tools must be a list of tool objects.")
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not _non_empty_str(tool.get("type")):
            raise _bad(f"tools[{i}]", "Each tool must be an object with a string type.")
        if tool["type"] == "function":
            function = tool.get("function")
            if not isinstance(function, dict) or not _non_empty_str(function.get("name")):
                raise _bad(f"tools[{i}].function.name", "A function tool needs function.name, a non-empty string.")
            if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
                raise _bad(f"tools[{i}].function.parameters", "function.parameters must be an object.")
    return tools


def _messages(messages: Any, max_messages: int) -> tuple[dict[str, Any], ...]:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "messages is required and must be a non-empty list.")
    if len(messages) > max_messages:
        raise _bad("messages", f"messages must have at most {max_messages} entries.", "context_length_exceeded")
    call_ids: set[str] = set()  # ids of the tool calls asked for so far
    converted = []
    for i, message in enumerate(messages):
        converted.append(_message(message, f"messages[{i}]", call_ids))
    return tuple(converted)


def _message(message: Any, where: str, call_ids: set[str]) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise _bad(where, "Each message must be an object.")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise _bad(f"{where}.role", "role must be one of " + ", ".join(sorted(ROLES)) + ".")
    out: dict[str, Any] = {"role": "system" if role == "developer" else role}
    tool_calls = message.get("tool_calls")
    if tool_calls == []:  # sent by some clients for "no calls"
        tool_calls = None
    if tool_calls is not None:
        if role != "assistant":
            raise _bad(f"{where}.tool_calls", "Only assistant messages carry tool_calls.")
        tool_calls = _tool_calls(tool_calls, f"{where}.tool_calls")
    content = message.get("content")
    if content is None:
        if tool_calls is None:
            raise _bad(f"{where}.content", f"content must be {_PARTS_NOTE} (null only beside tool_calls).")
        out["content"] = None
    else:
        out["content"] = _content_text(content, f"{where}.content")
    name = message.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise _bad(f"{where}.name", "name must be a string.")
        out["name"] = name
    if tool_calls is not None:
        out["tool_calls"] = tool_calls
        call_ids.update(call["id"] for call in tool_calls)
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not _non_empty_str(call_id):
            raise _bad(f"{where}.tool_call_id", "A tool message needs tool_call_id, a non-empty string.")
        if call_id not in call_ids:
            raise _bad(f"{where}.tool_call_id", "tool_call_id must name a tool call of an earlier assistant message.")
        out["tool_call_id"] = call_id
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not content:
        raise _bad(where, f"content must be {_PARTS_NOTE}.")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise _bad(f"{where}[{j}]", "Each content part must be an object with a string type.")
        if part["type"] != "text":
            raise _bad(f"{where}[{j}].type", f"Content parts of type {part['type'][:MAX_PARAM_CHARS]!r} are not "
                       "supported; only text.", "unsupported_content")
        if not isinstance(part.get("text"), str):
            raise _bad(f"{where}[{j}].text", "A text part needs text, a string.")
        texts.append(part["text"])
    return "".join(texts)


def _tool_calls(tool_calls: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(tool_calls, list):
        raise _bad(where, "tool_calls must be a list.")
    calls = []
    for k, call in enumerate(tool_calls):
        at = f"{where}[{k}]"
        if not isinstance(call, dict):
            raise _bad(at, "Each tool call must be an object.")
        if not _non_empty_str(call.get("id")):
            raise _bad(f"{at}.id", "A tool call needs id, a non-empty string.")
        if call.get("type", "function") != "function":
            raise _bad(f"{at}.type", 'A tool call\'s type must be "function".')
        function = call.get("function")
        if not isinstance(function, dict):
            raise _bad(f"{at}.function", "A tool call needs function, an object.")
        if not _non_empty_str(function.get("name")):
            raise _bad(f"{at}.function.name", "function.name must be a non-empty string.")
        if not isinstance(function.get("arguments"), str):
            raise _bad(f"{at}.function.arguments", "function.arguments must be a string (JSON text).")
        # Only what the provider needs: SDKs echo back extras (`index`) no provider wants.
        calls.append({"id": call["id"], "type": "function",
                      "function": {"name": function["name"], "arguments": function["arguments"]}})
    return calls


# --- Rendering ----------------------------------------------------------------------------

class UsageLike(Protocol):
    prompt_tokens: int
    completion_tokens: int


class ToolCallLike(Protocol):
    id: str
    name: str
    arguments: str


class HasModel(Protocol):
    model: str


DONE = b"data: [DONE]\n\n"
_FINISH_REASONS = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
# Spellings of other APIs that providers behind OpenRouter have let through.
_FINISH_ALIASES = {"max_tokens": "length", "tool_use": "tool_calls", "end_turn": "stop", "stop_sequence": "stop",
                   "eos": "stop"}


def completion_id(turn_id: object) -> str:
    return f"chatcmpl-{turn_id}"


def normalize_finish_reason(reason: str | None, *, tool_calls: bool = False) -> str:
    """One of OpenAI's finish reasons (SDKs type it as a closed set): a provider's own
    spelling mapped, an unknown or missing one `stop` (`tool_calls` when the model called tools)."""
    reason = _FINISH_ALIASES.get(reason or "", reason or "")
    if reason in _FINISH_REASONS:
        return reason
    return "tool_calls" if tool_calls else "stop"


def _usage(usage: UsageLike, cost: Decimal) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens, "cost": format_money(cost)}


def _tool_call(call: ToolCallLike) -> dict[str, Any]:
    # The gateway treats "" as "{}"; a client's json.loads("") would fail.
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments or "{}"}}


def completion_body(turn_id: object, created: int, model: str, content: str | None,
                    tool_calls: Sequence[ToolCallLike] | None, finish_reason: str | None, usage: UsageLike,
                    cost: Decimal) -> dict[str, Any]:
    """The non-streaming answer (`chat.completion`); `model` is the model that served."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [_tool_call(call) for call in tool_calls]
        message["content"] = content or None  # OpenAI's shape for a message that only calls tools
    reason = normalize_finish_reason(finish_reason, tool_calls=bool(tool_calls))
    return {"id": completion_id(turn_id), "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": reason}], "usage": _usage(usage, cost)}


def data_line(payload: Any) -> bytes:
    """`data: <compact JSON>\\n\\n`. JSON escapes newlines, so one payload is one SSE line."""
    try:
        return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()
    except UnicodeEncodeError:  # a lone surrogate slipped through: escaped, still valid JSON
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


def role_delta() -> dict[str, Any]:
    """The first chunk's delta, as OpenAI sends it."""
    return {"role": "assistant", "content": ""}


def content_delta(text: str) -> dict[str, Any]:
    return {"content": text}


def tool_call_delta(index: int, *, id: str | None = None, name: str | None = None,
                    arguments: str = "") -> dict[str, Any]:
    """A `delta.tool_calls` fragment: the first of a call carries `id`, `type` and the name,
    later ones only argument text; SDKs join fragments by `index`."""
    function: dict[str, Any] = {"arguments": arguments}
    fragment: dict[str, Any] = {"index": index}
    if id is not None:
        fragment.update(id=id, type="function")
    if name is not None:
        function["name"] = name
    fragment["function"] = function
    return {"tool_calls": [fragment]}


def chunk_body(turn_id: object, created: int, model: str, delta: dict[str, Any],
               finish_reason: str | None = None) -> dict[str, Any]:
    reason = None if finish_reason is None else normalize_finish_reason(finish_reason)
    return {"id": completion_id(turn_id), "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}


def chunk(turn_id: object, created: int, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
    """One `chat.completion.chunk` line. The first delta is `role_delta()`; the last chunk has
    an empty delta and the finish reason (pass
    `normalize_finish_reason(x, tool_calls=True)` after tool calls)."""
    return data_line(chunk_body(turn_id, created, model, delta, finish_reason))


class ContentChunks:
    """The content chunks of one stream, rendered as `chunk(..., content_delta(text))` would
    be, byte for byte, with only the text encoded per chunk: the rest of the line is the
    same for the whole stream, and a stream has a chunk per token."""

    __slots__ = ("_head", "_tail")

    def __init__(self, turn_id: object, created: int, model: str) -> None:
        marker = "\x00"  # a placeholder the text's encoding cannot produce (NUL is escaped)
        line = chunk(turn_id, created, model, content_delta(marker)).decode()
        head, tail = line.split(json.dumps(marker), 1)
        self._head, self._tail = head.encode(), tail.encode()

    def __call__(self, text: str) -> bytes:
        try:
            encoded = json.dumps(text, ensure_ascii=False).encode()
        except UnicodeEncodeError:  # a lone surrogate slipped through: escaped, still valid JSON
            encoded = json.dumps(text).encode()
        return self._head + encoded + self._tail


def usage_chunk(turn_id: object, created: int, model: str, usage: UsageLike, cost: Decimal) -> bytes:
    """The final usage chunk (`choices: []`), sent only when `stream_options.include_usage` asked."""
    return data_line({"id": completion_id(turn_id), "object": "chat.completion.chunk", "created": created,
                      "model": model, "choices": [], "usage": _usage(usage, cost)})


def error_line(error: OpenAIError | Mapping[str, Any]) -> bytes:
    """A failure after the 200: `data: {"error": {...}}`; SDKs raise APIError on it. A mapping
    is the inner error object (or a whole `{"error": ...}` body)."""
    if isinstance(error, OpenAIError):
        body = error.body()
    elif set(error) == {"error"}:
        body = dict(error)
    else:
        body = {"error": dict(error)}
    return data_line(body)


def ping() -> bytes:
    """An SSE comment: keeps proxies and clients from timing out while the provider is silent."""
    return b": ping\n\n"


def owned_by(model: str) -> str:
    """The part of `openai/gpt-4o-mini` before the slash; `pantheon` for a bare name."""
    owner, slash, _ = model.partition("/")
    return owner if slash and owner else "pantheon"


def models_list(prices: Iterable[str | HasModel], created: int) -> dict[str, Any]:
    """`GET /v1/models`: each priced model (an id, or a ModelPrice-like object), in the order given."""
    ids = [price if isinstance(price, str) else price.model for price in prices]
    return {"object": "list",
            "data": [{"id": mid, "object": "model", "created": created, "owned_by": owned_by(mid)} for mid in ids]}
