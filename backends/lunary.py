"""Lunary: runs as start + end (or error) events, many runs per ``POST /v1/runs/ingest``.

Lunary answers HTTP 200 with one result per event even when events failed, so success is
read per event: a run is delivered when its start was stored (or already existed: a
duplicate start means an earlier attempt stored it) and its end or error was accepted.
Start and end of a run always travel in the same request (Lunary sorts a request's events
by timestamp), because an end whose start is not stored is acknowledged and dropped.
Requests are split by bytes (``DISPATCH_LUNARY_MAX_REQUEST_BYTES``, default 1 MiB); a run
is never split across requests.

Event types: chat completions, legacy completions and the Responses API are ``llm`` runs.
Every other call (embeddings, audio, images, moderations) is a ``tool`` run named after its
model: Lunary stores any type in its run table and shows tool runs with generic
input/output, whereas ``log`` goes to a table current Lunary dropped, ``embed`` and
``retriever`` are marked "todo: actual support" in Lunary's source, and ``llm`` would put
non-chat payloads into views that expect messages.

Per-event failures other than a duplicate start are retried unless their text says the
payload itself is wrong (``invalid ...``, ``violates ...``, ``value too long`` ...): those
are rejected for good. Unknown texts count as transient, so the core retries them a bounded
number of times and then dead-letters them; nothing is dropped on a guess.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson

from dispatch_celery.backend import DeliveryContext, DeliveryReport, Run
from dispatch_celery.backends.http import (
    BUDGET_SPENT,
    DELIVERED,
    Deadline,
    HttpClient,
    HttpOptions,
    Outcome,
    Reply,
    Verdict,
    auth_message,
    int_option,
    pause_for,
    slow_down,
    summarize,
    vendor_uuid,
)
from dispatch_celery.decode.records import RunRecord, Usage
from dispatch_celery.errors import TransientDeliveryError
from dispatch_celery.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "https://api.lunary.ai/v1/runs/ingest"
DEFAULT_MAX_REQUEST_BYTES = 1024 * 1024
VENDOR_MAX_REQUEST_BYTES = 20 * 1024 * 1024  # Lunary answers 413 above this
AUTH_STATUSES = frozenset({401, 402, 403})  # 402: "Incorrect project id format"
NON_CHAT_TYPE = "tool"
DUPLICATE_START = "Run with this ID already exists"
MAX_ERROR_MESSAGE_CHARS = 2000
_PERMANENT_EVENT_ERROR = re.compile(
    r"invalid|violates|value too long|out of range|malformed|syntax|unsupported|not supported"
    r"|must be|cannot be|does not exist",
    re.IGNORECASE,
)
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
        return {**output, "data": [_embedding_summary(d) for d in data]}
    return output


def _choice_message(choice: dict[str, Any]) -> Any:
    message = choice.get("message")
    if isinstance(message, dict):
        return message
    if "text" in choice:  # legacy completions
        return {"role": "assistant", "content": choice["text"]}
    return choice


def _embedding_summary(item: Any) -> Any:
    if not isinstance(item, dict) or "embedding" not in item:
        return item
    summary = {k: v for k, v in item.items() if k != "embedding"}
    vector = item["embedding"]
    summary["dimensions"] = len(vector) if isinstance(vector, list) else None
    return summary


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
    error = record["error"] if record["error"] is not None else record["output"]
    message: Any = None
    if isinstance(error, dict):
        inner = error.get("error", error)
        if isinstance(inner, dict):
            message = inner.get("message") or inner.get("code") or inner.get("type")
        elif isinstance(inner, str):
            message = inner
        message = message or error.get("message")
    elif isinstance(error, str):
        message = error
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


def build_events(record: RunRecord, run_id: str) -> list[dict[str, Any]]:
    """The start and the end (or error) event of one run, in that order."""
    request = record["input"] if isinstance(record["input"], dict) else None
    kind = "llm" if _is_llm(record["path"]) else NON_CHAT_TYPE
    start: dict[str, Any] = {
        "type": kind,
        "event": "start",
        "runId": run_id,
        "timestamp": record["started_at"],
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
    lunary_id: str  # the UUID Lunary stores and echoes in its results
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


def event_error_verdict(text: str) -> Verdict:
    return Verdict.REJECTED if _PERMANENT_EVENT_ERROR.search(text) else Verdict.TRANSIENT


# --- the backend --------------------------------------------------------------------------


class LunaryBackend:
    """Delivers runs to Lunary's ingestion API, reading the per-event results."""

    name: ClassVar[str] = "lunary"

    def __init__(
        self, options: HttpOptions, *, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    ) -> None:
        self.options = options
        self.max_request_bytes = max_request_bytes
        self.client = HttpClient(options, pool_size=1)  # one request at a time per process

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> LunaryBackend:
        return cls(
            HttpOptions.from_settings(service, settings, DEFAULT_ENDPOINT),
            max_request_bytes=int_option(
                settings, service, "MAX_REQUEST_BYTES", DEFAULT_MAX_REQUEST_BYTES,
                maximum=VENDOR_MAX_REQUEST_BYTES,
            ),
        )  # fmt: skip

    def deliver(self, runs: Sequence[Run], ctx: DeliveryContext) -> DeliveryReport:
        service = self.options.service
        outcomes: dict[str, Outcome] = {}
        items: list[_Item] = []
        for run in {run.id: run for run in runs}.values():
            lunary_id = vendor_uuid(run.id)
            try:
                events = b",".join(orjson.dumps(e) for e in build_events(run.record, lunary_id))
            except (TypeError, ValueError, KeyError) as exc:  # JSONEncodeError is a TypeError
                outcomes[run.id] = Outcome(
                    Verdict.REJECTED, f"{service}: cannot build events: {exc}"
                )
                continue
            if len(events) + _OVERHEAD > VENDOR_MAX_REQUEST_BYTES:
                outcomes[run.id] = Outcome(
                    Verdict.REJECTED,
                    f"{service}: run is {len(events)} bytes, over Lunary's 20 MB request limit",
                )
                continue
            items.append(_Item(run.id, lunary_id, events))
        stop: Outcome | None = None
        deadline = Deadline(self.options.attempt_budget)
        for chunk in pack(items, self.max_request_bytes):
            stop = self._send(chunk, ctx, outcomes, stop, deadline)
        return summarize(service, outcomes)

    def _send(
        self,
        chunk: Sequence[_Item],
        ctx: DeliveryContext,
        outcomes: dict[str, Outcome],
        stop: Outcome | None,
        deadline: Deadline,
    ) -> Outcome | None:
        """Send one request; record its runs' outcomes; return why to stop sending, if so."""
        if stop is None and deadline.passed:
            stop = BUDGET_SPENT
        if stop is None:
            try:
                ctx.acquire(1)
            except TransientDeliveryError as exc:
                stop = Outcome(Verdict.TRANSIENT, str(exc), exc.retry_after)
        if stop is not None:
            outcomes.update((item.run_id, stop) for item in chunk)
            return stop
        reply = self.client.post(_body(chunk))
        verdict = reply.verdict(AUTH_STATUSES)
        if verdict is Verdict.DELIVERED:
            outcomes.update(self._results(chunk, reply))
            return None
        if verdict is Verdict.AUTH:
            failed = Outcome(Verdict.AUTH, auth_message(self.options, reply))
            outcomes.update((item.run_id, failed) for item in chunk)
            return failed
        reason = reply.describe(self.options)
        if verdict is Verdict.TRANSIENT:
            retry_after = reply.retry_after
            if reply.status == 429:
                retry_after = pause_for(reply)
                slow_down(ctx, retry_after)
            outcomes.update((item.run_id, Outcome(verdict, reason, retry_after)) for item in chunk)
            # A throttling or failing server gets no more requests from this attempt.
            return Outcome(verdict, f"not sent after an earlier failure: {reason}", retry_after)
        if len(chunk) == 1:
            outcomes[chunk[0].run_id] = Outcome(Verdict.REJECTED, reason)
            return None
        # A 4xx refuses the whole request without naming an event (Lunary stored nothing):
        # halve the request until the refused run stands alone, so the others still go.
        middle = len(chunk) // 2
        stop = self._send(chunk[:middle], ctx, outcomes, None, deadline)
        return self._send(chunk[middle:], ctx, outcomes, stop, deadline)

    def _results(self, chunk: Sequence[_Item], reply: Reply) -> dict[str, Outcome]:
        try:
            results = orjson.loads(reply.body)["results"]
            if not isinstance(results, list):
                raise TypeError("results is not a list")
        except (ValueError, TypeError, KeyError) as exc:
            # Re-sending is safe: a start stored this time answers "already exists" next time.
            unreadable = Outcome(
                Verdict.TRANSIENT, f"{self.options.service}: unreadable ingest answer ({exc})"
            )
            return {item.run_id: unreadable for item in chunk}
        by_id: dict[str, list[Mapping[str, Any]]] = {}
        for result in results:
            if isinstance(result, dict):
                by_id.setdefault(str(result.get("id")), []).append(result)
        # Results come in timestamp order and start <= end, so per run id: [start, end].
        return {item.run_id: self._run_outcome(by_id.get(item.lunary_id, [])) for item in chunk}

    def _run_outcome(self, results: list[Mapping[str, Any]]) -> Outcome:
        service = self.options.service
        if len(results) != 2:
            return Outcome(
                Verdict.TRANSIENT, f"{service}: {len(results)} results for the run, expected 2"
            )
        start, end = results
        if start.get("success") is not True:
            error = str(start.get("error") or "no reason given")
            if DUPLICATE_START not in error:  # a duplicate start: stored by an earlier attempt
                return Outcome(event_error_verdict(error), f"{service}: start refused: {error}")
        if end.get("success") is not True:
            error = str(end.get("error") or "no reason given")
            return Outcome(event_error_verdict(error), f"{service}: end refused: {error}")
        return DELIVERED

    def close(self) -> None:
        self.client.close()
