"""build_record: timing, bodies, Content-Encoding, SSE merging, usage, errors and caps."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable
from typing import Any

import brotli
import orjson
import pytest

from dispatch_celery.cli.sample import event_json
from dispatch_celery.decode.events import Event, decode_entry
from dispatch_celery.decode.records import RunRecord, build_record

ENTRY = "1736937000123-0"
MB = 1024 * 1024
CHAT = {
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1736936999,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there!"},
                 "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
}  # fmt: skip
REQUEST = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello"}]}


def record(
    *,
    response: bytes | None = None,
    request: bytes | None = orjson.dumps(REQUEST),
    headers: dict[str, list[str]] | None = None,
    status: int = 200,
    method: str = "POST",
    duration_ns: int = 1_234_567_890,
    max_body_bytes: int = MB,
) -> RunRecord:
    data = event_json(
        request_id="rid-1", method=method, status=status, duration_ns=duration_ns,
        headers=headers if headers is not None else {"Content-Type": ["application/json"]},
        response_body=response, request_body=request,
    )  # fmt: skip
    return build_record(
        decode_entry("llm-proxy-events", ENTRY, data), max_body_bytes=max_body_bytes
    )


def sse(*chunks: Any, done: bool = True, newline: str = "\n") -> bytes:
    lines = [f"data: {orjson.dumps(c).decode()}{newline}{newline}" for c in chunks]
    if done:
        lines.append(f"data: [DONE]{newline}{newline}")
    return "".join(lines).encode()


SSE_HEADERS = {"Content-Type": ["text/event-stream; charset=utf-8"]}


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-S", "object": "chat.completion.chunk", "created": 1736936999,
        "model": "gpt-4o-2024-08-06",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra,
    }  # fmt: skip


def test_plain_json_chat_completion() -> None:
    rec = record(response=orjson.dumps(CHAT))
    assert rec["id"] == rec["request_id"] == "rid-1"
    assert rec["stream_id"] == ENTRY
    assert rec["provider"] == "openai"
    assert rec["model"] == "gpt-4o-mini-2024-07-18"
    assert rec["input"] == REQUEST
    assert rec["output"] == CHAT
    assert rec["usage"] == {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
    assert rec["error"] is None
    assert rec["streamed"] is False


def test_timing_comes_from_the_entry_id_and_duration() -> None:
    rec = record(response=b"{}", duration_ns=1_234_567_890)
    assert rec["duration_ms"] == 1234
    assert rec["ended_at"] == "2025-01-15T10:30:00.123Z"
    assert rec["started_at"] == "2025-01-15T10:29:58.889Z"


def test_negative_duration_is_not_reported() -> None:
    rec = record(response=b"{}", duration_ns=-5)
    assert rec["duration_ms"] == 0
    assert rec["started_at"] == rec["ended_at"]


def test_hand_built_event_with_odd_stream_id_does_not_crash() -> None:
    event = Event("odd", "id", "", "POST", "/", 200, 0, {}, None, None, b"{}")
    assert build_record(event, max_body_bytes=MB)["ended_at"] == "1970-01-01T00:00:00.000Z"


def test_model_falls_back_to_the_request_then_none() -> None:
    assert record(response=b'{"object":"x"}')["model"] == "gpt-4o-mini"
    assert record(response=None, request=None)["model"] is None


def test_request_body_that_is_not_json_is_text_or_binary() -> None:
    assert record(request=b"plain words")["input"] == "plain words"
    rec = record(request=b"\x89PNG\r\n\x1a\n\x00\xff")
    assert rec["input"] == {"_binary": True, "bytes": 10, "content_type": None}


def test_silently_truncated_request_body_becomes_text() -> None:
    content = "é" * 40_000  # 2 bytes each; "x" shifts the 64 KiB cut inside a character
    full = orjson.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" + content}]}
    )
    cut = full[: 64 * 1024]
    with pytest.raises(UnicodeDecodeError):
        cut.decode("utf-8")  # really cut inside a character
    rec = record(request=cut)
    assert isinstance(rec["input"], str)
    assert rec["input"].startswith('{"model":"gpt-4o"')
    assert rec["input"].endswith("é")
    assert rec["model"] is None


@pytest.mark.parametrize(
    ("coding", "compress"),
    [("gzip", gzip.compress), ("x-gzip", gzip.compress), ("br", brotli.compress),
     ("deflate", zlib.compress)],
)  # fmt: skip
def test_content_encoding_is_undone(coding: str, compress: Callable[[bytes], bytes]) -> None:
    headers = {"Content-Type": ["application/json"], "Content-Encoding": [coding]}
    rec = record(response=compress(orjson.dumps(CHAT)), headers=headers)
    assert rec["output"] == CHAT
    assert rec["usage"] == CHAT["usage"]


def test_raw_deflate_is_undone() -> None:
    compressor = zlib.compressobj(wbits=-15)
    compressed = compressor.compress(orjson.dumps(CHAT)) + compressor.flush()
    headers = {"Content-Type": ["application/json"], "Content-Encoding": ["deflate"]}
    assert record(response=compressed, headers=headers)["output"] == CHAT


def test_several_encodings_are_undone_in_reverse_order() -> None:
    body = brotli.compress(gzip.compress(orjson.dumps(CHAT)))  # gzip applied first, then br
    for values in (["gzip, br"], ["gzip", "br"], ["GZIP ,identity, BR"]):
        headers = {"Content-Type": ["application/json"], "Content-Encoding": values}
        assert record(response=body, headers=headers)["output"] == CHAT


def test_gzip_without_header_is_recognised_by_its_magic() -> None:
    rec = record(response=gzip.compress(orjson.dumps(CHAT)))
    assert rec["output"] == CHAT


def test_multi_member_gzip() -> None:
    body = orjson.dumps(CHAT)
    compressed = gzip.compress(body[:20]) + gzip.compress(body[20:])
    headers = {"Content-Encoding": ["gzip"]}
    assert record(response=compressed, headers=headers)["output"] == CHAT


def test_cut_gzip_stream_yields_what_was_decompressed() -> None:
    text = ("All work and no play makes Jack a dull boy. " * 200).encode()
    compressed = gzip.compress(text)
    rec = record(
        response=compressed[: len(compressed) // 2], headers={"Content-Encoding": ["gzip"]}
    )
    assert isinstance(rec["output"], str)
    assert rec["output"].startswith("All work and no play")


def test_bad_compression_becomes_a_binary_marker_never_base64() -> None:
    garbage = b"\x1f\x8b\x08\x00garbage-that-is-not-deflate\xff\xfe"
    headers = {"Content-Type": ["application/json"], "Content-Encoding": ["gzip"]}
    out = record(response=garbage, headers=headers)["output"]
    assert out["_binary"] is True
    assert out["bytes"] == len(garbage)
    assert out["content_encoding"] == "gzip"
    assert "gzip" in out["error"]
    assert "garbage" not in orjson.dumps(out).decode()


def test_unsupported_encoding_becomes_a_marker() -> None:
    out = record(response=b"\x28\xb5\x2f\xfd\x00", headers={"Content-Encoding": ["zstd"]})["output"]
    assert out["_binary"] is True
    assert "zstd" in out["error"]


def test_body_labelled_compressed_but_plain_is_used_as_is() -> None:
    rec = record(response=orjson.dumps(CHAT), headers={"Content-Encoding": ["gzip"]})
    assert rec["output"] == CHAT


def test_binary_response_is_a_marker() -> None:
    out = record(response=b"\xff\xfb\x90d\x00\x0f", headers={"Content-Type": ["audio/mpeg"]})
    assert out["output"] == {"_binary": True, "bytes": 6, "content_type": "audio/mpeg"}
    assert out["usage"] is None


def test_non_json_text_response_is_text() -> None:
    rec = record(response=b"upstream said no", headers={"Content-Type": ["text/plain"]})
    assert rec["output"] == "upstream said no"


# --- SSE -------------------------------------------------------------------------------


def test_sse_content_is_merged_with_usage_from_the_final_chunk() -> None:
    body = sse(
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo \u003cb\u003e"}),
        chunk({}, "stop"),
        {"id": "chatcmpl-S", "object": "chat.completion.chunk", "created": 1736936999,
         "model": "gpt-4o-2024-08-06", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
    )  # fmt: skip
    rec = record(response=body, headers=SSE_HEADERS)
    assert rec["streamed"] is True
    out = rec["output"]
    assert out["object"] == "chat.completion"
    assert (out["id"], out["created"], out["model"]) == ("chatcmpl-S", 1736936999,
                                                         "gpt-4o-2024-08-06")  # fmt: skip
    assert out["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello <b>"},
         "finish_reason": "stop"}
    ]  # fmt: skip
    assert rec["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert rec["model"] == "gpt-4o-2024-08-06"


def test_sse_without_include_usage_has_no_usage() -> None:
    rec = record(response=sse(chunk({"content": "x"}, "stop")), headers=SSE_HEADERS)
    assert rec["usage"] is None
    assert "usage" not in rec["output"]


def test_sse_is_sniffed_without_content_type() -> None:
    rec = record(response=sse(chunk({"content": "x"})), headers={})
    assert rec["streamed"] is True


def test_gzip_sse_is_decompressed_then_merged() -> None:
    body = gzip.compress(sse(chunk({"content": "zipped"}, "stop")))
    headers = {**SSE_HEADERS, "Content-Encoding": ["gzip"]}
    rec = record(response=body, headers=headers)
    assert rec["output"]["choices"][0]["message"]["content"] == "zipped"


# --- usage and errors ------------------------------------------------------------------------


def test_partial_usage_is_reported_exactly() -> None:
    body = {"object": "list", "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": 1, "total_tokens": 1}}  # fmt: skip
    assert record(response=orjson.dumps(body))["usage"] == {"prompt_tokens": 1, "total_tokens": 1}


def test_usage_is_never_invented() -> None:
    assert record(response=b'{"usage":null}')["usage"] is None
    assert record(response=b'{"usage":{"prompt_tokens":"9"}}')["usage"] is None
    assert record(response=None)["usage"] is None


def test_proxy_error_string_becomes_an_error_object() -> None:
    body = b'{"error":"Token not found","code":"token_not_found"}\n'
    rec = record(response=body, status=401)
    assert rec["error"] == {"message": "Token not found", "code": "token_not_found"}


def test_upstream_error_object_is_kept() -> None:
    error = {"message": "Rate limit reached", "type": "requests", "param": None,
             "code": "rate_limit_exceeded"}  # fmt: skip
    assert record(response=orjson.dumps({"error": error}), status=429)["error"] == error


def test_error_without_body_is_generic() -> None:
    assert record(response=None, status=502)["error"] == {
        "message": "HTTP 502 Bad Gateway",
        "status": 502,
    }
    assert record(response=None, status=599)["error"] == {"message": "HTTP 599", "status": 599}


def test_error_from_text_body_and_detail() -> None:
    assert record(response=b"bad gateway\n", status=502)["error"] == {
        "message": "bad gateway",
        "status": 502,
    }
    assert record(response=b'{"detail":"Not Found"}', status=404)["error"] == {
        "message": "Not Found",
        "status": 404,
    }


def test_no_error_below_400() -> None:
    assert record(response=b'{"error":"looks bad"}', status=200)["error"] is None


# --- caps ------------------------------------------------------------------------------------


def test_oversized_output_becomes_a_visible_truncation_marker() -> None:
    big = dict(CHAT)
    big["choices"] = [{"index": 0, "message": {"role": "assistant", "content": "x" * 5000},
                       "finish_reason": "stop"}]  # fmt: skip
    rec = record(response=orjson.dumps(big), max_body_bytes=1000)
    out = rec["output"]
    assert out["_truncated"] is True
    assert out["original_bytes"] == len(orjson.dumps(big))
    assert out["max_bytes"] == 1000
    assert out["text"].startswith('{"id":"chatcmpl-1"')
    assert len(orjson.dumps(out)) <= 1000
    # Model and usage are read before the cap.
    assert rec["usage"] == CHAT["usage"]
    assert rec["model"] == CHAT["model"]


def test_oversized_input_text_is_truncated_with_a_marker() -> None:
    text = "ü" * 3000
    rec = record(request=text.encode(), response=b"{}", max_body_bytes=1000)
    marker = rec["input"]
    assert marker["_truncated"] is True
    assert marker["original_bytes"] == 6000
    assert marker["text"] and set(marker["text"]) == {"ü"}
    assert len(orjson.dumps(marker)) <= 1000


def test_values_under_the_cap_are_untouched() -> None:
    rec = record(response=orjson.dumps(CHAT), max_body_bytes=len(orjson.dumps(CHAT)))
    assert rec["output"] == CHAT


def test_tiny_cap_still_leaves_a_marker() -> None:
    out = record(response=orjson.dumps(CHAT), max_body_bytes=10)["output"]
    assert out["_truncated"] is True
    assert out["text"] == ""


def test_json_too_deep_to_serialize_is_carried_as_text() -> None:
    deep = b"[" * 600 + b"1" + b"]" * 600
    rec = record(response=deep, request=b'{"a":' + deep + b"}")
    assert rec["output"] == deep.decode()
    assert rec["input"] == '{"a":' + deep.decode() + "}"
    assert orjson.dumps(rec)
    # Merely many brackets (a long conversation) stays JSON.
    wide = orjson.dumps({"messages": [{"role": "user", "content": str(i)} for i in range(400)]})
    assert record(request=wide)["input"]["messages"][399] == {"role": "user", "content": "399"}
