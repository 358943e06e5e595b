"""Local fake Helicone and Lunary servers that enforce the documented contracts.

They follow /work/shared/spec/backends.md (Lunary: as its open-source ingest handler
behaves). Each listens on 127.0.0.1 on a free port, speaks HTTP/1.1 keep-alive, records what
it received and stored, counts connections and requests in flight, and can inject faults:
scripted answers for the next requests (a status with headers and body, a connection reset,
a delay), per-run failures, and slow responses. A request that breaks the contract is
answered the way the vendor would (400/401/500 ...) and is also listed in ``violations``, so
tests can assert that the client never broke it.

Also here: helpers that build runs for tests (by hand, and from the spec's stream vectors).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import struct
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar, Self, TypeVar

from dispatch_celery.backend import DeliveryContext, Run
from dispatch_celery.backends.http import HttpBackend
from dispatch_celery.decode.events import decode_entry
from dispatch_celery.decode.records import build_record
from dispatch_celery.settings import load_settings

LUNARY_MAX_BODY = 20 * 1024 * 1024
B = TypeVar("B", bound=HttpBackend)


@dataclass
class Fault:
    """One scripted answer: ``status`` (with headers/body), ``reset`` the connection, or
    ``delay`` seconds before answering normally (``status`` 0)."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    reset: bool = False
    delay: float = 0.0


@dataclass
class Received:
    headers: dict[str, str]  # lower-case names
    body: bytes
    json: Any = None


class FakeVendor:
    """Base: threaded HTTP/1.1 server, bookkeeping, scripted faults."""

    path = "/"
    handler_class: ClassVar[type[_Handler] | None] = None  # None: ``_Handler``

    def __init__(self, api_key: str, *, delay: float = 0.0) -> None:
        self.api_key = api_key
        self.delay = delay  # every answer waits this long (slow vendor / benchmark)
        self.lock = threading.Lock()
        self.script: deque[Fault] = deque()
        self.received: list[Received] = []
        self.violations: list[str] = []
        self.connections = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._listen(self.handler_class or _Handler)

    def _listen(self, handler: type[_Handler], port: int = 0) -> _Server:
        """Serve with a subclass of ``handler`` bound to this vendor, in a thread."""
        server = _Server(("127.0.0.1", port), type("Handler", (handler,), {"vendor": self}))
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}{self.path}"

    # -- faults ----------------------------------------------------------------------------
    def fail_next(self, *faults: Fault) -> None:
        with self.lock:
            self.script.extend(faults)

    def next_fault(self) -> Fault | None:
        with self.lock:
            return self.script.popleft() if self.script else None

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)

    def check_auth(self, headers: Mapping[str, str]) -> bool:
        return headers.get("authorization") == f"Bearer {self.api_key}"

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        raise NotImplementedError


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # a batch opens dozens of connections at once


class _Handler(BaseHTTPRequestHandler):
    vendor: FakeVendor
    protocol_version = "HTTP/1.1"  # keep-alive
    # Headers and body are two writes: with Nagle on, the body waits for the client's
    # delayed ACK (~40 ms) and every request looks slow.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        with self.vendor.lock:
            self.vendor.connections += 1

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        vendor = self.vendor
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        with vendor.lock:
            vendor.received.append(Received(headers, body, parsed))
            vendor.in_flight += 1
            vendor.max_in_flight = max(vendor.max_in_flight, vendor.in_flight)
        try:
            fault = vendor.next_fault()
            delay = vendor.delay + (fault.delay if fault else 0.0)
            if delay:
                time.sleep(delay)
            if fault is not None and fault.reset:
                # RST instead of an answer: the client sees a connection reset.
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.close_connection = True
                self.connection.close()
                return
            if fault is not None and fault.status:
                status, extra, payload = fault.status, fault.headers, fault.body
            else:
                status, extra, payload = vendor.handle(headers, body)
        finally:
            with vendor.lock:
                vendor.in_flight -= 1
        self._answer(status, extra, payload)

    def do_GET(self) -> None:
        self._answer(404, {}, b"")

    def _answer(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)
        except OSError:
            self.close_connection = True


def _json(data: Any) -> bytes:
    return json.dumps(data).encode()


# --- Helicone ------------------------------------------------------------------------------


def _instant_ok(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("seconds"), int)
        and isinstance(value.get("milliseconds"), int)
        and 0 <= value["milliseconds"] < 1000
    )


def helicone_problems(log: Any) -> list[str]:
    """What is wrong with a Helicone log body (empty when it follows the contract)."""
    if not isinstance(log, dict):
        return ["body is not an object"]
    problems = []
    req, resp, timing = log.get("providerRequest"), log.get("providerResponse"), log.get("timing")
    if not isinstance(req, dict):
        problems.append("providerRequest missing")
    else:
        if not isinstance(req.get("url"), str) or not req["url"]:
            problems.append("providerRequest.url must be a string")
        if not isinstance(req.get("json"), dict):
            problems.append("providerRequest.json must be an object")
        meta = req.get("meta")
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            problems.append("providerRequest.meta values must be strings")
        elif "Helicone-Request-Id" in meta:
            try:
                uuid.UUID(meta["Helicone-Request-Id"])
            except ValueError:
                problems.append("Helicone-Request-Id must be a UUID")
    if not isinstance(resp, dict):
        problems.append("providerResponse missing")
    else:
        if not isinstance(resp.get("status"), int):
            problems.append("providerResponse.status must be an integer")
        headers = resp.get("headers")
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            problems.append("providerResponse.headers must map strings to strings")
        has_json, has_text = "json" in resp, "textBody" in resp
        if not (has_json or has_text):
            problems.append("providerResponse needs json or textBody")
        if has_json and not isinstance(resp["json"], dict):
            problems.append("providerResponse.json must be an object")
        if has_text and not isinstance(resp["textBody"], str):
            problems.append("providerResponse.textBody must be a string")
    if not isinstance(timing, dict):
        problems.append("timing missing")
    elif not (_instant_ok(timing.get("startTime")) and _instant_ok(timing.get("endTime"))):
        problems.append("timing.startTime/endTime must be {seconds, milliseconds} integers")
    return problems


class FakeHelicone(FakeVendor):
    """``POST /custom/v1/log``: one log per request, validated, stored by request id."""

    path = "/custom/v1/log"

    def __init__(self, api_key: str = "sk-helicone-test-key", *, delay: float = 0.0) -> None:
        super().__init__(api_key, delay=delay)
        self.logs: dict[str, Any] = {}  # Helicone-Request-Id -> last accepted log
        self.posts: dict[str, int] = {}  # Helicone-Request-Id -> requests received
        self.fail_runs: dict[str, deque[Fault]] = {}  # request id -> faults, one per request

    def fail_run(self, request_id: str, *faults: Fault) -> None:
        with self.lock:
            self.fail_runs.setdefault(request_id, deque()).extend(faults)

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        try:
            log = json.loads(body)
        except ValueError:
            self.violation("body is not JSON")
            return 400, {}, _json({"error": "invalid JSON"})
        if not self.check_auth(headers):
            self.violation("bad Authorization")
            return 401, {}, _json({"error": "Unauthorized"})
        if not headers.get("content-type", "").startswith("application/json"):
            self.violation("Content-Type is not application/json")
            return 400, {}, _json({"error": "expected application/json"})
        problems = helicone_problems(log)
        if problems:
            for problem in problems:
                self.violation(problem)
            return 400, {}, _json({"error": "; ".join(problems)})
        request_id = log["providerRequest"]["meta"].get("Helicone-Request-Id", "")
        with self.lock:
            self.posts[request_id] = self.posts.get(request_id, 0) + 1
            pending = self.fail_runs.get(request_id)
            fault = pending.popleft() if pending else None
        if fault is not None:
            return fault.status, fault.headers, fault.body
        with self.lock:
            self.logs[request_id] = log
        return 200, {}, _json({"ok": True})


# --- Lunary --------------------------------------------------------------------------------

LUNARY_TYPES = {"llm", "chain", "agent", "tool", "embed", "retriever", "chat", "convo", "thread"}
DUPLICATE = "Run with this ID already exists in the database."


def _ms(timestamp: Any) -> float:
    return datetime.fromisoformat(str(timestamp)).timestamp() * 1000


class FakeLunary(FakeVendor):
    """``POST /v1/runs/ingest`` with Lunary's answers: per-event results, always 200."""

    path = "/v1/runs/ingest"

    def __init__(
        self, api_key: str = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0", *, delay: float = 0.0
    ) -> None:
        super().__init__(api_key, delay=delay)
        self.runs: dict[str, dict[str, Any]] = {}  # runId -> stored run
        self.dropped: list[dict[str, Any]] = []  # end/error events acknowledged but lost
        self.event_faults: dict[tuple[str, str], deque[str]] = {}  # (runId, event) -> errors
        self.refuse_runs: set[str] = set()  # a request holding one of these runIds -> 400

    def fail_event(self, run_id: str, event: str, *errors: str) -> None:
        """The next ``len(errors)`` ``event`` events of ``run_id`` fail with these texts."""
        with self.lock:
            self.event_faults.setdefault((run_id, event), deque()).extend(errors)

    def handle(self, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        auth = headers.get("authorization", "")
        key = auth.removeprefix("Bearer ")
        try:
            uuid.UUID(key)
        except ValueError:
            self.violation("key is not a UUID")
            return 402, {}, _json({"message": "Incorrect project id format"})
        if key != self.api_key:
            self.violation("unknown project key")
            return 401, {}, _json({"message": "This project does not exist"})
        if len(body) > LUNARY_MAX_BODY:
            self.violation("body over 20 MB")
            return 413, {}, _json({"error": "request entity too large"})
        missing: tuple[int, dict[str, str], bytes] = (
            500,
            {},
            _json({"error": "Missing events payload."}),
        )
        if headers.get("content-type", "").split(";")[0].strip() != "application/json":
            self.violation("Content-Type is not application/json")
            return missing
        try:
            payload = json.loads(body)
        except ValueError:
            self.violation("body is not JSON")
            return 400, {}, _json({"error": "invalid JSON"})
        events = payload.get("events") if isinstance(payload, dict) else None
        if not events:
            self.violation("no {'events': [...]} object")
            return missing
        events = events if isinstance(events, list) else [events]
        if any(isinstance(e, dict) and e.get("runId") in self.refuse_runs for e in events):
            return 400, {}, _json({"error": "refused by the fake"})
        with self.lock:
            ordered = sorted(events, key=lambda e: _ms(e.get("timestamp")))  # stable, like V8
            results = [self._ingest(event) for event in ordered]
        return 200, {}, _json({"results": results})

    def _ingest(self, event: Any) -> dict[str, Any]:
        run_id = event.get("runId") if isinstance(event, dict) else None
        try:
            error = self._store(event)
        except (KeyError, TypeError, ValueError) as exc:
            error = f"invalid event: {exc}"
        if error is None:
            return {"id": run_id, "success": True}
        return {"id": run_id, "success": False, "error": error}

    def _store(self, event: dict[str, Any]) -> str | None:
        run_id, name = event["runId"], event["event"]
        if not isinstance(run_id, str) or len(run_id) != 36:
            self.violation(f"runId {run_id!r} is not a 36-character UUID")
        faults = self.event_faults.get((run_id, name))
        if faults:
            return faults.popleft()
        if event.get("type") == "log":
            self.violation("type log")
            return 'relation "log" does not exist'
        if event.get("type") not in LUNARY_TYPES:
            self.violation(f"type {event.get('type')!r}")
        _ms(event["timestamp"])
        metadata = event.get("metadata") or {}
        for key, value in metadata.items():
            if not isinstance(value, str | int | float | bool):
                self.violation(f"metadata {key} is not a scalar (Lunary drops it)")
        if name == "start":
            if run_id in self.runs:
                return DUPLICATE
            self.runs[run_id] = {
                "type": event["type"], "name": event.get("name"), "input": event.get("input"),
                "params": event.get("params"), "metadata": metadata, "userId": event.get("userId"),
                "created_at": event["timestamp"], "status": "started",
            }  # fmt: skip
        elif name in {"end", "error"}:
            run = self.runs.get(run_id)
            if run is None:  # Lunary answers success and drops it (an UPDATE of no row)
                self.dropped.append(event)
                return None
            run.update(ended_at=event["timestamp"])
            if name == "end":
                usage = event.get("tokensUsage") or {}
                run.update(status="success", output=event.get("output"), tokens=usage)
            else:
                error = event["error"]
                if not isinstance(error, dict) or not isinstance(error.get("message"), str):
                    self.violation("error.message must be a string")
                run.update(status="error", error=error)
        else:
            self.violation(f"event {name!r}")
        return None


# --- hung connections ----------------------------------------------------------------------


class RawHttpServer:
    """A raw-socket HTTP/1.1 server in a thread, for answers no HTTP library would give
    (held, dripped): accepts connections (counted in ``connections``, kept in ``_conns``),
    serves each in its own thread with the subclass's ``_serve``; ``_read_request`` reads one
    request (headers and a ``Content-Length`` body) through ``_recv``."""

    path = "/"
    thread_name = "raw-http"

    def __init__(self, *, backlog: int, accept_timeout: float) -> None:
        self.lock = threading.Lock()
        self.connections = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self._listener.settimeout(accept_timeout)
        self.port = int(self._listener.getsockname()[1])
        self._thread = threading.Thread(target=self._accept, daemon=True, name=self.thread_name)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def _recv(self, conn: socket.socket) -> bytes:
        return conn.recv(65536)

    def _read_request(self, conn: socket.socket, buf: bytes) -> tuple[bytes, bytes] | None:
        """(body, what was read beyond it), or None when the client closed first."""
        while b"\r\n\r\n" not in buf:
            chunk = self._recv(conn)
            if not chunk:
                return None
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        while len(rest) < length:
            chunk = self._recv(conn)
            if not chunk:
                return None
            rest += chunk
        return rest[:length], rest[length:]


class HangingVendor(RawHttpServer):
    """A raw-socket HTTP/1.1 server whose answers can hang, for deadline tests.

    Each request is read in full; a request whose body contains one of ``hang_on`` (or any
    request while ``hang_all``) is held: ``mode`` "silent" never answers, "drip" sends a
    valid 200 answer one byte every ``drip_interval`` seconds (a per-read timeout never
    fires on it). Other requests get ``200 {"ok": true}`` at once, keep-alive. Counts what
    it received, held and answered.
    """

    path = "/ingest"
    thread_name = "hanging-vendor"

    def __init__(
        self, mode: str = "silent", *, hang_on: tuple[bytes, ...] = (), drip_interval: float = 0.1
    ) -> None:
        super().__init__(backlog=64, accept_timeout=0.05)
        self.mode = mode
        self.hang_on = hang_on
        self.hang_all = not hang_on
        self.drip_interval = drip_interval
        self.bodies: list[bytes] = []
        self.held = 0
        self.answered = 0

    def __exit__(self, *exc: object) -> None:
        super().__exit__(*exc)
        with self.lock:
            for conn in self._conns:
                with contextlib.suppress(OSError):
                    conn.close()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while not self._stop.is_set():
                request = self._read_request(conn, buf)
                if request is None:
                    return
                body, buf = request
                with self.lock:
                    self.bodies.append(body)
                    hang = self.hang_all or any(marker in body for marker in self.hang_on)
                    if hang:
                        self.held += 1
                answer = b'{"ok": true}'
                response = (
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: " + str(len(answer)).encode() + b"\r\n\r\n" + answer
                )
                if not hang:
                    conn.sendall(response)
                    with self.lock:
                        self.answered += 1
                    continue
                if self.mode == "silent":
                    self._stop.wait()
                    return
                for byte in response:  # drip
                    if self._stop.wait(self.drip_interval):
                        return
                    conn.sendall(bytes([byte]))


# --- test data -----------------------------------------------------------------------------


@contextlib.contextmanager
def backend_factory(
    cls: type[B], service: str, server: FakeVendor, *, api_key: bool = True
) -> Iterator[Callable[..., B]]:
    """``make(**options)``: a ``cls`` backend of ``service`` sending to ``server`` (its
    ``api_key`` too, unless ``api_key`` is False; a 2 s read timeout) with the options given
    (``read_timeout="5"`` is ``DISPATCH_<SERVICE>_READ_TIMEOUT=5``); every backend made is
    closed when the block ends."""
    prefix = f"DISPATCH_{service.upper()}_"
    env = {f"{prefix}ENDPOINT": server.url, f"{prefix}READ_TIMEOUT": "2"}
    if api_key:
        env[f"{prefix}API_KEY"] = server.api_key
    made: list[B] = []

    def make(**options: Any) -> B:
        settings_env = dict(env)
        settings_env.update({f"{prefix}{k.upper()}": str(v) for k, v in options.items()})
        backend = cls.from_settings(service, load_settings(settings_env))
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in made:
            backend.close()


def vectors_path(start: Path) -> Path | None:
    """shared/spec/stream-vectors.json: from DISPATCH_SPEC_DIR, else walking up from start."""
    env = os.environ.get("DISPATCH_SPEC_DIR")
    if env:
        candidate = Path(env) / "stream-vectors.json"
        return candidate if candidate.is_file() else None
    for parent in [start, *start.parents]:
        candidate = parent / "shared" / "spec" / "stream-vectors.json"
        if candidate.is_file():
            return candidate
    return None


def load_vectors(path: Path) -> dict[str, dict[str, Any]]:
    data = json.loads(path.read_text())
    return {vector["name"]: vector for vector in data["vectors"]}


def iter_ids(count: int, seed: str = "run") -> Iterator[str]:
    for i in range(count):
        yield str(uuid.uuid5(uuid.NAMESPACE_URL, f"{seed}/{i}"))


STREAM = "llm-proxy-events"
BASE_MS = 1736937000123  # entry ids are <ms>-<seq>: ended_at of the runs


def entry_data(
    request_id: str,
    *,
    path: str = "/v1/chat/completions",
    status: int = 200,
    request: Any = None,
    response: Any = None,
    content_type: str = "application/json",
    duration_ns: int = 1_234_567_890,
) -> bytes:
    """A stream entry's ``data`` exactly as llm-proxy writes it (Go field names, base64)."""

    def b64(value: Any) -> str | None:
        if value is None:
            return None
        raw = value if isinstance(value, bytes) else json.dumps(value).encode()
        return base64.b64encode(raw).decode()

    return json.dumps(
        {
            "LogID": 0,
            "RequestID": request_id,
            "Method": "POST",
            "Path": path,
            "Status": status,
            "Duration": duration_ns,
            "ResponseHeaders": {"Content-Type": [content_type], "X-Proxy": ["llm-proxy"]},
            "ResponseBody": b64(response),
            "RequestBody": b64(request),
        }
    ).encode()


def run_from_data(data: bytes, entry_id: str, max_body_bytes: int = 1024 * 1024) -> Run:
    """The run the core would hand a backend: decode_entry + build_record."""
    event = decode_entry(STREAM, entry_id, data)
    return Run(build_record(event, max_body_bytes=max_body_bytes), event)


def chat_run(request_id: str, index: int = 0, *, pad: int = 0, **request: Any) -> Run:
    """A chat completion run; ``pad`` characters of prompt make it bigger."""
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello" + "x" * pad}]}
    body.update(request)
    response = {
        "id": f"chatcmpl-{index}",
        "object": "chat.completion",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi there!"},
             "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12},
    }  # fmt: skip
    data = entry_data(request_id, request=body, response=response)
    return run_from_data(data, f"{BASE_MS + index}-0")


def chat_runs(count: int, seed: str = "run", *, pad: int = 0) -> list[Run]:
    return [chat_run(rid, i, pad=pad) for i, rid in enumerate(iter_ids(count, seed))]


def vector_run(vector: Mapping[str, Any], index: int = 0) -> Run:
    data = vector["xadd_fields"]["data"].encode()
    return run_from_data(data, f"{BASE_MS + index}-0")


class RecordingContext:
    """A DeliveryContext whose rate-limit hooks record their calls."""

    def __init__(self, service: str, *, probe: bool = False) -> None:
        self.acquired = 0
        self.slowed: list[float] = []
        self._lock = threading.Lock()
        self.ctx = DeliveryContext(
            service=service, batch_id="batch-1", attempt=1,
            acquire=self.acquire, slow_down=self.slow_down, probe=probe,
        )  # fmt: skip

    def acquire(self, cost: int = 1) -> None:
        with self._lock:
            self.acquired += cost

    def slow_down(self, seconds: float) -> None:
        with self._lock:
            self.slowed.append(seconds)
