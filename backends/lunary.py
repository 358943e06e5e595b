"""Lunary: runs as start + end (or error) events, many runs per ``POST /v1/runs/ingest``.

This module is the vendor mapping only (``build_events``, packing, reading the results);
the send loop is ``HttpBackend``. Lunary answers HTTP 200 with one result per event even
when events failed, so success is read per run, by identity: each result carries the
``runId`` of its event (and nothing else that names the event), so a run is delivered when
it has one result per event sent and each is a success or the start's "already exists"
(an earlier attempt stored it). Neither the order of the results nor any timestamp is
relied on. Start and end of a run always travel in the same request, start first and never
later than the end (Lunary sorts a request's events by timestamp, stably), because an end
whose start is not stored is acknowledged and dropped. Requests are split by bytes
(``DISPATCH_LUNARY_MAX_REQUEST_BYTES``, default 1 MiB); a run is never split across
requests. A 4xx for a request (Lunary names no event) is narrowed down by the send loop,
which halves the request until the refused run stands alone.

Event types: chat completions, legacy completions and the Responses API are ``llm`` runs.
Every other call (embeddings, audio, images, moderations) is a ``tool`` run named after its
model: Lunary stores any type in its run table and shows tool runs with generic
input/output, whereas ``log`` goes to a table current Lunary dropped, ``embed`` and
``retriever`` are marked "todo: actual support" in Lunary's source, and ``llm`` would put
non-chat payloads into views that expect messages.

A failed event (other than a duplicate start) is transient: Lunary reports it as free
text, which says nothing reliable about whether a retry can succeed (a database hiccup and
a bad value read alike), so the core retries it within its retry budget and dead-letters it
with the reason after that; nothing is dead-lettered on a guess.

Options (``DISPATCH_<SERVICE>_...``): ``API_KEY`` (required: the project key),
``ENDPOINT``, ``MAX_REQUEST_BYTES``, ``CONCURRENCY`` (1), ``CONNECT_TIMEOUT``,
``READ_TIMEOUT``, ``REQUEST_TIMEOUT``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar, Self

import orjson

from dispatch_celery.backend import Run
from dispatch_celery.backends.genai import embedding_summary, upstream_message
from dispatch_celery.backends.http import (
    DELIVERED,
    Auth,
    HttpBackend,
    HttpOptions,
    Outcome,
    Rejected,
    Reply,
    Request,
    vendor_uuid,
)
from dispatch_celery.decode.records import RunRecord, Usage
from dispatch_celery.settings import Settings

DEFAULT_ENDPOINT = "https://api.lunary.ai/v1/runs/ingest"
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
VENDOR_MAX_REQUEST_BYTES = 20 * 1024 * 1024  # Lunary answers 413 above this
AUTH_STATUSES = frozenset({401, 402, 403})  # 402: "Incorrect project id format"
NON_CHAT_TYPE = "tool"
DUPLICATE_START = "Run with this ID already exists"  # Lunary's DuplicateError
MAX_ERROR_MESSAGE_CHARS = 2000
EVENTS_PER_RUN = 2  # start, and end or error
# Request fields shown as Lunary "params" (model and user have their own places).
PARAM_KEYS = (
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "frequency_penalty",
    "presence_penalty", "stop", "seed", "n", "logit_bias", "logprobs", "top_logprobs",
    "response_format", "tools", "tool_choice", "parallel_tool_calls", "reasoning_effort",
    "stream", "voice", "speed", "dimensions", "encoding_format", "size", "quality",
)  # fmt: skip
_BODY_START, _BODY_END = b'{"events":[', b"]}"
_OVERHEAD = len(_BODY_START) + len(_BODY_END)


# --- payload ------------------------------------------------------------------------------


def _is_llm(path: str) -> bool:
    # chat and legacy completions, and the Responses API
    return path.rstrip("/").endswith(("/completions", "/responses"))


def _is_responses(path: str) -> bool:
    return path.rstrip("/").endswith("/responses")


def _input(record: RunRecord, request: dict[str, Any] | None) -> Any:
    if request is None:
        return record["input"]  # text (truncated JSON), a binary marker, or None
    if _is_responses(record["path"]):
        return _responses_input(request)
    if _is_llm(record["path"]):
        for key in ("messages", "prompt"):
            if request.get(key) is not None:
                return request[key]
    if "input" in request:
        return request["input"]
    return {k: v for k, v in request.items() if k not in PARAM_KEYS and k not in {"model", "user"}}


def _params(request: dict[str, Any] | None) -> dict[str, Any]:
    if request is None:
        return {}
    return {key: request[key] for key in PARAM_KEYS if request.get(key) is not None}


def _responses_input(request: dict[str, Any]) -> Any:
    """Responses API input as chat messages, the shape Lunary shows for llm runs."""
    value = request.get("input")
    messages = [{"role": "user", "content": value}] if isinstance(value, str) else value
    instructions = request.get("instructions")
    if isinstance(instructions, str) and isinstance(messages, list):
        return [{"role": "system", "content": instructions}, *messages]
    return messages


def _responses_output(output: dict[str, Any]) -> Any:
    messages = []
    for item in output.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            parts = item.get("content") or []
            text = "".join(p.get("text", "") for p in parts if isinstance(p, dict) and "text" in p)
            messages.append({"role": item.get("role") or "assistant", "content": text})
    if not messages:
        return output
    return messages[0] if len(messages) == 1 else messages


def _output(record: RunRecord) -> Any:
    output = record["output"]
    if not isinstance(output, dict):
        return output
    if _is_responses(record["path"]):
        return _responses_output(output)
    choices = output.get("choices")
    if _is_llm(record["path"]) and isinstance(choices, list) and choices:
        messages = [_choice_message(choice) for choice in choices if isinstance(choice, dict)]
        if messages:
            return messages[0] if len(messages) == 1 else messages
    data = output.get("data")
    if isinstance(data, list) and any(isinstance(d, dict) and "embedding" in d for d in data):
        # Vectors are large and Lunary cannot show them usefully: keep their shape only.
        return {**output, "data": [embedding_summary(d) for d in data]}
    return output


def _choice_message(choice: dict[str, Any]) -> Any:
    message = choice.get("message")
    if isinstance(message, dict):
        return message
    if "text" in choice:  # legacy completions
        return {"role": "assistant", "content": choice["text"]}
    return choice


def _tokens(usage: Usage | None) -> dict[str, int]:
    if not usage:
        return {}
    tokens: dict[str, int] = {}
    for ours, theirs in (("prompt_tokens", "prompt"), ("completion_tokens", "completion")):
        value = usage.get(ours)
        if isinstance(value, int) and not isinstance(value, bool):
            tokens[theirs] = value
    return tokens


def _error_message(record: RunRecord) -> str:
    message = upstream_message(record)
    text = f"HTTP {record['status']}" + (f": {message}" if message else "")
    return text[:MAX_ERROR_MESSAGE_CHARS]


def _metadata(record: RunRecord, run_id: str) -> dict[str, Any]:
    # Lunary keeps only first-level scalars (nested values are dropped silently), and skips
    # nulls: so flat, non-null, camelCase (Lunary camel-cases keys anyway).
    meta: dict[str, Any] = {
        "path": record["path"],
        "method": record["method"],
        "status": record["status"],
        "durationMs": record["duration_ms"],
        "streamId": record["stream_id"],
        "provider": record["provider"],
        "streamed": record["streamed"],
        "requestId": record["request_id"] or None,
        "recordId": record["id"] if record["id"] != run_id else None,
    }
    return {k: v for k, v in meta.items() if v is not None}


def _start_time(record: RunRecord) -> str:
    """``started_at``, unless it lies after ``ended_at`` (a producer's skewed clock): Lunary
    sorts a request's events by timestamp, and an end sorted before its start is dropped."""
    started, ended = record["started_at"], record["ended_at"]
    try:
        if datetime.fromisoformat(started) > datetime.fromisoformat(ended):
            return ended
    except ValueError:
        pass
    return started


def build_events(record: RunRecord, run_id: str) -> list[dict[str, Any]]:
    """The start and the end (or error) event of one run, in that order."""
    request = record["input"] if isinstance(record["input"], dict) else None
    kind = "llm" if _is_llm(record["path"]) else NON_CHAT_TYPE
    start: dict[str, Any] = {
        "type": kind,
        "event": "start",
        "runId": run_id,
        "timestamp": _start_time(record),
        "name": record["model"] or record["path"],
        "metadata": _metadata(record, run_id),
    }
    value = _input(record, request)
    if value is not None:
        start["input"] = value
    if params := _params(request):
        start["params"] = params
    user = request.get("user") if request is not None else None
    if isinstance(user, str) and user:
        start["userId"] = user
    last: dict[str, Any] = {"type": kind, "runId": run_id, "timestamp": record["ended_at"]}
    if record["status"] >= 400:
        last.update(event="error", error={"message": _error_message(record), "stack": None})
    else:
        last.update(event="end", output=_output(record))
        if tokens := _tokens(record["usage"]):
            last["tokensUsage"] = tokens
    return [start, last]


@dataclass(frozen=True, slots=True)
class _Item:
    run_id: str  # ours
    events: bytes  # the run's events, JSON, comma-joined


def pack(items: Sequence[_Item], limit: int) -> list[list[_Item]]:
    """Greedy split into request bodies of at most ``limit`` bytes; a larger run goes alone."""
    chunks: list[list[_Item]] = []
    current: list[_Item] = []
    size = _OVERHEAD
    for item in items:
        extra = len(item.events) + (1 if current else 0)  # the comma
        if current and size + extra > limit:
            chunks.append(current)
            current, size, extra = [], _OVERHEAD, len(item.events)
        current.append(item)
        size += extra
    if current:
        chunks.append(current)
    return chunks


def _body(chunk: Sequence[_Item]) -> bytes:
    return _BODY_START + b",".join(item.events for item in chunk) + _BODY_END


def run_outcome(service: str, results: Sequence[Mapping[str, Any]]) -> Outcome:
    """A run's outcome from the results carrying its id (Lunary names no event in them).

    Delivered when there is one result per event sent and each is a success or the start's
    "already exists" (only a start can be a duplicate: an earlier attempt stored it).
    Whichever event failed, the run is not delivered: an end whose start failed was
    dropped by Lunary, and a retry re-sends both (a stored start then answers duplicate).
    Every failure is transient: Lunary's results carry free text only, and guessing
    "permanent" from it would dead-letter runs that a retry stores.
    """
    if len(results) != EVENTS_PER_RUN:
        return Outcome.transient(
            f"{service}: {len(results)} results for the run, expected {EVENTS_PER_RUN}"
        )
    for result in results:
        if result.get("success") is True:
            continue
        error = str(result.get("error") or "no reason given")
        if not error.startswith(DUPLICATE_START):
            return Outcome.transient(f"{service}: an event of the run was refused: {error}")
    return DELIVERED


# --- the backend --------------------------------------------------------------------------


class LunaryBackend(HttpBackend):
    """Delivers runs to Lunary's ingestion API, reading the per-event results."""

    name: ClassVar[str] = "lunary"
    default_endpoint: ClassVar[str] = DEFAULT_ENDPOINT
    credentials_required: ClassVar[bool] = True
    auth_statuses: ClassVar[frozenset[int]] = AUTH_STATUSES
    stop_on_transient: ClassVar[bool] = True  # one failing request: the server is failing

    def __init__(
        self,
        options: HttpOptions,
        auth: Auth | None = None,
        *,
        concurrency: int | None = None,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ) -> None:
        super().__init__(options, auth, concurrency=concurrency)
        self.max_request_bytes = max_request_bytes

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> Self:
        backend = super().from_settings(service, settings)
        backend.max_request_bytes = settings.positive_int(
            service, "MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES,
            maximum=VENDOR_MAX_REQUEST_BYTES,
        )  # fmt: skip
        return backend

    def encode(self, runs: Sequence[Run]) -> Iterator[Request | Rejected]:
        service = self.options.service
        items: list[_Item] = []
        for run in runs:
            try:
                events = b",".join(orjson.dumps(e) for e in build_events(run.record, run_uuid(run)))
            except (TypeError, ValueError, KeyError) as exc:  # JSONEncodeError is a TypeError
                yield Rejected(run.id, f"{service}: cannot build events: {exc}")
                continue
            if len(events) + _OVERHEAD > VENDOR_MAX_REQUEST_BYTES:
                yield Rejected(
                    run.id,
                    f"{service}: run is {len(events)} bytes, over Lunary's 20 MB request limit",
                )
                continue
            items.append(_Item(run.id, events))
        for chunk in pack(items, self.max_request_bytes):
            yield Request(tuple(item.run_id for item in chunk), _body(chunk))

    def read(self, request: Request, reply: Reply) -> dict[str, Outcome]:
        results = orjson.loads(reply.body)["results"]
        if not isinstance(results, list):
            raise TypeError("results is not a list")
        by_id: dict[str, list[Mapping[str, Any]]] = {}
        for result in results:
            if isinstance(result, dict):
                by_id.setdefault(str(result.get("id")), []).append(result)
        service = self.options.service
        return {
            run_id: run_outcome(service, by_id.get(vendor_uuid(run_id), []))
            for run_id in request.runs
        }


def run_uuid(run: Run) -> str:
    """The runId Lunary stores (a UUID; derived stably when ours is not one)."""
    return vendor_uuid(run.id)
