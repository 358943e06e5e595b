"""decode_entry: Go-tolerant decoding, stable ids, and every kind of poison entry."""

from __future__ import annotations

import base64
import uuid

import orjson
import pytest

from dispatch_celery.cli.sample import event_json
from dispatch_celery.decode.events import decode_entry, header, header_values, stable_id
from dispatch_celery.errors import MalformedEventError

STREAM = "llm-proxy-events"
ENTRY = "1736937000123-0"
RID = "6f1c2d3e-4b5a-4c6d-8e7f-901a2b3c4d5e"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_decodes_what_llm_proxy_writes() -> None:
    data = event_json(
        request_id=RID,
        status=200,
        duration_ns=1_234_567_890,
        headers={"Content-Type": ["application/json"], "X-Request-Id": [RID]},
        response_body=b'{"ok":true}',
        request_body=b'{"model":"gpt-4o-mini"}',
    )
    event = decode_entry(STREAM, ENTRY, data)
    assert event.stream_id == ENTRY
    assert event.event_id == RID
    assert event.request_id == RID
    assert (event.method, event.path, event.status) == ("POST", "/v1/chat/completions", 200)
    assert event.duration_ns == 1_234_567_890
    assert event.response_headers["Content-Type"] == ["application/json"]
    assert event.response_body == b'{"ok":true}'
    assert event.request_body == b'{"model":"gpt-4o-mini"}'
    assert event.raw is data


def test_empty_request_id_gets_a_stable_derived_id() -> None:
    data = event_json(method="OPTIONS", status=204)
    first = decode_entry(STREAM, ENTRY, data)
    again = decode_entry(STREAM, ENTRY, data)
    assert first.request_id == ""
    assert first.event_id == again.event_id == stable_id(STREAM, ENTRY)
    assert uuid.UUID(first.event_id).version == 5
    assert decode_entry(STREAM, "1736937000123-1", data).event_id != first.event_id
    assert decode_entry("other-stream", ENTRY, data).event_id != first.event_id


@pytest.mark.parametrize(
    "keys",
    [
        ("requestid", "method", "path", "status", "duration", "responseheaders",
         "responsebody", "requestbody"),
        ("REQUESTID", "METHOD", "PATH", "STATUS", "DURATION", "RESPONSEHEADERS",
         "RESPONSEBODY", "REQUESTBODY"),
        ("requestId", "Method", "pAth", "Status", "duration", "responseHeaders",
         "ResponseBody", "requestBody"),
    ],
)  # fmt: skip
def test_keys_match_case_insensitively_like_go(keys: tuple[str, ...]) -> None:
    values = (RID, "POST", "/v1/embeddings", 201, 5_000_000, {"Content-Type": ["text/plain"]},
              b64(b"out"), b64(b"in"))  # fmt: skip
    event = decode_entry(STREAM, ENTRY, orjson.dumps(dict(zip(keys, values, strict=True))))
    assert event.request_id == RID
    assert event.method == "POST"
    assert event.path == "/v1/embeddings"
    assert event.status == 201
    assert event.duration_ns == 5_000_000
    assert header(event, "content-type") == "text/plain"
    assert (event.response_body, event.request_body) == (b"out", b"in")


def test_unknown_keys_are_ignored_and_missing_keys_are_zero() -> None:
    event = decode_entry(STREAM, ENTRY, b'{"Method":"GET","Extra":{"deep":[1,2]},"LogID":"x"}')
    assert event.method == "GET"
    assert (event.request_id, event.path, event.status, event.duration_ns) == ("", "", 0, 0)
    assert event.response_headers == {}
    assert event.response_body is None
    assert event.request_body is None
    assert event.event_id == stable_id(STREAM, ENTRY)


def test_empty_object_is_an_event_of_zero_values() -> None:
    event = decode_entry(STREAM, ENTRY, b"{}")
    assert event.method == ""
    assert event.status == 0


def test_later_duplicate_key_wins_as_in_go() -> None:
    event = decode_entry(STREAM, ENTRY, b'{"Status":200,"status":503}')
    assert event.status == 503


def test_nulls_and_empty_bodies() -> None:
    data = (
        b'{"RequestID":null,"Method":"POST","Status":null,"ResponseHeaders":null,'
        b'"ResponseBody":"","RequestBody":null}'
    )
    event = decode_entry(STREAM, ENTRY, data)
    assert event.request_id == ""
    assert event.status == 0
    assert event.response_headers == {}
    assert event.response_body == b""
    assert event.request_body is None


def test_nulls_with_every_key_present() -> None:
    data = (
        b'{"LogID":null,"RequestID":null,"Method":null,"Path":null,"Status":null,'
        b'"Duration":null,"ResponseHeaders":null,"ResponseBody":null,"RequestBody":null}'
    )
    event = decode_entry(STREAM, ENTRY, data)
    assert (event.request_id, event.method, event.path) == ("", "", "")
    assert (event.status, event.duration_ns) == (0, 0)
    assert event.response_headers == {}
    assert (event.response_body, event.request_body) == (None, None)


def test_null_header_values_become_empty_lists() -> None:
    data = b'{"ResponseHeaders":{"A":null,"B":["x",null],"C":["y"]}}'
    event = decode_entry(STREAM, ENTRY, data)
    assert event.response_headers == {"A": [], "B": ["x", ""], "C": ["y"]}


def test_go_html_escapes_are_decoded() -> None:
    data = b'{"Path":"/v1/a\\u003cb\\u003e\\u0026c","ResponseHeaders":{"X":["\\u003cv\\u003e"]}}'
    event = decode_entry(STREAM, ENTRY, data)
    assert event.path == "/v1/a<b>&c"
    assert header(event, "x") == "<v>"


def test_base64_without_padding_or_with_line_breaks_is_accepted() -> None:
    unpadded = decode_entry(STREAM, ENTRY, b'{"ResponseBody":"aGk"}')
    assert unpadded.response_body == b"hi"
    wrapped = decode_entry(STREAM, ENTRY, b'{"ResponseBody":"aGVs\\r\\nbG8="}')
    assert wrapped.response_body == b"hello"


def test_header_lookup_is_case_insensitive() -> None:
    data = event_json(headers={"Content-Encoding": ["gzip", "br"], "x-lower": ["v"]})
    event = decode_entry(STREAM, ENTRY, data)
    assert header(event, "Content-Encoding") == "gzip"
    assert header(event, "content-encoding") == "gzip"
    assert header(event, "X-LOWER") == "v"
    assert header(event, "Missing") is None
    assert header_values(event, "CONTENT-ENCODING") == ["gzip", "br"]
    assert header_values(event, "missing") == []


# --- poison --------------------------------------------------------------------------------


def reason_of(data: bytes | None, entry_id: str = ENTRY) -> str:
    with pytest.raises(MalformedEventError) as info:
        decode_entry(STREAM, entry_id, data)
    reason = info.value.reason
    assert reason == str(info.value)
    assert 0 < len(reason) < 200
    return reason


def test_poison_no_data_field() -> None:
    assert "no 'data' field" in reason_of(None)


def test_poison_empty_data() -> None:
    assert "empty" in reason_of(b"")


def test_poison_not_utf8() -> None:
    assert "not UTF-8" in reason_of(b'{"Method":"\xff\xfe"}')


def test_poison_not_json() -> None:
    reason = reason_of(b"Authorization: Bearer sk-secret-value-not-json")
    assert "not JSON" in reason
    assert "sk-secret" not in reason  # reasons never echo the entry's content


def test_poison_truncated_json() -> None:
    assert "not JSON" in reason_of(b'{"Method":"POST","Pa')


@pytest.mark.parametrize(
    ("data", "kind"),
    [(b"[1,2]", "an array"), (b'"text"', "a string"), (b"42", "a number"), (b"null", "null")],
)
def test_poison_json_that_is_not_an_object(data: bytes, kind: str) -> None:
    assert reason_of(data) == f"event JSON is {kind}, not an object"


def test_poison_invalid_base64() -> None:
    assert reason_of(b'{"ResponseBody":"not*base64!"}') == "ResponseBody is not valid base64"
    assert reason_of(b'{"requestbody":"abcde"}') == "requestbody is not valid base64"
    assert "base64" in reason_of(b'{"ResponseBody":"\xc3\xa9t\xc3\xa9"}')


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b'{"Status":"200"}', "Status must be an integer, got a string"),
        (b'{"Status":200.0}', "Status must be an integer, got a number"),
        (b'{"Status":true}', "Status must be an integer, got a boolean"),
        (b'{"Duration":[1]}', "Duration must be an integer, got an array"),
        (b'{"Method":5}', "Method must be a string, got a number"),
        (b'{"RequestID":{}}', "RequestID must be a string, got an object"),
        (b'{"ResponseHeaders":[]}', "ResponseHeaders must be an object, got an array"),
        (b'{"ResponseBody":123}', "ResponseBody must be a base64 string, got a number"),
    ],
)
def test_poison_wrong_types(data: bytes, expected: str) -> None:
    assert reason_of(data) == expected


def test_poison_bad_header_values() -> None:
    reason = reason_of(b'{"ResponseHeaders":{"X-A":"single"}}')
    assert reason == "ResponseHeaders['X-A'] must be an array of strings, got a string"
    assert "array of strings" in reason_of(b'{"ResponseHeaders":{"X-A":[1]}}')


def test_invalid_entry_id_is_malformed() -> None:
    assert "entry id" in reason_of(b"{}", entry_id="not-an-id")
    assert "entry id" in reason_of(b"{}", entry_id="12345")
