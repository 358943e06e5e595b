"""Server-sent event streams -> one completion object.

A streamed OpenAI response is a series of ``data: {chunk}`` events ending with
``data: [DONE]``. Observability backends want the completion the client finally saw, so
the chunks are merged the way the OpenAI SDKs accumulate them:

* chat completions (``chat.completion.chunk``): per choice, ``content`` / ``refusal`` /
  ``reasoning_content`` concatenated, first ``role``, last ``finish_reason``, tool calls
  merged per ``index`` (arguments concatenated), ``logprobs.content`` concatenated; the
  result is a ``chat.completion`` object;
* legacy completions (``text_completion``): ``text`` concatenated per choice;
* the Responses API (``response.*`` events): the final ``response`` object, which already
  holds the whole output and the usage (or the deltas so far, when the stream was cut);
* anything else: ``{"object": "sse.stream", "events": [...]}`` with every payload.

``id``, ``model``, ``created``, ``system_fingerprint`` come from the first chunk that has
them; ``usage`` from the last chunk that has one (with ``stream_options.include_usage``
that is the final, choice-less chunk). Nothing is invented: no usage, no ``usage`` key.
"""

from __future__ import annotations

from typing import Any

import orjson

_CARRIED = ("id", "created", "model", "system_fingerprint", "service_tier")
# ``response.completed`` / ``.incomplete`` / ``.failed`` carry the whole response.
_FINAL_STATUSES = ("completed", "incomplete", "failed", "cancelled")


def looks_like_sse(body: bytes, content_type: str | None) -> bool:
    """True for ``text/event-stream`` bodies, or bodies that start like one."""
    if content_type is not None and "event-stream" in content_type.lower():
        return True
    return body.startswith((b"data:", b"event:"))


def sse_payloads(body: bytes) -> list[bytes]:
    """The ``data`` of each event of an SSE stream (multi-line data joined with LF)."""
    if b"\r" in body:
        body = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    payloads: list[bytes] = []
    pending: list[bytes] = []
    for line in body.split(b"\n"):
        if not line:
            if pending:
                payloads.append(pending[0] if len(pending) == 1 else b"\n".join(pending))
                pending = []
        elif line.startswith(b"data:"):
            value = line[5:]
            pending.append(value[1:] if value.startswith(b" ") else value)
        # event:, id:, retry: and ": comments" carry nothing a record needs.
    if pending:  # a stream cut short ends without the blank line
        payloads.append(b"\n".join(pending))
    return payloads


def merge_sse(body: bytes) -> Any:
    """The stream merged into one object (see the module docstring); None when empty."""
    chunks: list[Any] = []
    for payload in sse_payloads(body):
        if payload == b"[DONE]":
            continue
        try:
            chunks.append(orjson.loads(payload))
        except orjson.JSONDecodeError:
            chunks.append(payload.decode("utf-8", errors="replace"))
    if not chunks:
        return None
    dicts = [chunk for chunk in chunks if isinstance(chunk, dict)]
    kind = _kind(dicts)
    if kind == "response":
        return _merge_responses(dicts)
    if kind in ("chat", "text"):
        return _merge_choices(dicts, chat=kind == "chat")
    return {"object": "sse.stream", "events": chunks}


def _kind(chunks: list[dict[str, Any]]) -> str:
    for chunk in chunks:
        event_type = chunk.get("type")
        if isinstance(event_type, str) and event_type.startswith("response."):
            return "response"
        obj = chunk.get("object")
        if obj == "chat.completion.chunk":
            return "chat"
        if obj == "text_completion":
            return "text"
        choices = chunk.get("choices")
        if isinstance(choices, list) and choices and isinstance(choices[0], dict):
            if "delta" in choices[0]:
                return "chat"
            if "text" in choices[0]:
                return "text"
    return "other"


class _Choice:
    """What one choice index has accumulated so far."""

    __slots__ = ("content", "finish_reason", "function", "logprobs", "reasoning", "refusal",
                 "role", "text", "tools")  # fmt: skip

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] = []
        self.refusal: list[str] = []
        self.reasoning: list[str] = []
        self.text: list[str] = []
        self.finish_reason: Any = None
        self.tools: dict[int, dict[str, Any]] = {}
        self.function: dict[str, Any] | None = None  # legacy ``function_call``
        self.logprobs: list[Any] | None = None


def _merge_choices(chunks: list[dict[str, Any]], *, chat: bool) -> dict[str, Any]:
    carried: dict[str, Any] = {}
    choices: dict[int, _Choice] = {}
    usage: Any = None
    error: Any = None
    for chunk in chunks:
        if len(carried) < len(_CARRIED):  # once all are found, later chunks cannot matter
            for key in _CARRIED:
                if key not in carried and chunk.get(key) is not None:
                    carried[key] = chunk[key]
        if isinstance(chunk.get("usage"), dict):
            usage = chunk["usage"]
        if chunk.get("error") is not None:
            error = chunk["error"]
        for raw in chunk.get("choices") or ():
            if not isinstance(raw, dict):
                continue
            index = raw.get("index")
            slot = index if type(index) is int else 0
            state = choices.get(slot)
            if state is None:
                state = choices[slot] = _Choice()
            if raw.get("finish_reason") is not None:
                state.finish_reason = raw["finish_reason"]
            logprobs = raw.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                state.logprobs = (state.logprobs or []) + logprobs["content"]
            if chat:
                delta = raw.get("delta")
                if isinstance(delta, dict):
                    _apply_delta(state, delta)
            elif isinstance(raw.get("text"), str):
                state.text.append(raw["text"])
    # OpenAI's key order: id, object, created, model, ..., choices, usage.
    merged: dict[str, Any] = {
        "id": carried.pop("id", None),
        "object": "chat.completion" if chat else "text_completion",
    }
    merged.update(carried)
    merged["choices"] = [
        _chat_choice(i, choices[i]) if chat else _text_choice(i, choices[i])
        for i in sorted(choices)
    ]
    if usage is not None:
        merged["usage"] = usage
    if error is not None:
        merged["error"] = error
    return merged


def _apply_delta(state: _Choice, delta: dict[str, Any]) -> None:
    if state.role is None and isinstance(delta.get("role"), str):
        state.role = delta["role"]
    value = delta.get("content")
    if isinstance(value, str):
        state.content.append(value)
    value = delta.get("refusal")
    if isinstance(value, str):
        state.refusal.append(value)
    value = delta.get("reasoning_content")
    if isinstance(value, str):
        state.reasoning.append(value)
    for call in delta.get("tool_calls") or ():
        if isinstance(call, dict):
            index = call.get("index")
            slot = index if type(index) is int else len(state.tools)
            _merge_call(state.tools.setdefault(slot, {}), call)
    if isinstance(delta.get("function_call"), dict):
        state.function = state.function or {}
        _merge_function(state.function, delta["function_call"])


def _merge_call(acc: dict[str, Any], call: dict[str, Any]) -> None:
    for key in ("id", "type"):
        if call.get(key) and not acc.get(key):
            acc[key] = call[key]
    function = call.get("function")
    if isinstance(function, dict):
        _merge_function(acc.setdefault("function", {}), function)


def _merge_function(acc: dict[str, Any], delta: dict[str, Any]) -> None:
    name = delta.get("name")
    # OpenAI sends the name once; some servers repeat it whole in every chunk, others
    # split it. Concatenate pieces, but do not double a repeated full name.
    if isinstance(name, str) and name and acc.get("name") != name:
        acc["name"] = acc.get("name", "") + name
    arguments = delta.get("arguments")
    if isinstance(arguments, str):
        acc["arguments"] = acc.get("arguments", "") + arguments


def _chat_choice(index: int, state: _Choice) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": state.role or "assistant",
        "content": "".join(state.content) if state.content else None,
    }
    if state.refusal:
        message["refusal"] = "".join(state.refusal)
    if state.reasoning:
        message["reasoning_content"] = "".join(state.reasoning)
    if state.tools:
        message["tool_calls"] = [
            {
                "id": call.get("id"),
                "type": call.get("type", "function"),
                "function": {
                    "name": call.get("function", {}).get("name", ""),
                    "arguments": call.get("function", {}).get("arguments", ""),
                },
            }
            for _, call in sorted(state.tools.items())
        ]
    if state.function is not None:
        message["function_call"] = {
            "name": state.function.get("name", ""),
            "arguments": state.function.get("arguments", ""),
        }
    choice: dict[str, Any] = {"index": index, "message": message,
                              "finish_reason": state.finish_reason}  # fmt: skip
    if state.logprobs is not None:
        choice["logprobs"] = {"content": state.logprobs}
    return choice


def _text_choice(index: int, state: _Choice) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "text": "".join(state.text),
                              "finish_reason": state.finish_reason}  # fmt: skip
    if state.logprobs is not None:
        choice["logprobs"] = {"content": state.logprobs}
    return choice


def _merge_responses(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """Responses API: the final ``response`` object, else what the stream got to."""
    latest: dict[str, Any] | None = None
    deltas: list[str] = []
    for chunk in chunks:
        response = chunk.get("response")
        if isinstance(response, dict):
            latest = response
        elif chunk.get("type") == "response.output_text.delta" and isinstance(
            chunk.get("delta"), str
        ):
            deltas.append(chunk["delta"])
    if latest is not None and latest.get("status") in _FINAL_STATUSES:
        return latest
    # Cut short: keep the identity of the response and the text seen so far.
    partial: dict[str, Any] = dict(latest or {"object": "response"})
    partial["status"] = "incomplete"
    partial["output_text"] = "".join(deltas)
    return partial
