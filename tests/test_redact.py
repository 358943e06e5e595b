"""Redactor: default rules, configuration, records, raw entries and poison bytes."""

from __future__ import annotations

import base64
import copy
import gzip
from typing import Any

import orjson
import pytest

from dispatch_celery.cli.sample import event_json, sample_events
from dispatch_celery.decode.events import decode_entry
from dispatch_celery.decode.records import RunRecord, build_record
from dispatch_celery.decode.redact import REDACTED, Redactor
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings

OPENAI_KEY = "sk-proj-Ab3dEf6hIj9kLmN0pQrStUvWxYz12345"
ANTHROPIC_KEY = "sk-ant-api03-Zz9Yy8Xx7Ww6Vv5Uu4Tt3Ss2"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
    ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
ENTRY = "1736937000123-0"


def settings(**env: str) -> Settings:
    return Settings(env={f"DISPATCH_{k}": v for k, v in env.items()})


def make_record(input_: Any = None, output: Any = None, error: Any = None) -> RunRecord:
    data = event_json(request_id="rid", status=200, response_body=b"{}", request_body=b"{}")
    rec = build_record(decode_entry("s", ENTRY, data), max_body_bytes=1 << 20)
    rec["input"], rec["output"], rec["error"] = input_, output, error
    return rec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"key={OPENAI_KEY} end", f"key={REDACTED} end"),
        (f"use {ANTHROPIC_KEY}", f"use {REDACTED}"),
        ("Authorization: Bearer abcdef0123456789xyz", f"Authorization: {REDACTED}"),
        ("token is Bearer abcdef0123456789xyz.", f"token is Bearer {REDACTED}"),
        (f"jwt {JWT} ok", f"jwt {REDACTED} ok"),
        ("aws AKIAIOSFODNN7EXAMPLE!", f"aws {REDACTED}!"),
        ("x-api-key: 123e4567-e89b-12d3", f"x-api-key: {REDACTED}"),
        ("API_KEY=hunter22", f"API_KEY={REDACTED}"),
        ("Cookie: session=abc; theme=dark\nnext", f"Cookie: {REDACTED}\nnext"),
        ('{"password": "p4ss"}', f'{{"password": "{REDACTED}"}}'),
        ("ghp_" + "a1" * 18, REDACTED),
        ("AIza" + "B" * 35, REDACTED),
    ],
)
def test_default_patterns(text: str, expected: str) -> None:
    assert Redactor().redact_text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "the bearer instruments matured",
        "task-management-framework-design",
        "I like cookie dough and passwords are hard",
        "Asia is large; the sky is blue",
        "",
    ],
)
def test_prose_is_left_alone(text: str) -> None:
    redactor = Redactor()
    assert redactor.redact_text(text) is text or redactor.redact_text(text) == text


def test_sensitive_headers_any_case() -> None:
    headers = {
        "Authorization": ["Bearer abc"], "set-cookie": ["a=1", "b=2"], "X-API-KEY": ["k"],
        "X-Goog-Api-Key": ["g"], "Content-Type": ["application/json"],
        "X-Debug": [f"used {OPENAI_KEY}"],
    }  # fmt: skip
    original = copy.deepcopy(headers)
    out = Redactor().redact_headers(headers)
    assert out == {
        "Authorization": [REDACTED], "set-cookie": [REDACTED, REDACTED], "X-API-KEY": [REDACTED],
        "X-Goog-Api-Key": [REDACTED], "Content-Type": ["application/json"],
        "X-Debug": [f"used {REDACTED}"],
    }  # fmt: skip
    assert headers == original


def test_record_strings_and_keys_are_redacted_everywhere() -> None:
    rec = make_record(
        input_={"messages": [{"role": "user", "content": f"my key {OPENAI_KEY}"}],
                "metadata": {"API_Key": "plain-value", "nested": [{"Authorization": "Basic x"}]}},
        output={"choices": [{"message": {"content": f"token {JWT}"}}]},
        error={"message": "bad key Bearer abcdef0123456789xyz"},
    )  # fmt: skip
    original = copy.deepcopy(rec)
    out = Redactor().redact_record(rec)
    assert rec == original  # the argument is never modified
    assert out["input"]["messages"][0]["content"] == f"my key {REDACTED}"
    assert out["input"]["metadata"] == {"API_Key": REDACTED,
                                        "nested": [{"Authorization": REDACTED}]}  # fmt: skip
    assert out["output"]["choices"][0]["message"]["content"] == f"token {REDACTED}"
    assert out["error"] == {"message": f"bad key Bearer {REDACTED}"}
    assert out["model"] == rec["model"]
    assert out["usage"] == rec["usage"]


def test_clean_record_is_returned_without_copying_its_bodies() -> None:
    rec = make_record(input_={"messages": [{"role": "user", "content": "hello"}]}, output=[1])
    out = Redactor().redact_record(rec)
    assert out == rec
    assert out is not rec
    assert out["input"] is rec["input"]  # the fast path shares what it did not change


def test_sample_events_pass_untouched() -> None:
    redactor = Redactor()
    for i, data in enumerate(sample_events(300, seed=5)):
        rec = build_record(decode_entry("s", f"1-{i}", data), max_body_bytes=1 << 20)
        assert redactor.redact_record(rec) == rec
        assert redactor.redact_raw(data) is data


def test_configured_headers_keys_and_patterns() -> None:
    redactor = Redactor.from_settings("lunary", settings(
        REDACT_HEADERS="X-Tenant-Secret", REDACT_KEYS="ssn,Card_Number",
        REDACT_PATTERNS=r"ACME-\d{6};;token=(?P<secret>\w+)",
    ))  # fmt: skip
    assert redactor.redact_headers({"x-tenant-secret": ["v"]}) == {"x-tenant-secret": [REDACTED]}
    rec = make_record(input_={"user": {"SSN": "123-45-6789", "card_number": 4111},
                              "text": "order ACME-123456 with token=abc123 done"})  # fmt: skip
    out = Redactor.redact_record(redactor, rec)["input"]
    assert out == {"user": {"SSN": REDACTED, "card_number": REDACTED},
                   "text": f"order {REDACTED} with token={REDACTED} done"}  # fmt: skip
    # Defaults still apply next to the configured rules.
    assert redactor.redact_text(OPENAI_KEY) == REDACTED


def test_custom_pattern_may_span_characters_json_escapes() -> None:
    redactor = Redactor(patterns=[r'BEGIN "KEY"\n\w+', r"^\d{16}$"])
    rec = make_record(input_={"a": 'x BEGIN "KEY"\nabc123 y', "card": "4111111111111111"})
    assert redactor.redact_record(rec)["input"] == {"a": f"x {REDACTED} y", "card": REDACTED}


def test_service_patterns_replace_the_global_ones() -> None:
    env = settings(REDACT_PATTERNS="GLOBAL-\\d+", FILE_REDACT_PATTERNS="LOCAL-\\d+")
    local = Redactor.from_settings("file", env)
    assert local.redact_text("GLOBAL-1 LOCAL-2") == f"GLOBAL-1 {REDACTED}"
    other = Redactor.from_settings("helicone", env)
    assert other.redact_text("GLOBAL-1 LOCAL-2") == f"{REDACTED} LOCAL-2"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("REDACT_PATTERNS", "ok-\\d+;;broken(["),
        ("FILE_REDACT_PATTERNS", "a*"),
        ("REDACT_HEADERS", "Bad Header"),
        ("FILE_REDACT_KEYS", 'with"quote'),
        ("FILE_METADATA_ONLY", "maybe"),
    ],
)
def test_invalid_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        Redactor.from_settings("file", settings(**{name: value}))
    assert f"DISPATCH_{name}" in str(info.value)


def test_metadata_only_drops_prompts_and_completions() -> None:
    redactor = Redactor.from_settings("lunary", settings(LUNARY_METADATA_ONLY="true"))
    assert redactor.metadata_only
    assert not Redactor.from_settings(
        "helicone", settings(LUNARY_METADATA_ONLY="true")
    ).metadata_only
    rec = make_record(input_={"messages": ["secret prompt"]}, output={"content": "answer"},
                      error={"message": "boom"})  # fmt: skip
    out = redactor.redact_record(rec)
    assert out["input"] is None
    assert out["output"] is None
    assert out["error"] == {"message": "boom"}
    for key in ("model", "usage", "status", "duration_ms", "started_at", "ended_at", "id"):
        assert out[key] == rec[key]


def test_too_deep_to_walk_is_withheld_not_sent() -> None:
    deep: Any = f"key {OPENAI_KEY}"
    for _ in range(5000):
        deep = [deep]
    out = Redactor().redact_record(make_record(input_=deep))
    assert out["input"] == {"_redacted": True, "reason": "too deeply nested to redact"}


# --- raw entries ---------------------------------------------------------------------------


def raw_event(**kwargs: Any) -> bytes:
    fields: dict[str, Any] = {"request_id": "rid", "status": 200}
    fields.update(kwargs)
    return event_json(**fields)


def decoded(data: bytes) -> Any:
    return decode_entry("s", ENTRY, data)


def test_raw_without_secrets_is_returned_as_is() -> None:
    data = raw_event(headers={"Content-Type": ["application/json"]}, response_body=b"{}")
    assert Redactor().redact_raw(data) is data


def test_raw_headers_and_bodies_are_redacted_and_stay_valid() -> None:
    data = raw_event(
        headers={"Set-Cookie": ["sid=1"], "Content-Type": ["application/json"]},
        request_body=orjson.dumps({"messages": [{"content": f"use {OPENAI_KEY}"}], "api_key": "x"}),
        response_body=b'{"ok":true}',
    )
    out = Redactor().redact_raw(data)
    event = decoded(out)  # still an event llm-proxy could have written
    assert event.response_headers["Set-Cookie"] == [REDACTED]
    assert event.response_headers["Content-Type"] == ["application/json"]
    assert orjson.loads(event.request_body or b"") == {
        "messages": [{"content": f"use {REDACTED}"}],
        "api_key": REDACTED,
    }
    assert event.response_body == b'{"ok":true}'
    assert OPENAI_KEY.encode() not in out


def test_raw_compressed_body_with_a_secret_is_stored_decompressed() -> None:
    body = gzip.compress(f'{{"echo":"{OPENAI_KEY}"}}'.encode())
    headers = {"Content-Encoding": ["gzip"], "Content-Type": ["application/json"]}
    out = Redactor().redact_raw(raw_event(headers=headers, response_body=body))
    event = decoded(out)
    assert "Content-Encoding" not in event.response_headers
    assert orjson.loads(event.response_body or b"") == {"echo": REDACTED}


def test_raw_text_body_and_top_level_strings() -> None:
    data = raw_event(path=f"/v1/keys/{OPENAI_KEY}", response_body=f"plain {JWT}".encode())
    event = decoded(Redactor().redact_raw(data))
    assert event.path == f"/v1/keys/{REDACTED}"
    assert event.response_body == f"plain {REDACTED}".encode()


def test_raw_metadata_only_nulls_bodies() -> None:
    redactor = Redactor(metadata_only=True)
    event = decoded(redactor.redact_raw(raw_event(request_body=b"prompt", response_body=b"answer")))
    assert event.request_body is None
    assert event.response_body is None
    assert event.request_id == "rid"


def test_raw_json_that_is_not_an_event() -> None:
    assert Redactor().redact_raw(f'["{OPENAI_KEY}"]'.encode()) == f'["{REDACTED}"]'.encode()
    assert Redactor().redact_raw(b"[1,2]") == b"[1,2]"


def test_poison_bytes_get_the_patterns_and_keep_everything_else() -> None:
    poison = b"\xff\xfe not json Authorization: Bearer abcdef0123456789xyz \x00 tail"
    out = Redactor().redact_raw(poison)
    assert out == b"\xff\xfe not json Authorization: " + REDACTED.encode() + b" \x00 tail"


def test_poison_json_with_bodies_has_its_bodies_redacted() -> None:
    body = base64.b64encode(f"key {OPENAI_KEY}".encode()).decode()
    poison = f'{{"RequestID":"r","RequestBody":"{body}","Status":'.encode()  # cut short
    out = Redactor().redact_raw(poison)
    start = out.index(b'"RequestBody":"') + len(b'"RequestBody":"')
    encoded = out[start : out.index(b'"', start)]
    assert base64.b64decode(encoded) == f"key {REDACTED}".encode()
    nulled = Redactor(metadata_only=True).redact_raw(poison)
    assert b'"RequestBody":null' in nulled


def test_redact_text_for_log_lines() -> None:
    line = f"POST https://api.example.com failed: 401 {{'Authorization': 'Bearer {OPENAI_KEY}'}}"
    out = Redactor().redact_text(line)
    assert OPENAI_KEY not in out
    assert out.startswith("POST https://api.example.com failed: 401")


def test_raw_nested_too_deep_for_orjson_still_gets_redacted() -> None:
    deep = "[" * 400 + f'"{OPENAI_KEY}"' + "]" * 400
    data = f'{{"RequestID":"r","Extra":{deep}}}'.encode()
    out = Redactor().redact_raw(data)
    assert OPENAI_KEY.encode() not in out
    assert out == data.replace(OPENAI_KEY.encode(), REDACTED.encode())

    body = base64.b64encode(deep.encode()).decode()
    out = Redactor().redact_raw(f'{{"RequestID":"r","RequestBody":"{body}"}}'.encode())
    event = decoded(out)
    assert OPENAI_KEY.encode() not in (event.request_body or b"")


def test_detector_is_a_superset_of_the_rules() -> None:
    # The fast path skips a record when the detector says "nothing here": that must never
    # hide something a rule (or a sensitive key) would have redacted.
    redactor = Redactor(keys=["ssn", "Card_Number"], headers=["X-Tenant-Secret"])
    secrets = [OPENAI_KEY, ANTHROPIC_KEY, JWT, "AKIAIOSFODNN7EXAMPLE", "AIza" + "B" * 35,
               "ghp_" + "a1" * 18, "github_pat_" + "A" * 22, "xoxb-1234567890",
               "Bearer abcdef0123456789xyz", "BEARER ABCDEF0123456789XYZ"]  # fmt: skip
    for name in sorted(redactor.keys):
        for variant in (name, name.upper(), name.title()):
            secrets += [f"{variant}: v", f"{variant}=v", f'"{variant}":"v"', f"{variant}:\tv"]
    for secret in secrets:
        for before, after in [("", ""), ("\n", "\n"), ('"', '"'), ("\\", "\\"), ("é ", " ü")]:
            text = before + secret + after
            if redactor.redact_text(text) == text:
                continue  # not a credential in this context (e.g. glued to a letter)
            assert redactor._detector.in_text(text), text
            assert redactor._detector.in_bytes(orjson.dumps({"v": text})), text
    for name in redactor.keys:
        for variant in (name, name.upper()):
            assert redactor._detector.in_bytes(orjson.dumps({"a": [{variant: 1}]})), variant


def test_redact_event_for_backends_that_forward_headers() -> None:
    data = raw_event(
        headers={"Set-Cookie": ["sid=1"], "X-Note": [f"k {OPENAI_KEY}"], "X-Ok": ["fine"]},
        response_body=b"answer",
        request_body=b"prompt",
    )
    event = decoded(data)
    out = Redactor().redact_event(event)
    assert out.response_headers == {
        "Set-Cookie": [REDACTED], "X-Note": [f"k {REDACTED}"], "X-Ok": ["fine"]
    }  # fmt: skip
    assert event.response_headers["Set-Cookie"] == ["sid=1"]  # not modified
    assert (out.response_body, out.request_body) == (b"answer", b"prompt")
    bare = Redactor(metadata_only=True).redact_event(event)
    assert (bare.response_body, bare.request_body) == (None, None)
    assert bare.event_id == event.event_id


# --- record_of: build, depth test and scan in one serialization ---------------------------


def expected_record_of(redactor: Redactor, event: Any) -> tuple[RunRecord, bytes | None]:
    return redactor.redact_record_json(build_record(event, max_body_bytes=1 << 20))


@pytest.mark.parametrize(
    "redactor",
    [Redactor(), Redactor(metadata_only=True), Redactor(patterns=[r"Canberra"])],
    ids=["default", "metadata-only", "custom-pattern"],
)
def test_record_of_is_build_then_redact(redactor: Redactor) -> None:
    for i, data in enumerate(sample_events(300, seed=4)):
        event = decode_entry("s", f"1736937000{i:03d}-0", data)
        record, serialized = redactor.record_of(event, max_body_bytes=1 << 20)
        assert (record, serialized) == expected_record_of(redactor, event)
        if serialized is not None:  # what the file backend writes instead of serializing
            assert serialized == orjson.dumps(record)


def test_record_of_redacts_and_then_has_no_serialization_to_reuse() -> None:
    data = raw_event(request_body=orjson.dumps({"messages": [{"content": OPENAI_KEY}]}))
    record, serialized = Redactor().record_of(decoded(data), max_body_bytes=1 << 20)
    assert record["input"] == {"messages": [{"content": REDACTED}]}
    assert serialized is None


def test_record_of_carries_a_body_too_deep_to_serialize_as_text() -> None:
    deep = b"[" * 600 + b"1" + b"]" * 600
    at_limit = b"[" * 222 + b"1" + b"]" * 222  # the deepest a body may be and stay JSON
    for body in (deep, at_limit, b"[" * 223 + b"1" + b"]" * 223):
        event = decoded(raw_event(response_body=body, request_body=b'{"a":' + body + b"}"))
        record, serialized = Redactor().record_of(event, max_body_bytes=1 << 20)
        assert (record, serialized) == expected_record_of(Redactor(), event)
        assert orjson.dumps(record)
    assert isinstance(Redactor().record_of(decoded(raw_event(response_body=at_limit)),
                                           max_body_bytes=1 << 20)[0]["output"], list)  # fmt: skip


def test_run_redacts_its_event_on_first_use_only() -> None:
    from dispatch_celery.backend import Run

    event = decoded(raw_event(headers={"Set-Cookie": ["sid=1"]}))
    calls: list[Any] = []

    def redact(e: Any) -> Any:
        calls.append(e)
        return Redactor().redact_event(e)

    run = Run(build_record(event, max_body_bytes=1 << 20), event, redact_event=redact)
    assert calls == []  # the file backend never looks: no work
    assert run.event.response_headers == {"Set-Cookie": [REDACTED]}
    assert run.event is run.event and len(calls) == 1
    assert run.raw == event.raw and run.json is None
