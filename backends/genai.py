"""LLM run record -> one span's worth of data: ids, times, status and attributes in both the
OpenTelemetry GenAI semantic conventions and OpenInference.

Used by the ``otlp`` backend (and so by ``langfuse``). Receivers read one convention or the
other (Phoenix reads OpenInference and converts only the newest GenAI style; Langfuse reads
both; generic OTel backends read GenAI), so a span carries both. The shapes here follow what
was measured against Phoenix (``shared/spec/otlp.md``):

* GenAI message attributes (``gen_ai.input.messages``, ``gen_ai.output.messages``,
  ``gen_ai.system_instructions``) are JSON strings in the semconv ``parts`` shape; every
  output message has a ``finish_reason`` (one invalid item makes Phoenix drop the list);
* OpenInference messages are flattened (``llm.input_messages.0.message.role`` ...), and
  ``input.value`` / ``output.value`` carry the whole request / response JSON.

Nothing is read from the event's bodies: only the record, which the core has redacted
(and, in metadata-only mode, stripped of ``input`` and ``output``: then no message content,
no parameters and no ``input.value`` / ``output.value`` appear, only metadata).

Ids are derived from the run id, so a retried or replayed run is the same span: the trace
id is the run id's UUID (``vendor_uuid``: the run id itself when it is a UUID, which makes
the trace easy to find by request id), the span id the first 8 bytes of its SHA-256.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from dispatch_celery.decode.records import RunRecord

# Namespace of the UUIDs derived for run ids that are not UUIDs (the same one the HTTP
# toolkit uses for vendors' uuid columns, so a run has one derived UUID everywhere).
_ID_NAMESPACE = uuid.UUID("a8d5c2f4-6a0e-4c53-9b7e-2f6c1d9e8b34")
MAX_ERROR_MESSAGE_CHARS = 2000
DEFAULT_FINISH_REASON = "stop"  # semconv requires one per output message; upstream omitted it
ERROR_FINISH_REASON = "error"

# Request fields that are model parameters (the rest is content, model, or identity).
PARAM_KEYS = (
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "max_output_tokens",
    "frequency_penalty", "presence_penalty", "stop", "seed", "n", "logit_bias", "logprobs",
    "top_logprobs", "response_format", "tools", "tool_choice", "parallel_tool_calls",
    "reasoning_effort", "reasoning", "stream", "stream_options", "voice", "speed", "dimensions",
    "encoding_format", "size", "quality", "text", "truncation", "service_tier", "store",
)  # fmt: skip
# Scalar parameters with a GenAI semconv attribute of their own.
_GENAI_PARAMS = (
    ("temperature", "gen_ai.request.temperature"),
    ("top_p", "gen_ai.request.top_p"),
    ("frequency_penalty", "gen_ai.request.frequency_penalty"),
    ("presence_penalty", "gen_ai.request.presence_penalty"),
    ("seed", "gen_ai.request.seed"),
)

AttributeValue = str | bool | int | float | list[str] | list[int] | list[float]


@dataclass
class SpanData:
    """What the OTLP encoder needs for one run's span."""

    run_id: str
    name: str
    trace_id: bytes  # 16 bytes
    span_id: bytes  # 8 bytes
    start_ns: int
    end_ns: int
    error: str | None  # status message of an ERROR span; None: status OK
    attributes: dict[str, AttributeValue] = field(default_factory=dict)


@dataclass
class Parsed:
    """The run, read once: what both conventions (and Langfuse's attributes) are built from."""

    operation: str
    kind: str  # OpenInference span kind
    request: dict[str, Any] | None
    request_model: str | None
    response_model: str | None
    system: list[dict[str, Any]]  # semconv parts of system instructions given apart
    inputs: list[dict[str, Any]]  # semconv input messages
    outputs: list[dict[str, Any]]  # semconv output messages
    openai_input: Any  # the input as the vendor shows it (OpenAI messages, text, ...)
    openai_output: Any
    params: dict[str, Any]
    finish_reasons: list[str]
    error: str | None
    user: str | None
    session: str | None
    metadata: dict[str, Any]


# --- ids and times ------------------------------------------------------------------------


def run_uuid(run_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(run_id)
    except ValueError:
        return uuid.uuid5(_ID_NAMESPACE, run_id)


def trace_id_for(run_id: str) -> bytes:
    raw = run_uuid(run_id).bytes
    return raw if any(raw) else hashlib.sha256(b"trace:" + run_id.encode()).digest()[:16]


def span_id_for(run_id: str) -> bytes:
    digest = hashlib.sha256(b"span:" + run_uuid(run_id).bytes).digest()
    return digest[:8] if any(digest[:8]) else digest[8:16]


def unix_ns(iso: str) -> int:
    moment = datetime.fromisoformat(iso)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000_000 + delta.microseconds * 1000


# --- reading the run ------------------------------------------------------------------------


def _endpoint(path: str) -> str:
    return path.split("?", 1)[0].rstrip("/")


def operation_for(path: str) -> tuple[str, str]:
    """(gen_ai.operation.name, OpenInference span kind) of a call to ``path``."""
    p = _endpoint(path)
    if p.endswith("/chat/completions") or p.endswith("/responses"):
        return "chat", "LLM"
    if p.endswith("/completions"):
        return "text_completion", "LLM"
    if p.endswith("/embeddings"):
        return "embeddings", "EMBEDDING"
    if p.endswith(("/audio/speech", "/images/generations", "/images/edits")):
        return "generate_content", "LLM"
    # Anything else (transcriptions, moderations, ...): named after its path, still a model call.
    tail = p.removeprefix("/v1/").strip("/").replace("/", ".")
    return tail or "request", "LLM"


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return orjson.dumps(value).decode()


def _maybe_json(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return text


def _content_parts(content: Any) -> list[dict[str, Any]]:
    """OpenAI message content (text or content parts) -> semconv parts."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "content": content}]
    if not isinstance(content, list):
        return [{"type": "text", "content": _text(content)}]
    parts: list[dict[str, Any]] = []
    for item in content:
        if not isinstance(item, dict):
            parts.append({"type": "text", "content": _text(item)})
            continue
        kind = item.get("type")
        if kind in {"text", "input_text", "output_text"} and "text" in item:
            parts.append({"type": "text", "content": _text(item["text"])})
        elif kind in {"refusal"} and "refusal" in item:
            parts.append({"type": "text", "content": _text(item["refusal"])})
        elif kind in {"image_url", "input_image"}:
            image = item.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            parts.append(_uri_part(url, "image"))
        elif kind == "input_audio" and isinstance(item.get("input_audio"), dict):
            audio = item["input_audio"]
            parts.append(
                {"type": "blob", "modality": "audio", "content": _text(audio.get("data", "")),
                 "mime_type": f"audio/{audio.get('format') or 'wav'}"}
            )  # fmt: skip
        else:  # the semconv "generic part": any type, its own fields
            parts.append({**item, "type": str(kind or "unknown")})
    return parts


def _uri_part(url: Any, modality: str) -> dict[str, Any]:
    text = url if isinstance(url, str) else ""
    if text.startswith("data:") and ";base64," in text:
        head, _, data = text.partition(";base64,")
        return {"type": "blob", "modality": modality, "mime_type": head[5:], "content": data}
    return {"type": "uri", "modality": modality, "uri": text}


def _tool_call_part(call: Any) -> dict[str, Any]:
    if not isinstance(call, dict):
        return {"type": "tool_call", "name": "", "arguments": call}
    inner = call.get("function")
    function: dict[str, Any] = inner if isinstance(inner, dict) else call
    part: dict[str, Any] = {"type": "tool_call", "name": str(function.get("name") or "")}
    call_id = call.get("id") or call.get("call_id")
    if call_id is not None:
        part["id"] = str(call_id)
    if "arguments" in function:
        part["arguments"] = _maybe_json(function["arguments"])
    return part


def _chat_message(message: Any) -> dict[str, Any]:
    """One OpenAI chat message -> a semconv chat message."""
    if not isinstance(message, dict):
        return {"role": "user", "parts": _content_parts(message)}
    role = str(message.get("role") or "user")
    if role in {"tool", "function"}:
        part: dict[str, Any] = {"type": "tool_call_response", "response": message.get("content")}
        if message.get("tool_call_id") is not None:
            part["id"] = str(message["tool_call_id"])
        return {"role": "tool", "parts": [part]}
    parts = _content_parts(message.get("content"))
    if message.get("refusal"):
        parts.append({"type": "text", "content": _text(message["refusal"])})
    for call in message.get("tool_calls") or []:
        parts.append(_tool_call_part(call))
    if isinstance(message.get("function_call"), dict):  # the legacy single function call
        parts.append(_tool_call_part({"function": message["function_call"]}))
    out: dict[str, Any] = {"role": role, "parts": parts}
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _responses_items(items: Any) -> list[dict[str, Any]]:
    """Responses API ``input`` (text or items) -> semconv chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "parts": [{"type": "text", "content": items}]}]
    if not isinstance(items, list):
        return []
    messages: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        kind = item.get("type", "message")
        if kind == "message" or "role" in item:
            messages.append(
                {"role": str(item.get("role") or "user"),
                 "parts": _content_parts(item.get("content"))}
            )  # fmt: skip
        elif kind == "function_call":
            messages.append({"role": "assistant", "parts": [_tool_call_part(item)]})
        elif kind == "function_call_output":
            part = {"type": "tool_call_response", "response": item.get("output")}
            if item.get("call_id") is not None:
                part["id"] = str(item["call_id"])
            messages.append({"role": "tool", "parts": [part]})
    return messages


def _responses_output(output: dict[str, Any], error: bool) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    for item in output.get("output") or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            parts.extend(_content_parts(item.get("content")))
        elif kind == "function_call":
            parts.append(_tool_call_part(item))
        elif kind == "reasoning":
            summary = item.get("summary") or []
            text = "".join(s.get("text", "") for s in summary if isinstance(s, dict))
            if text:
                parts.append({"type": "reasoning", "content": text})
    if not parts:
        return []
    status = output.get("status")
    details = output.get("incomplete_details")
    reason = ERROR_FINISH_REASON if error else DEFAULT_FINISH_REASON
    if status == "incomplete" and isinstance(details, dict):
        reason = "length" if details.get("reason") == "max_output_tokens" else "content_filter"
    elif any(p["type"] == "tool_call" for p in parts):
        reason = "tool_call"
    return [{"role": "assistant", "parts": parts, "finish_reason": reason}]


def _choices(output: Any, error: bool) -> tuple[list[dict[str, Any]], list[str], Any]:
    """Chat / completion choices -> (semconv output messages, finish reasons, vendor view)."""
    choices = output.get("choices") if isinstance(output, dict) else None
    if not isinstance(choices, list):
        return [], [], None
    messages: list[dict[str, Any]] = []
    reasons: list[str] = []
    shown: list[Any] = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            reasons.append(finish)
        message = choice.get("message")
        if isinstance(message, dict):
            out = _chat_message({**message, "role": message.get("role") or "assistant"})
            shown.append(message)
        elif "text" in choice:  # legacy completions
            out = {"role": "assistant", "parts": _content_parts(choice["text"])}
            shown.append({"role": "assistant", "content": choice["text"]})
        else:
            continue
        default = ERROR_FINISH_REASON if error else DEFAULT_FINISH_REASON
        out["finish_reason"] = finish if isinstance(finish, str) and finish else default
        messages.append(out)
    vendor: Any = shown[0] if len(shown) == 1 else (shown or None)
    return messages, reasons, vendor


def upstream_message(record: RunRecord) -> Any:
    """The upstream's message of a failed call, as it came (usually a string), or None: the
    error body's ``error.message`` (or its code or type), a bare error string, or a top-level
    ``message``."""
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
    return message


def error_message(record: RunRecord) -> str:
    """``HTTP <status>: <the upstream's message>`` of a failed call."""
    message = upstream_message(record)
    text = f"HTTP {record['status']}" + (f": {_text(message)}" if message else "")
    return text[:MAX_ERROR_MESSAGE_CHARS]


def _session(request: dict[str, Any] | None) -> str | None:
    if request is None:
        return None
    conversation = request.get("conversation")
    if isinstance(conversation, dict):
        conversation = conversation.get("id")
    if isinstance(conversation, str) and conversation:
        return conversation
    meta = request.get("metadata")
    if isinstance(meta, dict):
        for key in ("session_id", "conversation_id"):
            if isinstance(meta.get(key), str) and meta[key]:
                return str(meta[key])
    return None


def _user(request: dict[str, Any] | None) -> str | None:
    if request is None:
        return None
    for key in ("user", "safety_identifier"):
        value = request.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def parse(record: RunRecord) -> Parsed:
    path = record["path"]
    operation, kind = operation_for(path)
    request = record["input"] if isinstance(record["input"], dict) else None
    output = record["output"]
    failed = record["status"] >= 400
    is_responses = _endpoint(path).endswith("/responses")
    request_model = request.get("model") if request is not None else None
    response_model = output.get("model") if isinstance(output, dict) else None
    system: list[dict[str, Any]] = []
    inputs: list[dict[str, Any]] = []
    outputs: list[dict[str, Any]] = []
    reasons: list[str] = []
    openai_input: Any = record["input"]
    openai_output: Any = output
    if request is not None:
        if is_responses:
            inputs = _responses_items(request.get("input"))
            if isinstance(request.get("instructions"), str):
                system = [{"type": "text", "content": request["instructions"]}]
            openai_input = request.get("input")
        elif isinstance(request.get("messages"), list):
            inputs = [_chat_message(m) for m in request["messages"]]
            openai_input = request["messages"]
        elif operation == "text_completion" and request.get("prompt") is not None:
            prompt = request["prompt"]
            prompts = prompt if isinstance(prompt, list) else [prompt]
            inputs = [{"role": "user", "parts": _content_parts(p)} for p in prompts]
            openai_input = prompt
        elif "input" in request:
            openai_input = request["input"]
    if isinstance(output, dict) and not output.get("_binary") and not output.get("_truncated"):
        if is_responses:
            outputs = _responses_output(output, failed)
            reasons = [m["finish_reason"] for m in outputs]
            messages = [m for m in output.get("output") or [] if isinstance(m, dict)]
            openai_output = messages[0] if len(messages) == 1 else (messages or output)
        elif not failed:
            outputs, reasons, shown = _choices(output, failed)
            if shown is not None:
                openai_output = shown
        if operation == "embeddings" and isinstance(output.get("data"), list):
            openai_output = {**output, "data": [embedding_summary(d) for d in output["data"]]}
    if failed and record["error"] is not None:
        openai_output = record["error"]
    params = {k: request[k] for k in PARAM_KEYS if request.get(k) is not None} if request else {}
    metadata: dict[str, Any] = {
        "run_id": record["id"],
        "request_id": record["request_id"] or None,
        "stream_id": record["stream_id"],
        "method": record["method"],
        "path": path,
        "status": record["status"],
        "duration_ms": record["duration_ms"],
        "streamed": record["streamed"],
    }
    return Parsed(
        operation=operation,
        kind=kind,
        request=request,
        request_model=request_model if isinstance(request_model, str) and request_model else None,
        response_model=(
            response_model if isinstance(response_model, str) and response_model else None
        ),
        system=system,
        inputs=inputs,
        outputs=outputs,
        openai_input=openai_input,
        openai_output=openai_output,
        params=params,
        finish_reasons=reasons,
        error=error_message(record) if failed else None,
        user=_user(request),
        session=_session(request),
        metadata={k: v for k, v in metadata.items() if v is not None},
    )


def embedding_summary(item: Any) -> Any:
    """An embeddings ``data`` item with its vector replaced by ``dimensions`` (its length)."""
    if not isinstance(item, dict) or "embedding" not in item:
        return item
    summary = {k: v for k, v in item.items() if k != "embedding"}
    vector = item["embedding"]
    summary["dimensions"] = len(vector) if isinstance(vector, list) else None
    return summary


# --- attributes -------------------------------------------------------------------------------


def _json(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


def _value_and_mime(value: Any) -> tuple[str, str]:
    if isinstance(value, str):
        return value, "text/plain"
    return _json(value), "application/json"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _flat_messages(prefix: str, messages: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Semconv messages -> OpenInference's flattened ``llm.*_messages.{i}.message.*``."""
    out: dict[str, Any] = {}
    for i, message in enumerate(messages):
        base = f"{prefix}.{i}.message"
        out[f"{base}.role"] = message["role"]
        texts: list[str] = []
        calls = 0
        contents = 0
        for part in message["parts"]:
            kind = part.get("type")
            if kind == "text":
                texts.append(str(part.get("content", "")))
            elif kind == "tool_call":
                call = f"{base}.tool_calls.{calls}.tool_call"
                if "id" in part:
                    out[f"{call}.id"] = part["id"]
                out[f"{call}.function.name"] = part.get("name", "")
                arguments = part.get("arguments")
                if arguments is not None:
                    out[f"{call}.function.arguments"] = (
                        arguments if isinstance(arguments, str) else _json(arguments)
                    )
                calls += 1
            elif kind == "tool_call_response":
                if "id" in part:
                    out[f"{base}.tool_call_id"] = part["id"]
                response = part.get("response")
                if response is not None:
                    texts.append(response if isinstance(response, str) else _json(response))
            elif kind in {"uri", "blob"} and part.get("modality") == "image":
                url = part.get("uri") or f"data:{part.get('mime_type')};base64,{part['content']}"
                item = f"{base}.contents.{contents}.message_content"
                out[f"{item}.type"] = "image"
                out[f"{item}.image.image.url"] = url
                contents += 1
        if texts:
            out[f"{base}.content"] = "".join(texts) if len(texts) == 1 else "\n".join(texts)
        if "name" in message:
            out[f"{base}.name"] = message["name"]
    return out


def genai_attributes(record: RunRecord, parsed: Parsed) -> dict[str, AttributeValue]:
    """The GenAI semconv and OpenInference attributes of the run's span."""
    model = parsed.request_model or record["model"]
    attrs: dict[str, Any] = {
        # OpenTelemetry GenAI semantic conventions
        "gen_ai.operation.name": parsed.operation,
        "gen_ai.provider.name": record["provider"],
        "gen_ai.system": record["provider"],  # the deprecated name older receivers read
    }
    if model:
        attrs["gen_ai.request.model"] = model
    if parsed.response_model:
        attrs["gen_ai.response.model"] = parsed.response_model
    output = record["output"]
    if isinstance(output, dict) and isinstance(output.get("id"), str):
        attrs["gen_ai.response.id"] = output["id"]
    params = parsed.params
    for key, name in _GENAI_PARAMS:
        if _is_number(params.get(key)):
            attrs[name] = params[key]
    max_tokens = next(
        (params[k] for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")
         if _is_number(params.get(k))),
        None,
    )  # fmt: skip
    if max_tokens is not None:
        attrs["gen_ai.request.max_tokens"] = max_tokens
    stop = params.get("stop")
    if isinstance(stop, str):
        attrs["gen_ai.request.stop_sequences"] = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        attrs["gen_ai.request.stop_sequences"] = list(stop)
    if _is_number(params.get("n")) and params["n"] != 1:
        attrs["gen_ai.request.choice.count"] = params["n"]
    if record["streamed"]:
        attrs["gen_ai.request.stream"] = True
    usage = record["usage"] or {}
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    total = usage.get("total_tokens")
    if prompt is not None:
        attrs["gen_ai.usage.input_tokens"] = prompt
    if completion is not None:
        attrs["gen_ai.usage.output_tokens"] = completion
    details = _usage_details(output)
    if "cache_read" in details:
        attrs["gen_ai.usage.cache_read.input_tokens"] = details["cache_read"]
    if "reasoning" in details:
        attrs["gen_ai.usage.reasoning.output_tokens"] = details["reasoning"]
    if parsed.finish_reasons:
        attrs["gen_ai.response.finish_reasons"] = parsed.finish_reasons
    if parsed.system:
        attrs["gen_ai.system_instructions"] = _json(parsed.system)
    if parsed.inputs:
        attrs["gen_ai.input.messages"] = _json(parsed.inputs)
    if parsed.outputs:
        attrs["gen_ai.output.messages"] = _json(parsed.outputs)
    if parsed.session:
        attrs["gen_ai.conversation.id"] = parsed.session
        attrs["session.id"] = parsed.session
    if parsed.user:
        attrs["user.id"] = parsed.user
    if parsed.error is not None:
        attrs["error.type"] = str(record["status"])
    # HTTP facts of the proxied call
    attrs["http.request.method"] = record["method"]
    attrs["http.response.status_code"] = record["status"]
    attrs["url.path"] = record["path"]

    # OpenInference
    attrs["openinference.span.kind"] = parsed.kind
    oi_model = record["model"] or model
    if oi_model:
        attrs["llm.model_name"] = oi_model
        if parsed.kind == "EMBEDDING":
            attrs["embedding.model_name"] = oi_model
    attrs["llm.provider"] = record["provider"]
    attrs["llm.system"] = record["provider"]
    if params:
        attrs["llm.invocation_parameters"] = _json(params)
    if prompt is not None:
        attrs["llm.token_count.prompt"] = prompt
    if completion is not None:
        attrs["llm.token_count.completion"] = completion
    if total is not None or (prompt is not None and completion is not None):
        attrs["llm.token_count.total"] = total if total is not None else prompt + completion  # type: ignore[operator]
    if "cache_read" in details:
        attrs["llm.token_count.prompt_details.cache_read"] = details["cache_read"]
    if "reasoning" in details:
        attrs["llm.token_count.completion_details.reasoning"] = details["reasoning"]
    system_messages = [{"role": "system", "parts": parsed.system}] if parsed.system else []
    attrs.update(_flat_messages("llm.input_messages", [*system_messages, *parsed.inputs]))
    attrs.update(_flat_messages("llm.output_messages", parsed.outputs))
    if record["input"] is not None:
        attrs["input.value"], attrs["input.mime_type"] = _value_and_mime(record["input"])
    # The whole response (vectors of embeddings summarized); a failure's error body.
    shown = parsed.openai_output if parsed.kind == "EMBEDDING" else output
    if shown is None and parsed.error is not None:
        shown = record["error"]
    if shown is not None:
        attrs["output.value"], attrs["output.mime_type"] = _value_and_mime(shown)
    attrs["metadata"] = _json(parsed.metadata)
    return attrs


def _usage_details(output: Any) -> dict[str, int]:
    """Cached prompt tokens and reasoning tokens, when the upstream's usage has them."""
    usage = output.get("usage") if isinstance(output, dict) else None
    if not isinstance(usage, dict):
        return {}
    found: dict[str, int] = {}
    for details_key, key, name in (
        ("prompt_tokens_details", "cached_tokens", "cache_read"),
        ("input_tokens_details", "cached_tokens", "cache_read"),
        ("completion_tokens_details", "reasoning_tokens", "reasoning"),
        ("output_tokens_details", "reasoning_tokens", "reasoning"),
    ):
        details = usage.get(details_key)
        value = details.get(key) if isinstance(details, dict) else None
        if type(value) is int and name not in found:
            found[name] = value
    return found


def span_name(record: RunRecord, parsed: Parsed) -> str:
    model = parsed.request_model or record["model"]
    return f"{parsed.operation} {model}" if model else parsed.operation


def build_span(record: RunRecord) -> tuple[SpanData, Parsed]:
    """The run's span (GenAI + OpenInference attributes) and the parsed run it came from."""
    parsed = parse(record)
    span = SpanData(
        run_id=record["id"],
        name=span_name(record, parsed),
        trace_id=trace_id_for(record["id"]),
        span_id=span_id_for(record["id"]),
        start_ns=unix_ns(record["started_at"]),
        end_ns=unix_ns(record["ended_at"]),
        error=parsed.error,
        attributes=genai_attributes(record, parsed),
    )
    return span, parsed
