"""Redaction: no credential leaves the worker (DESIGN.md invariant 7).

What is replaced by ``[REDACTED]``:

* the values of sensitive headers (``Authorization``, ``Proxy-Authorization``, ``Cookie``,
  ``Set-Cookie``, ``X-Api-Key``, ``Api-Key``, ``X-Auth-Token``, ``X-Goog-Api-Key``; any
  case), in response headers and as JSON keys;
* the values of sensitive JSON keys anywhere in nested JSON (``api_key``,
  ``password``, ``access_token``, ...; see ``DEFAULT_KEYS``);
* strings that look like credentials anywhere: ``sk-...`` keys (OpenAI, ``sk-proj-``,
  Anthropic ``sk-ant-``), ``Bearer <token>``, JWTs, AWS / Google / GitHub / Slack keys,
  and ``<sensitive name>: <value>`` / ``<name>=<value>`` assignments in text.

Settings (``DISPATCH_<SERVICE>_<NAME>`` replaces ``DISPATCH_<NAME>`` for that service;
lists are added to the defaults, never replace them):

* ``REDACT_HEADERS``: comma list of header names;
* ``REDACT_KEYS``: comma list of JSON keys (matched case-insensitively);
* ``REDACT_PATTERNS``: regular expressions separated by ``;;`` (chosen over newlines
  because a Procfile, a ``.env`` file and ``docker run -e`` all carry it on one line). A
  match is replaced whole, or only its group named ``secret`` when there is one:
  ``token=(?P<secret>\\w+)`` keeps ``token=``;
* ``METADATA_ONLY``: ``true`` drops prompts and completions (record ``input`` and
  ``output`` become None, the raw entry's bodies null) and keeps model, usage, status,
  timing and error.

Speed: a record is serialized once and run through ``credentials.Detector``, a cheap
superset test of every default rule (~6 us per ~1.3 KB record, measured); only when it
hits are the record's strings walked and rewritten. Custom patterns may depend on
characters that JSON escapes (a newline, a quote) or on anchors such as ``^``, so with
custom patterns every string is walked (~25 us per record): correctness over speed.

Alongside records: ``redact_raw`` for the original entry bytes (``raw`` archives, the
dead-letter stream), ``redact_headers`` for backends that forward response headers,
``redact_text`` for error reasons and log lines.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Any, cast

import orjson

from dispatch_celery.decode.bodies import (
    ContentDecodingError,
    content_encodings,
    decode_content,
    dumps_with_headroom,
)
from dispatch_celery.decode.credentials import (
    DEFAULT_HEADERS,
    DEFAULT_KEYS,
    REDACTED,
    Detector,
    apply_pattern,
    replacement,
    shortest_match,
)
from dispatch_celery.decode.events import Event
from dispatch_celery.decode.records import RunRecord, build_record
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings

__all__ = ["DEFAULT_HEADERS", "DEFAULT_KEYS", "PATTERN_SEPARATOR", "REDACTED", "Redactor"]

PATTERN_SEPARATOR = ";;"
_HEADER_NAME_RE = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
# Keys are matched in serialized JSON too, so nothing JSON escapes ('"', '\\', controls).
_KEY_RE = re.compile(r"^[\x20-\x21\x23-\x5b\x5d-\x7e]+$")
_KEY_RULE = "printable ASCII without quotes or backslashes"
_BODY_FIELDS = ("responsebody", "requestbody")
_BODY_IN_TEXT = re.compile(r"\"((?i:ResponseBody|RequestBody))\"\s*:\s*\"([A-Za-z0-9+/=]*)\"")
_DECOMPRESS_LIMIT = 16 * 1024 * 1024
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_TOO_DEEP = {"_redacted": True, "reason": "too deeply nested to redact"}


def _check_names(var: str, names: Iterable[str], rule: re.Pattern[str], what: str) -> None:
    for name in names:
        if not rule.match(name):
            raise ConfigError(f"{var}: {name!r} must be {what}")


def _custom_replacement(match: re.Match[str]) -> str:
    if "secret" in match.re.groupindex and match.group("secret") is not None:
        start, end = match.span("secret")
        whole, base = match.group(0), match.start()
        return whole[: start - base] + REDACTED + whole[end - base :]
    return REDACTED


class Redactor:
    """Redaction rules of one service; immutable once built, safe to share."""

    def __init__(
        self,
        *,
        headers: Iterable[str] = (),
        keys: Iterable[str] = (),
        patterns: Iterable[str | re.Pattern[str]] = (),
        metadata_only: bool = False,
    ) -> None:
        extra_headers = {h.strip().lower() for h in headers if h.strip()}
        extra_keys = {k.strip().lower() for k in keys if k.strip()}
        _check_names(
            "DISPATCH_REDACT_HEADERS", extra_headers, _HEADER_NAME_RE, "an HTTP header name"
        )
        _check_names("DISPATCH_REDACT_KEYS", extra_keys, _KEY_RE, _KEY_RULE)
        self.headers = DEFAULT_HEADERS | extra_headers
        # A sensitive header's name is a sensitive JSON key too ({"Authorization": ...}).
        self.keys = DEFAULT_KEYS | extra_keys | self.headers
        self.metadata_only = metadata_only
        self.custom = tuple(p if isinstance(p, re.Pattern) else re.compile(p) for p in patterns)
        self._apply = apply_pattern(self.keys)
        self._detector = Detector(self.keys)
        self._shortest = shortest_match(self.keys)  # "user", "stop": nothing to look for

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> Redactor:
        """The service's rules; ``ConfigError`` naming the variable when one is invalid."""

        def lookup(name: str) -> tuple[str, str | None]:
            return settings.scoped_option(service, name)

        var, raw = lookup("REDACT_HEADERS")
        headers = [h.strip() for h in (raw or "").split(",") if h.strip()]
        _check_names(var, headers, _HEADER_NAME_RE, "an HTTP header name")
        var, raw = lookup("REDACT_KEYS")
        keys = [k.strip() for k in (raw or "").split(",") if k.strip()]
        _check_names(var, keys, _KEY_RE, _KEY_RULE)
        var, raw = lookup("REDACT_PATTERNS")
        patterns: list[re.Pattern[str]] = []
        for source in (raw or "").split(PATTERN_SEPARATOR):
            if not source.strip():
                continue
            try:
                patterns.append(re.compile(source.strip()))
            except re.error as exc:
                raise ConfigError(
                    f"{var}: {source.strip()!r} is not a valid regular expression ({exc}); "
                    f"separate patterns with {PATTERN_SEPARATOR!r}"
                ) from None
            if patterns[-1].search("") is not None:
                raise ConfigError(f"{var}: {source.strip()!r} matches the empty string")
        var, raw = lookup("METADATA_ONLY")
        metadata_only = False
        if raw is not None:
            if raw.lower() not in _TRUE + _FALSE:
                raise ConfigError(f"{var} must be true or false, got {raw!r}")
            metadata_only = raw.lower() in _TRUE
        return cls(headers=headers, keys=keys, patterns=patterns, metadata_only=metadata_only)

    # --- public API ---------------------------------------------------------------------

    def redact_text(self, text: str) -> str:
        """``text`` with credential-looking parts replaced (error reasons, log lines)."""
        if len(text) >= self._shortest and self._detector.in_text(text):
            text = self._apply.sub(replacement, text)
        for pattern in self.custom:
            if pattern.search(text) is not None:
                text = pattern.sub(_custom_replacement, text)
        return text

    def redact_headers(self, headers: Mapping[str, list[str]]) -> dict[str, list[str]]:
        """A copy of ``headers``: sensitive headers' values and credentials redacted."""
        out = dict(headers)
        if not out:
            return out
        # One detector run over every value instead of one per value.
        scan = self.custom or self._detector.in_text(
            "\n".join(v for vs in out.values() for v in vs)
        )
        for name, values in headers.items():
            if name.lower() in self.headers:
                out[name] = [REDACTED for _ in values]
            elif scan:
                out[name] = [self.redact_text(v) for v in values]
        return out

    def redact_event(self, event: Event) -> Event:
        """``event`` with redacted response headers (and no bodies in metadata-only mode).

        For backends that forward headers (Helicone's ``providerResponse.headers``). The
        ``raw`` bytes stay the producer's: ``redact_raw`` (which ``Run.raw`` applies)
        is the redacted form of those.
        """
        headers = self.redact_headers(event.response_headers)
        if self.metadata_only:
            return replace(event, response_headers=headers, response_body=None, request_body=None)
        if headers == event.response_headers:  # the common case: nothing to hide
            return event
        return replace(event, response_headers=headers)

    def record_of(self, event: Event, *, max_body_bytes: int) -> tuple[RunRecord, bytes | None]:
        """``redact_record_json(build_record(event, ...))``, with one serialization doing
        the scan's work and the bodies' depth test (``bodies.dumps_with_headroom``); a
        record too deep for it is built again with the per-body test (the deep body then
        becomes text, as ``build_record`` alone makes it)."""
        if not self.custom:
            try:
                record = build_record(event, max_body_bytes=max_body_bytes, check_depth=False)
                new = cast(dict[str, Any], record)  # built here: no copy needed
                if self.metadata_only:
                    new["input"] = None
                    new["output"] = None
                data = dumps_with_headroom(new)
            except TypeError:  # JSONEncodeError: a value too deep (or not serializable)
                pass
            else:
                if not self._detector.in_bytes(data):
                    return cast(RunRecord, new), data
                return self._walk_record(new), None
        return self.redact_record_json(build_record(event, max_body_bytes=max_body_bytes))

    def redact_record(self, record: RunRecord) -> RunRecord:
        """A redacted copy of ``record`` (the argument is never modified)."""
        return self.redact_record_json(record)[0]

    def redact_record_json(self, record: RunRecord) -> tuple[RunRecord, bytes | None]:
        """``redact_record``, and the redacted record's serialization (``orjson.dumps``)
        when the scan made one that still holds (nothing needed redacting), else None:
        writers reuse it instead of serializing the record again."""
        new = self._metadata(record)
        if not self.custom:
            try:
                data = orjson.dumps(new)
            except TypeError:  # not JSON-serializable: walk it
                pass
            else:
                if not self._detector.in_bytes(data):
                    return cast(RunRecord, new), data
        return self._walk_record(new), None

    def _metadata(self, record: RunRecord) -> dict[str, Any]:
        """A copy of ``record``, without prompt and completion in metadata-only mode."""
        new = cast(dict[str, Any], dict(record))
        if self.metadata_only:
            new["input"] = None
            new["output"] = None
        return new

    def _walk_record(self, new: dict[str, Any]) -> RunRecord:
        for field, value in new.items():
            try:
                new[field] = self._walk(value)
            except RecursionError:  # deeper than we can walk: do not send what we cannot see
                new[field] = dict(_TOO_DEEP)
        return cast(RunRecord, new)

    def redact_raw(self, data: bytes) -> bytes:
        """The entry's ``data`` with sensitive values redacted; JSON stays valid JSON.

        Header values, credential patterns and sensitive keys are redacted in the JSON and
        inside the base64 bodies (a compressed body that needs redacting is stored
        decompressed, and its ``Content-Encoding`` dropped). Bytes that are not JSON
        (poison entries) get the patterns applied as text.
        """
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return self._redact_opaque(data)
        try:
            if type(obj) is dict:
                return self._redact_event_json(data, obj)
            if not self.custom and not self._detector.in_bytes(data):
                return data
            walked = self._walk(obj)
            return data if walked is obj else orjson.dumps(walked)
        except (RecursionError, TypeError):  # nested deeper than we walk or orjson writes
            return self._redact_opaque(data)

    # --- internals ------------------------------------------------------------------------

    def _walk(self, value: Any) -> Any:
        """``value`` redacted; unchanged parts are returned as the same objects."""
        kind = type(value)
        if kind is str:
            return self.redact_text(value)
        if kind is dict:
            out: dict[str, Any] | None = None
            for key, item in value.items():
                if type(key) is str and key.lower() in self.keys and item not in (None, ""):
                    new = REDACTED if not isinstance(item, list) else [REDACTED for _ in item]
                else:
                    new = self._walk(item)
                if new is not item:
                    if out is None:
                        out = dict(value)
                    out[key] = new
            return value if out is None else out
        if kind is list:
            items: list[Any] | None = None
            for index, item in enumerate(value):
                new = self._walk(item)
                if new is not item:
                    if items is None:
                        items = list(value)
                    items[index] = new
            return value if items is None else items
        return value

    def _redact_event_json(self, data: bytes, obj: dict[str, Any]) -> bytes:
        changed = False
        headers_key: str | None = None
        body_keys: list[str] = []
        for key in obj:
            folded = key.casefold()
            if folded == "responseheaders":
                headers_key = key
            elif folded in _BODY_FIELDS:
                body_keys.append(key)
        if self.custom or self._detector.in_bytes(data):
            for key, value in obj.items():
                if key not in body_keys:
                    new = self._walk(value)
                    if new is not value:
                        obj[key] = new
                        changed = True
        headers = obj.get(headers_key) if headers_key is not None else None
        if isinstance(headers, dict):
            for name, values in headers.items():
                if name.lower() in self.headers and values:
                    headers[name] = (
                        [REDACTED for _ in values] if isinstance(values, list) else REDACTED
                    )
                    changed = True
        for key in body_keys:
            value = obj[key]
            if self.metadata_only:
                changed = changed or value is not None
                obj[key] = None
                continue
            codings: list[str] = []
            if key.casefold() == "responsebody" and isinstance(headers, dict):
                for name, values in headers.items():
                    if name.lower() == "content-encoding" and isinstance(values, list):
                        codings += content_encodings([v for v in values if isinstance(v, str)])
            new_body = self._redact_body(value, codings)
            if new_body is not None:
                obj[key] = base64.b64encode(new_body).decode("ascii")
                changed = True
                if codings and isinstance(headers, dict):
                    for name in [n for n in headers if n.lower() == "content-encoding"]:
                        del headers[name]
        return orjson.dumps(obj) if changed else data

    def _redact_body(self, value: Any, codings: list[str]) -> bytes | None:
        """The redacted, decoded body; None when it needs no change (or cannot be read)."""
        if type(value) is not str or not value:
            return None
        try:
            body = binascii.a2b_base64(value, strict_mode=True)
            if codings:
                body = decode_content(body, codings, _DECOMPRESS_LIMIT)
        except (ValueError, ContentDecodingError):
            return None  # unreadable for every reader, so it reveals nothing either
        if not self.custom and not self._detector.in_bytes(body):
            return None
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            text = body.decode("utf-8", errors="surrogateescape")
            redacted = self.redact_text(text)
            return None if redacted is text else redacted.encode("utf-8", "surrogateescape")
        try:
            walked = self._walk(parsed)
            return None if walked is parsed else orjson.dumps(walked)
        except (RecursionError, TypeError):  # too deep to walk or to write back
            return orjson.dumps(_TOO_DEEP)

    def _redact_opaque(self, data: bytes) -> bytes:
        """Poison bytes: redact bodies found in the text, then patterns over all of it."""
        text = data.decode("utf-8", errors="surrogateescape")

        def body(match: re.Match[str]) -> str:
            if self.metadata_only:
                return f'"{match.group(1)}":null'
            new = self._redact_body(match.group(2), [])
            if new is None:
                return match.group(0)
            return f'"{match.group(1)}":"{base64.b64encode(new).decode("ascii")}"'

        text = _BODY_IN_TEXT.sub(body, text)
        return self.redact_text(text).encode("utf-8", errors="surrogateescape")
