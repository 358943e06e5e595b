"""Realistic llm-proxy events for tests and benchmarks.

``sample_events(n, seed=...)`` yields the ``data`` field of stream entries exactly as
llm-proxy writes them: Go's ``encoding/json`` of its event struct (fields in the order
LogID, RequestID, Method, Path, Status, Duration, ResponseHeaders, ResponseBody,
RequestBody; header names sorted, as Go sorts map keys; ``<``, ``>``, ``&`` escaped as
``\\u003c`` ...; bodies standard base64). About 1.8 KB per event on average:

* ~68% ``POST /v1/chat/completions`` JSON 200 (OpenAI's pretty-printed bodies, usage);
* ~10% SSE streams with ``stream_options.include_usage`` (usage in the last chunk);
* ~8% gzip-compressed JSON 200 responses;
* ~5% ``POST /v1/embeddings``;
* ~4% errors: the proxy's 401, upstream 429 and 500;
* ~3% ``GET /v1/models`` and ~2% ``OPTIONS`` preflights with an empty RequestID.

The output is deterministic for a seed. Generation is a template fill: a pool of
variants is serialized once, and each event only gets a fresh RequestID spliced in
(~600k events/s). ``event_json(...)`` writes one event with chosen fields, for tests.
"""

from __future__ import annotations

import base64
import gzip
import random
from collections.abc import Iterator
from typing import Any

import orjson

_PLACEHOLDER = b"@@REQUEST-ID@@"
_CHAT = "/v1/chat/completions"
_PER_PERCENT = 3  # pool variants per percent of the mix

_SYSTEM = (
    "You are a helpful assistant.",
    "You are a concise support agent for Acme Cloud. Answer in at most three sentences and "
    "never reveal internal ticket numbers.",
    "You are a senior Python reviewer. Point out bugs first, style second. Use <code> tags "
    "for identifiers & keep it short.",
)
_EXCHANGES = (
    ("What is the capital of Australia?",
     "The capital of Australia is Canberra. It was purpose-built as a compromise between "
     "Sydney and Melbourne and became the seat of government in 1927."),
    ("Summarize the plot of Hamlet in two sentences.",
     "Prince Hamlet seeks revenge on his uncle Claudius, who murdered Hamlet's father to "
     "seize the throne and marry his mother. His hesitation and feigned madness lead to a "
     "chain of deaths that ends with the destruction of the Danish royal family."),
    ("Write a haiku about autumn rain.",
     "Cold rain on red leaves\nthe gutter hums an old song\nsummer washes out"),
    ("Why does my Python list comprehension `[x for x in range(10) if x > 5 & x < 8]` "
     "return nothing?",
     "Because `&` binds tighter than the comparisons, the condition is evaluated as "
     "`x > (5 & x) < 8`, which is not what you meant. Use the boolean operator instead: "
     "`[x for x in range(10) if 5 < x < 8]` returns `[6, 7]`."),
    ("Translate 'Where is the train station?' into French, German and Spanish.",
     "French: Où est la gare ?\nGerman: Wo ist der Bahnhof?\nSpanish: ¿Dónde está la "
     "estación de tren?"),
    ("My order #4411 arrived damaged. What should I do?",
     "I'm sorry your order arrived damaged. Please reply with a photo of the item and the "
     "packaging, and we will ship a replacement or refund you within two business days."),
    ("Explain the difference between a process and a thread to a new developer.",
     "A process is an independent program with its own memory space; a thread is a unit of "
     "execution inside a process that shares that memory with the other threads. Threads "
     "are cheaper to create and communicate through shared data, which is also why they "
     "need locks; processes are isolated, so a crash in one does not corrupt another."),
    ("Give me three name ideas for a coffee shop next to a bookstore.",
     "1. Chapter & Bean\n2. The Reading Roast\n3. Footnotes Coffee"),
    ("Is 1009 a prime number?",
     "Yes. 1009 is not divisible by any prime up to its square root (about 31.8): 2, 3, 5, "
     "7, 11, 13, 17, 19, 23, 29 and 31 all leave a remainder, so 1009 is prime."),
    ("Review: def avg(xs): return sum(xs) / len(xs)",
     "<code>avg</code> raises ZeroDivisionError for an empty list; decide whether to return "
     "None, raise a clearer ValueError, or accept a default. Otherwise it is fine; consider "
     "statistics.fmean for floats."),
)  # fmt: skip
_MODELS = (
    ("gpt-4o-mini", "gpt-4o-mini-2024-07-18"),
    ("gpt-4o", "gpt-4o-2024-08-06"),
    ("gpt-4.1-mini", "gpt-4.1-mini-2025-04-14"),
)
# (kind, weight) of the mix; weights are percentages.
_MIX = (("chat", 68), ("sse", 10), ("gzip", 8), ("embeddings", 5), ("e401", 2),
        ("e429", 1), ("e500", 1), ("models", 3), ("options", 2))  # fmt: skip


def sample_events(n: int, *, seed: int = 0) -> Iterator[bytes]:
    """``n`` event JSON documents as llm-proxy writes them; deterministic for ``seed``."""
    rng = random.Random(seed)
    # The pool holds each kind in its exact share, so any stretch of events has the mix.
    pool = [_variant(rng, kind) for kind, weight in _MIX for _ in range(weight * _PER_PERCENT)]
    size = len(pool)
    for _ in range(n):
        parts = pool[rng.randrange(size)]
        if len(parts) == 1:
            yield parts[0]
        else:
            yield _uuid4(rng.getrandbits(128)).join(parts)


def _uuid4(bits: int) -> bytes:
    bits = (bits & ~(0xF000 << 64) | (0x4000 << 64)) & ~(0xC000 << 48) | (0x8000 << 48)
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}".encode("ascii")


def _variant(rng: random.Random, kind: str) -> list[bytes]:
    model, snapshot = rng.choice(_MODELS)
    question, answer = rng.choice(_EXCHANGES)
    request: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": rng.choice(_SYSTEM)},
            {"role": "user", "content": question},
        ],
        "temperature": rng.choice((0, 0.2, 0.7, 1)),
    }
    created = 1736930000 + rng.randrange(100000)
    completion_id = f"chatcmpl-{rng.getrandbits(96):024x}"
    usage = {"prompt_tokens": 20 + len(question) // 4, "completion_tokens": len(answer) // 4}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    headers: dict[str, list[str]] = {
        "Content-Type": ["application/json"], "X-Proxy": ["llm-proxy"],
        "X-Request-Id": [_PLACEHOLDER.decode()],
    }  # fmt: skip
    duration = rng.randrange(300, 4000) * 1_000_000 + rng.randrange(1_000_000)
    if kind in ("chat", "gzip"):
        body = _completion(completion_id, created, snapshot, answer, usage)
        if kind == "gzip":
            body = gzip.compress(body, mtime=0)
            headers["Content-Encoding"] = ["gzip"]
        return _event(("POST", _CHAT, 200, duration), headers, body, request)
    if kind == "sse":
        request["stream"] = True
        request["stream_options"] = {"include_usage": True}
        headers["Content-Type"] = ["text/event-stream; charset=utf-8"]
        body = _stream(completion_id, created, snapshot, answer[:100], usage)
        return _event(("POST", _CHAT, 200, duration), headers, body, request)
    if kind == "embeddings":
        text = rng.choice(_EXCHANGES)[1]
        emb_request = {"model": "text-embedding-3-small", "input": text, "dimensions": 16}
        vector = [round(rng.uniform(-0.1, 0.1), 9) for _ in range(16)]
        emb_body = {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": vector}],
            "model": "text-embedding-3-small",
            "usage": {"prompt_tokens": len(text) // 4, "total_tokens": len(text) // 4},
        }
        body = orjson.dumps(emb_body, option=orjson.OPT_INDENT_2)
        return _event(("POST", "/v1/embeddings", 200, duration // 4), headers, body, emb_request)
    if kind == "e401":
        body = b'{"error":"Token not found","code":"token_not_found"}\n'
        plain = {"Content-Type": ["application/json"]}
        return _event(("POST", _CHAT, 401, 2_500_000), plain, body, request)
    if kind in ("e429", "e500"):
        status, error = (429, {
            "message": f"Rate limit reached for {model} on requests per min (RPM): Limit 500, "
                       "Used 500, Requested 1. Please try again in 120ms.",
            "type": "requests", "param": None, "code": "rate_limit_exceeded",
        }) if kind == "e429" else (500, {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error", "param": None, "code": None,
        })  # fmt: skip
        body = orjson.dumps({"error": error}, option=orjson.OPT_INDENT_2)
        return _event(("POST", _CHAT, status, duration // 10), headers, body, request)
    if kind == "models":
        listing = {"object": "list", "data": [
            {"id": name, "object": "model", "created": 1721172741, "owned_by": "system"}
            for pair in _MODELS for name in pair
        ]}  # fmt: skip
        body = orjson.dumps(listing, option=orjson.OPT_INDENT_2)
        return _event(("GET", "/v1/models", 200, duration // 8), headers, body, None)
    cors = {"Access-Control-Allow-Headers": ["Authorization, Content-Type"],
            "Access-Control-Allow-Methods": ["GET, POST, OPTIONS"],
            "Access-Control-Allow-Origin": ["*"]}  # fmt: skip
    line = ("OPTIONS", _CHAT, 204, rng.randrange(20_000, 90_000))
    return [_go_event(line, "", cors if rng.random() < 0.5 else {}, None, None)]


def _completion(cid: str, created: int, model: str, answer: str, usage: dict[str, int]) -> bytes:
    body = {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": answer, "refusal": None},
            "logprobs": None, "finish_reason": "stop",
        }],
        "usage": {**usage,
                  "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                  "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0}},
        "service_tier": "default", "system_fingerprint": "fp_0ba0d124f1",
    }  # fmt: skip
    return orjson.dumps(body, option=orjson.OPT_INDENT_2)


def _stream(cid: str, created: int, model: str, answer: str, usage: dict[str, int]) -> bytes:
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_0ba0d124f1"}  # fmt: skip
    words = answer.split(" ")
    pieces = [" ".join(words[i : i + 4]) + " " for i in range(0, len(words), 4)]
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": piece} for piece in pieces]
    lines = [
        {**head, "choices": [{"index": 0, "delta": d, "logprobs": None, "finish_reason": None}],
         "usage": None}
        for d in deltas
    ]  # fmt: skip
    lines.append({**head, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                       "finish_reason": "stop"}], "usage": None})  # fmt: skip
    lines.append({**head, "choices": [], "usage": usage})
    return b"".join(b"data: " + orjson.dumps(x) + b"\n\n" for x in lines) + b"data: [DONE]\n\n"


_Line = tuple[str, str, int, int]  # method, path, status, duration (ns)


def _event(
    line: _Line, headers: dict[str, list[str]], response: bytes, request: Any
) -> list[bytes]:
    body = orjson.dumps(request) if request is not None else None
    return _go_event(line, _PLACEHOLDER.decode(), headers, response, body).split(_PLACEHOLDER)


def event_json(
    *,
    request_id: str = "",
    method: str = "POST",
    path: str = _CHAT,
    status: int = 200,
    duration_ns: int = 0,
    headers: dict[str, list[str]] | None = None,
    response_body: bytes | None = None,
    request_body: bytes | None = None,
) -> bytes:
    """One event's JSON exactly as llm-proxy (Go's encoding/json) writes it."""
    line = (method, path, status, duration_ns)
    return _go_event(line, request_id, headers or {}, response_body, request_body)


def _go_event(
    line: _Line,
    request_id: str,
    headers: dict[str, list[str]],
    response: bytes | None,
    request: bytes | None,
) -> bytes:
    method, path, status, duration = line
    header_json = ",".join(
        f"{_go_string(name)}:[{','.join(_go_string(v) for v in headers[name])}]"
        for name in sorted(headers)
    )
    return (
        f'{{"LogID":0,"RequestID":{_go_string(request_id)},"Method":{_go_string(method)},'
        f'"Path":{_go_string(path)},"Status":{status},"Duration":{duration},'
        f'"ResponseHeaders":{{{header_json}}},"ResponseBody":{_go_bytes(response)},'
        f'"RequestBody":{_go_bytes(request)}}}'
    ).encode()


def _go_string(value: str) -> str:
    encoded = orjson.dumps(value).decode("utf-8")
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):  # fmt: skip
        encoded = encoded.replace(char, escape)
    return encoded


def _go_bytes(value: bytes | None) -> str:
    return "null" if value is None else f'"{base64.b64encode(value).decode("ascii")}"'
