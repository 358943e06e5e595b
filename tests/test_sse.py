"""SSE streams merged into one completion: tool calls, choices, cut streams, other APIs."""

from __future__ import annotations

from typing import Any

import orjson

from dispatch_celery.cli.sample import event_json
from dispatch_celery.decode.events import decode_entry
from dispatch_celery.decode.records import RunRecord, build_record
from dispatch_celery.decode.sse import merge_sse, sse_payloads

SSE_HEADERS = {"Content-Type": ["text/event-stream; charset=utf-8"]}


def record(*, response: bytes, headers: dict[str, list[str]]) -> RunRecord:
    data = event_json(request_id="rid", headers=headers, response_body=response)
    event = decode_entry("llm-proxy-events", "1736937000123-0", data)
    return build_record(event, max_body_bytes=1 << 20)


def sse(*chunks: Any, done: bool = True, newline: str = "\n") -> bytes:
    lines = [f"data: {orjson.dumps(c).decode()}{newline}{newline}" for c in chunks]
    if done:
        lines.append(f"data: [DONE]{newline}{newline}")
    return "".join(lines).encode()


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-S",
        "object": "chat.completion.chunk",
        "created": 1736936999,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def test_payloads_follow_the_sse_rules() -> None:
    body = b": comment\nevent: x\ndata: one\ndata:two\n\nid: 5\ndata: three\r\n\r\ndata: cut"
    assert sse_payloads(body) == [b"one\ntwo", b"three", b"cut"]


def test_empty_stream_merges_to_nothing() -> None:
    assert merge_sse(b": keep-alive\n\n") is None
    assert merge_sse(b"data: [DONE]\n\n") is None


def test_sse_tool_calls_are_merged_per_index() -> None:
    def call(index: int, **fields: Any) -> dict[str, Any]:
        return {"tool_calls": [{"index": index, **fields}]}

    body = sse(
        chunk({"role": "assistant", "content": None,
               "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk(call(0, function={"arguments": '{"city":'})),
        chunk(call(1, id="call_b", type="function",
                   function={"name": "get_time", "arguments": ""})),
        chunk(call(0, function={"arguments": '"Paris"}'})),
        chunk(call(1, function={"arguments": '{"tz":"CET"}'})),
        chunk({}, "tool_calls"),
    )  # fmt: skip
    message = record(response=body, headers=SSE_HEADERS)["output"]["choices"][0]
    assert message["finish_reason"] == "tool_calls"
    assert message["message"]["content"] is None
    assert message["message"]["tool_calls"] == [
        {"id": "call_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_b", "type": "function",
         "function": {"name": "get_time", "arguments": '{"tz":"CET"}'}},
    ]  # fmt: skip


def test_sse_repeated_tool_name_is_not_doubled() -> None:
    body = sse(
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "}"}}]}),
    )
    calls = record(response=body, headers=SSE_HEADERS)["output"]["choices"][0]["message"]
    assert calls["tool_calls"][0]["function"] == {"name": "f", "arguments": "{}"}


def test_sse_several_choices_and_crlf_lines() -> None:
    first = chunk({"content": "A"})
    second = chunk({"content": "B"})
    second["choices"][0]["index"] = 1
    body = sse(first, second, chunk({"content": "a"}, "stop"), newline="\r\n")
    choices = record(response=body, headers=SSE_HEADERS)["output"]["choices"]
    assert [c["message"]["content"] for c in choices] == ["Aa", "B"]


def test_sse_cut_short_keeps_what_arrived() -> None:
    body = sse(chunk({"content": "partial "}), chunk({"content": "answ"}), done=False)
    body += b'data: {"id":"chatcmpl-S","choi'  # the producer's cap cut a line
    rec = record(response=body, headers=SSE_HEADERS)
    assert rec["output"]["choices"][0]["message"]["content"] == "partial answ"
    assert rec["streamed"] is True


def test_legacy_completions_stream_concatenates_text() -> None:
    def text_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "gpt-3.5-turbo-instruct",
            "choices": [choice],
        }

    rec = record(
        response=sse(text_chunk("Once "), text_chunk("upon", "length")), headers=SSE_HEADERS
    )
    out = rec["output"]
    assert out["object"] == "text_completion"
    assert out["choices"] == [{"index": 0, "text": "Once upon", "finish_reason": "length"}]
    assert rec["model"] == "gpt-3.5-turbo-instruct"


def test_responses_api_stream_yields_the_final_response() -> None:
    final = {"id": "resp_1", "object": "response", "status": "completed", "model": "gpt-4.1",
             "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi"}]}],
             "usage": {"input_tokens": 4, "output_tokens": 1, "total_tokens": 5}}  # fmt: skip
    body = (
        b"event: response.created\n"
        + sse({"type": "response.created", "response": {**final, "status": "in_progress",
                                                         "output": [], "usage": None}},
              {"type": "response.output_text.delta", "delta": "Hi"},
              {"type": "response.completed", "response": final}, done=False)
    )  # fmt: skip
    rec = record(response=body, headers=SSE_HEADERS)
    assert rec["output"] == final
    assert rec["usage"] == {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    assert rec["model"] == "gpt-4.1"


def test_unknown_sse_keeps_every_payload() -> None:
    body = b'data: hello\n\ndata: {"kind":"x"}\n\n'
    out = record(response=body, headers=SSE_HEADERS)["output"]
    assert out == {"object": "sse.stream", "events": ["hello", {"kind": "x"}]}


def test_responses_api_stream_cut_short_keeps_the_text_so_far() -> None:
    created = {"id": "resp_2", "object": "response", "status": "in_progress", "model": "gpt-4.1"}
    body = sse(
        {"type": "response.created", "response": created},
        {"type": "response.output_text.delta", "delta": "Hel"},
        {"type": "response.output_text.delta", "delta": "lo"},
        done=False,
    )
    out = merge_sse(body)
    assert out == {**created, "status": "incomplete", "output_text": "Hello"}


def test_refusal_and_reasoning_deltas_are_concatenated() -> None:
    body = sse(
        chunk({"role": "assistant", "reasoning_content": "Think"}),
        chunk({"reasoning_content": "ing."}),
        chunk({"refusal": "I can't "}),
        chunk({"refusal": "help."}, "stop"),
    )
    message = merge_sse(body)["choices"][0]["message"]
    assert message == {
        "role": "assistant",
        "content": None,
        "refusal": "I can't help.",
        "reasoning_content": "Thinking.",
    }
