"""The HTTP toolkit's send loop (``dispatch_celery.backends.http``) against real local servers:
auth variants, encoding, per-run outcomes, probe mode, credentials refused part-way,
redirects, and hung connections (a raw-socket server that never answers or drips)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import orjson
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request as WRequest
from werkzeug import Response

from dispatch_celery.backend import Run
from dispatch_celery.backends.helicone import HeliconeBackend
from dispatch_celery.backends.http import (
    DELIVERED,
    Auth,
    HttpBackend,
    HttpOptions,
    Outcome,
    Rejected,
    Reply,
    Request,
)
from dispatch_celery.backends.lunary import LunaryBackend
from dispatch_celery.errors import ConfigError, CredentialsError, TransientDeliveryError
from dispatch_celery.settings import load_settings
from tests.harness import wait_for
from tests.vendor_servers import HangingVendor, RecordingContext, chat_runs

SECRET = "s3cret-passw0rd-value"  # noqa: S105 (a test secret)


class Collector(HttpBackend):
    """A batch endpoint: NDJSON in, ``{"failed": {run_id: reason}}`` out."""

    name: ClassVar[str] = "collector"
    content_type: ClassVar[str] = "application/x-ndjson"

    def encode(self, runs: Sequence[Run]) -> Iterable[Request | Rejected]:
        good = [run for run in runs if run.record["path"] != "/unencodable"]
        for run in runs:
            if run not in good:
                yield Rejected(run.id, "collector: cannot encode")
        if good:
            body = b"".join(orjson.dumps({"id": run.id}) + b"\n" for run in good)
            yield Request(tuple(run.id for run in good), body, self.content_type)

    def read(self, request: Request, reply: Reply) -> Mapping[str, Outcome]:
        failed = orjson.loads(reply.body or b"{}").get("failed", {})
        return {
            run_id: Outcome.transient(failed[run_id]) if run_id in failed else DELIVERED
            for run_id in request.runs
        }


class PerRun(HttpBackend):
    """One request per run, default encoding (the record as JSON)."""

    name: ClassVar[str] = "perrun"
    stop_on_transient: ClassVar[bool] = False


def _make(cls: type[HttpBackend], service: str, **env: str) -> Any:
    prefix = f"DISPATCH_{service.upper()}_"
    return cls.from_settings(service, load_settings({prefix + k: v for k, v in env.items()}))


@pytest.fixture
def made() -> Iterator[list[HttpBackend]]:
    backends: list[HttpBackend] = []
    yield backends
    for backend in backends:
        backend.close()


def _ids(request: WRequest) -> list[str]:
    return [orjson.loads(line)["id"] for line in request.get_data().splitlines()]


# --- options, auth, encoding -------------------------------------------------------------


def test_public_import_path_and_no_key_needed() -> None:
    import dispatch_celery.backends.http as toolkit

    assert toolkit.HttpBackend is HttpBackend
    options = HttpOptions("svc", "http://127.0.0.1:1/x")  # no API key anywhere
    assert "api_key" not in repr(options)
    with pytest.raises(ConfigError, match="DISPATCH_COLLECTOR_ENDPOINT is required"):
        _make(Collector, "collector")


@pytest.mark.parametrize("limit", ["2", "8", "30", "120", "3600"])
def test_the_attempt_budget_ends_before_the_soft_time_limit(limit: str) -> None:
    settings = load_settings(
        {"DISPATCH_TASK_TIME_LIMIT": limit, "DISPATCH_VISIBILITY_TIMEOUT": "9999"}
    )
    options = HttpOptions.from_settings("svc", settings, "http://127.0.0.1:1/x")
    assert 0 < options.attempt_budget < settings.soft_time_limit < settings.task_time_limit


def test_no_auth_sends_no_credentials_and_a_401_says_what_to_set(
    httpserver: HTTPServer, made: list[HttpBackend]
) -> None:
    seen: list[WRequest] = []

    def handler(request: WRequest) -> Response:
        seen.append(request)
        return Response("{}", 401)

    httpserver.expect_request("/c").respond_with_handler(handler)
    backend = _make(Collector, "collector", ENDPOINT=httpserver.url_for("/c"))
    made.append(backend)
    with pytest.raises(CredentialsError) as info:
        backend.deliver(chat_runs(3), RecordingContext("collector").ctx)
    assert "Authorization" not in seen[0].headers
    assert seen[0].headers["Content-Type"] == "application/x-ndjson"
    message = str(info.value)
    assert "HTTP 401" in message
    assert "no credentials are configured" in message
    assert "DISPATCH_COLLECTOR_API_KEY" in message
    assert "DISPATCH_COLLECTOR_HEADERS" in message


def test_basic_auth_and_secrets_never_in_reasons(
    httpserver: HTTPServer, made: list[HttpBackend]
) -> None:
    token = base64.b64encode(f"alice:{SECRET}".encode()).decode()

    def handler(request: WRequest) -> Response:
        assert request.headers["Authorization"] == f"Basic {token}"
        # A vendor echoing what it got: the password and the header.
        return Response(f"bad gateway: {SECRET} Basic {token}", 502)

    httpserver.expect_request("/c").respond_with_handler(handler)
    backend = _make(
        PerRun, "perrun", ENDPOINT=httpserver.url_for("/c"), USERNAME="alice", PASSWORD=SECRET
    )
    made.append(backend)
    with pytest.raises(TransientDeliveryError) as info:
        backend.deliver(chat_runs(2), RecordingContext("perrun").ctx)
    assert "HTTP 502" in str(info.value)
    assert SECRET not in str(info.value)
    assert token not in str(info.value)
    assert "***" in str(info.value)


def test_custom_headers_auth_percent_decoded(
    httpserver: HTTPServer, made: list[HttpBackend]
) -> None:
    httpserver.expect_request(
        "/c", headers={"X-Api-Key": "k y=1", "X-Tenant": "acme"}
    ).respond_with_data("{}")
    backend = _make(
        PerRun,
        "perrun",
        ENDPOINT=httpserver.url_for("/c"),
        HEADERS="X-Api-Key=k%20y%3D1,X-Tenant=acme",
    )
    made.append(backend)
    report = backend.deliver(chat_runs(2), RecordingContext("perrun").ctx)
    assert report.deferred == {} and report.rejected == {}
    assert len(httpserver.log) == 2


def test_auth_settings_are_validated_without_echoing_secrets() -> None:
    cases = [
        ({"HEADERS": "no-equals-sign-secretvalue"}, "DISPATCH_PERRUN_HEADERS"),
        ({"HEADERS": "Bad Name=secretvalue"}, "DISPATCH_PERRUN_HEADERS"),
        ({"USERNAME": "alice"}, "DISPATCH_PERRUN_PASSWORD"),
        ({"API_KEY": "secretvalue", "USERNAME": "a", "PASSWORD": "b"}, "DISPATCH_PERRUN_API_KEY"),
        ({"API_KEY": "secretvalue", "HEADERS": "Authorization=x"}, "DISPATCH_PERRUN_HEADERS"),
        ({"REQUEST_TIMEOUT": "inf"}, "DISPATCH_PERRUN_REQUEST_TIMEOUT"),
        ({"CONCURRENCY": "0"}, "DISPATCH_PERRUN_CONCURRENCY"),
    ]
    for extra, var in cases:
        env = {"ENDPOINT": "http://127.0.0.1:9/x", **extra}
        with pytest.raises(ConfigError, match=var) as info:
            _make(PerRun, "perrun", **env)
        assert "secretvalue" not in str(info.value)


def test_auth_combines_and_scrubs() -> None:
    auth = Auth.bearer("tok-123456", "DISPATCH_X_API_KEY") + Auth.header(
        "X-Scope", "tenant-42", "DISPATCH_X_HEADERS"
    )
    assert auth.headers == {"Authorization": "Bearer tok-123456", "X-Scope": "tenant-42"}
    assert auth.scrub("got tok-123456 and tenant-42") == "got *** and ***"
    assert "tok-123456" not in repr(auth)
    assert "DISPATCH_X_API_KEY" in auth.fix and "DISPATCH_X_HEADERS" in auth.fix


def test_per_run_outcomes_rejections_and_bisecting(
    httpserver: HTTPServer, made: list[HttpBackend]
) -> None:
    runs = chat_runs(8)
    bad = runs[5].id
    flaky = runs[1].id
    unencodable = chat_runs(1, "other")[0]
    unencodable.record["path"] = "/unencodable"

    def handler(request: WRequest) -> Response:
        ids = _ids(request)
        if bad in ids:
            return Response('{"error": "schema"}', 422)
        failed = {flaky: "try later"} if flaky in ids else {}
        return Response(json.dumps({"failed": failed}), 200)

    httpserver.expect_request("/c").respond_with_handler(handler)
    backend = _make(Collector, "collector", ENDPOINT=httpserver.url_for("/c"), API_KEY="k-1")
    made.append(backend)
    report = backend.deliver([*runs, unencodable], RecordingContext("collector").ctx)
    assert report.deferred == {flaky: "try later"}
    assert set(report.rejected) == {bad, unencodable.id}
    assert "HTTP 422" in report.rejected[bad]
    assert len(httpserver.log) <= 7  # 8 runs, one refused: halving, 1 + 2 + 2 + 2


class Ambiguous(Collector):
    """A batch endpoint answering 200 ``{"refused": why, "stored": [ids]}``: it refused some
    of the request's runs without naming them, and says which it stored."""

    name: ClassVar[str] = "ambiguous"
    seen: list[str]

    def read(self, request: Request, reply: Reply) -> Mapping[str, Outcome]:
        self.seen.append(reply.content_type)
        answer = orjson.loads(reply.body or b"{}")
        if not answer.get("refused"):
            return dict.fromkeys(request.runs, DELIVERED)
        split = Outcome.split(f"ambiguous: {answer['refused']}")
        stored = set(answer.get("stored", []))
        return {run_id: DELIVERED if run_id in stored else split for run_id in request.runs}


def test_the_answers_content_type_is_reported_lower_cased_without_parameters(
    httpserver: HTTPServer, made: list[HttpBackend]
) -> None:
    def handler(request: WRequest) -> Response:
        kind = request.headers.get("X-Kind", "")
        response = Response("{}", 200, content_type="Application/JSON; charset=UTF-8")
        if kind == "none":
            del response.headers["Content-Type"]
        return response

    httpserver.expect_request("/c").respond_with_handler(handler)
    backend = _make(Ambiguous, "ambiguous", ENDPOINT=httpserver.url_for("/c"))
    made.append(backend)
    backend.seen = []
    backend.deliver(chat_runs(1), RecordingContext("ambiguous").ctx)
    assert backend.seen == ["application/json"]
    assert httpserver.log[0][1].headers["Content-Type"] == "Application/JSON; charset=UTF-8"

    no_type = _make(Ambiguous, "ambiguous", ENDPOINT=httpserver.url_for("/c"),
                    HEADERS="X-Kind=none")  # fmt: skip
    made.append(no_type)
    no_type.seen = []
    no_type.deliver(chat_runs(1), RecordingContext("ambiguous").ctx)
    assert "Content-Type" not in httpserver.log[1][1].headers
    assert no_type.seen == [""]


@pytest.mark.parametrize("names_stored", [False, True])
def test_a_split_answer_isolates_the_refused_run(
    httpserver: HTTPServer, made: list[HttpBackend], names_stored: bool
) -> None:
    """``Outcome.split`` from ``read`` is handled like a 4xx for several runs; a run alone
    among the runs it marks is rejected with its reason (scrubbed)."""
    runs = chat_runs(8)
    bad = runs[2].id
    sent: list[list[str]] = []

    def handler(request: WRequest) -> Response:
        ids = _ids(request)
        sent.append(ids)
        if bad not in ids:
            return Response("{}", 200)
        stored = [run_id for run_id in ids if run_id != bad] if names_stored else []
        refused = f"one record is invalid (token {SECRET})"
        return Response(json.dumps({"refused": refused, "stored": stored}), 200)

    httpserver.expect_request("/c").respond_with_handler(handler)
    backend = _make(Ambiguous, "ambiguous", ENDPOINT=httpserver.url_for("/c"), API_KEY=SECRET)
    made.append(backend)
    backend.seen = []
    report = backend.deliver(runs, RecordingContext("ambiguous").ctx)
    assert report.rejected == {bad: "ambiguous: one record is invalid (token ***)"}
    assert report.deferred == {}
    if names_stored:  # the only run left unnamed stands alone already: not sent again
        assert sent == [[run.id for run in runs]]
    else:  # 8 -> 4 + 4 -> 2 + 2 -> 1 + 1: every good run delivered, the bad one alone
        assert len(sent) == 7
        assert [bad] in sent
        delivered = {run_id for ids in sent if bad not in ids for run_id in ids}
        assert delivered == {run.id for run in runs} - {bad}

    # A one-run request whose answer asks for a split is rejected with the answer's reason.
    sent.clear()
    report = backend.deliver([runs[2]], RecordingContext("ambiguous").ctx)
    assert report.rejected == {bad: "ambiguous: one record is invalid (token ***)"}
    assert sent == [[bad]]


# --- probe mode --------------------------------------------------------------------------


def test_probe_sends_one_request_and_defers_the_rest_when_it_fails(
    httpserver: HTTPServer, made: list[HttpBackend]
) -> None:
    httpserver.expect_request("/c").respond_with_data("down", status=503)
    backend = _make(PerRun, "perrun", ENDPOINT=httpserver.url_for("/c"), CONCURRENCY="4")
    made.append(backend)
    rec = RecordingContext("perrun", probe=True)
    with pytest.raises(TransientDeliveryError, match="HTTP 503") as info:
        backend.deliver(chat_runs(10), rec.ctx)
    assert len(httpserver.log) == 1
    assert rec.acquired == 1
    assert info.value.retry_after is None


def test_probe_success_sends_the_rest(httpserver: HTTPServer, made: list[HttpBackend]) -> None:
    httpserver.expect_request("/c").respond_with_data("{}")
    backend = _make(PerRun, "perrun", ENDPOINT=httpserver.url_for("/c"), CONCURRENCY="4")
    made.append(backend)
    report = backend.deliver(chat_runs(10), RecordingContext("perrun", probe=True).ctx)
    assert report.deferred == {} and report.rejected == {}
    assert len(httpserver.log) == 10


def test_probe_refused_raises_credentials_error_after_one_request(
    httpserver: HTTPServer, made: list[HttpBackend]
) -> None:
    httpserver.expect_request("/c").respond_with_data("no", status=403)
    backend = _make(PerRun, "perrun", ENDPOINT=httpserver.url_for("/c"), API_KEY="sk-abcdef")
    made.append(backend)
    with pytest.raises(CredentialsError, match="DISPATCH_PERRUN_API_KEY") as info:
        backend.deliver(chat_runs(5), RecordingContext("perrun", probe=True).ctx)
    assert "sk-abcdef" not in str(info.value)
    assert len(httpserver.log) == 1


# --- credentials refused part-way, redirects ---------------------------------------------


def test_refused_part_way_keeps_the_delivered_runs_delivered(
    httpserver: HTTPServer, made: list[HttpBackend]
) -> None:
    answers = iter([200, 200, 200] + [401] * 20)
    httpserver.expect_request("/c").respond_with_handler(
        lambda request: Response("{}", next(answers))
    )
    backend = _make(PerRun, "perrun", ENDPOINT=httpserver.url_for("/c"), API_KEY="sk-key-1234")
    made.append(backend)
    runs = chat_runs(10)
    report = backend.deliver(runs, RecordingContext("perrun").ctx)
    assert report.credentials_refused is not None
    assert "DISPATCH_PERRUN_API_KEY" in report.credentials_refused
    assert "HTTP 401" in report.credentials_refused
    assert set(report.deferred) == {run.id for run in runs[3:]}  # the 3 delivered stay so
    assert report.rejected == {}
    assert len(httpserver.log) == 4  # nothing more after the refusal
    assert not any("sk-key-1234" in reason for reason in report.deferred.values())


def test_a_redirect_is_a_misconfigured_endpoint(
    httpserver: HTTPServer, made: list[HttpBackend]
) -> None:
    httpserver.expect_request("/c").respond_with_data(
        "", status=301, headers={"Location": "https://user:hunter22@login.example.com/sso"}
    )
    backend = _make(PerRun, "perrun", ENDPOINT=httpserver.url_for("/c"))
    made.append(backend)
    with pytest.raises(CredentialsError) as info:
        backend.deliver(chat_runs(3), RecordingContext("perrun").ctx)
    message = str(info.value)
    assert "DISPATCH_PERRUN_ENDPOINT" in message
    assert "login.example.com" in message
    assert "hunter22" not in message
    assert len(httpserver.log) == 1


# --- hung connections --------------------------------------------------------------------


def _timed(fn: Any, *args: Any) -> tuple[float, BaseException | Any]:
    started = time.monotonic()
    try:
        result: Any = fn(*args)
    except Exception as exc:
        result = exc
    return time.monotonic() - started, result


@pytest.mark.parametrize("mode", ["silent", "drip"])
def test_a_hung_answer_ends_at_the_request_deadline(mode: str, made: list[HttpBackend]) -> None:
    """The read timeout (20 s of silence) never fires on a drip; the total deadline does."""
    with HangingVendor(mode, drip_interval=0.1) as vendor:
        backend = _make(
            PerRun, "perrun", ENDPOINT=vendor.url, READ_TIMEOUT="20", REQUEST_TIMEOUT="0.6"
        )
        made.append(backend)
        elapsed, result = _timed(backend.deliver, chat_runs(1), RecordingContext("perrun").ctx)
        assert isinstance(result, TransientDeliveryError)
        assert "timeout" in str(result)
        assert vendor.held == 1
        assert elapsed < 10  # bounded by the deadline, not by the 20 s read timeout


def test_a_hung_run_does_not_block_the_others(made: list[HttpBackend]) -> None:
    runs = chat_runs(8)
    stuck = runs[3]
    with HangingVendor("drip", hang_on=(stuck.id.encode(),), drip_interval=0.2) as vendor:
        backend = _make(PerRun, "perrun", ENDPOINT=vendor.url, CONCURRENCY="4", REQUEST_TIMEOUT="4")
        made.append(backend)
        out: dict[str, Any] = {}
        worker = threading.Thread(
            target=lambda: out.update(r=backend.deliver(runs, RecordingContext("perrun").ctx))
        )
        worker.start()
        # The other 7 are answered while the hung one is still held.
        wait_for(lambda: vendor.answered == 7, timeout=3.5, what="the 7 other runs answered")
        assert worker.is_alive()
        # Another delivery of the same backend (another worker thread) goes through too.
        other = backend.deliver(chat_runs(3, "other"), RecordingContext("perrun").ctx)
        assert other.deferred == {}
        assert worker.is_alive()
        worker.join(10)
        report = out["r"]
        assert list(report.deferred) == [stuck.id]
        assert "timeout" in report.deferred[stuck.id]
        # The timed-out connection was dropped, not pooled: the next delivery works.
        vendor.hang_on = ()
        assert backend.deliver([stuck], RecordingContext("perrun").ctx).deferred == {}


def test_a_hung_batch_endpoint_stays_within_the_attempt_budget(made: list[HttpBackend]) -> None:
    with HangingVendor("silent") as vendor:
        env = {
            "DISPATCH_LUNARY_API_KEY": "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0",
            "DISPATCH_LUNARY_ENDPOINT": vendor.url,
            "DISPATCH_LUNARY_READ_TIMEOUT": "30",
            "DISPATCH_LUNARY_REQUEST_TIMEOUT": "30",
            "DISPATCH_LUNARY_MAX_REQUEST_BYTES": "8192",
            "DISPATCH_TASK_TIME_LIMIT": "2",  # soft limit 1 s: the attempt's budget 0.8 s
        }
        backend = LunaryBackend.from_settings("lunary", load_settings(env))
        made.append(backend)
        elapsed, result = _timed(
            backend.deliver, chat_runs(9, pad=1000), RecordingContext("lunary").ctx
        )
        assert isinstance(result, TransientDeliveryError)
        assert "timeout" in str(result)
        assert len(vendor.bodies) == 1  # the later chunks were not sent into the hang
        assert elapsed < 10


def test_connect_timeout_fires(made: list[HttpBackend]) -> None:
    """A listener whose accept queue is full: the SYN is dropped, connect never completes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the accept queue (nobody accepts)
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.1)
    try:
        backend = _make(
            PerRun, "perrun", ENDPOINT=f"http://127.0.0.1:{port}/x", CONNECT_TIMEOUT="0.3",
            READ_TIMEOUT="20", REQUEST_TIMEOUT="20",
        )  # fmt: skip
        made.append(backend)
        elapsed, result = _timed(backend.deliver, chat_runs(1), RecordingContext("perrun").ctx)
        assert isinstance(result, TransientDeliveryError)
        assert "timeout" in str(result).lower()
        assert elapsed < 10
    finally:
        for s in fillers:
            s.close()
        listener.close()


def test_helicone_is_an_http_backend() -> None:
    env = {"DISPATCH_HELICONE_API_KEY": "sk-x-123456"}
    backend = HeliconeBackend.from_settings("helicone", load_settings(env))
    assert isinstance(backend, HttpBackend)
    assert backend.concurrency == 32
    backend.close()


# --- proxies from the environment (resolved once per client) -------------------------------


class _ForwardProxy:
    """A plain HTTP forward proxy: takes absolute-URI requests, forwards them, records them."""

    def __init__(self) -> None:
        import http.client
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen: list[tuple[str, str | None]] = []  # (request URI, Proxy-Authorization)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                proxy.seen.append((self.path, self.headers.get("Proxy-Authorization")))
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                target = self.path.split("/", 3)  # http: '' host:port rest
                upstream = http.client.HTTPConnection(target[2], timeout=10)
                headers = {
                    k: v for k, v in self.headers.items() if not k.lower().startswith("proxy-")
                }
                upstream.request("POST", "/" + target[3], body, headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for name, value in answer.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("bypass", [False, True])
def test_requests_go_through_the_environments_proxy_unless_no_proxy_says_otherwise(
    bypass: bool, monkeypatch: pytest.MonkeyPatch, made: list[HttpBackend]
) -> None:
    """HTTP_PROXY (with its credentials) and NO_PROXY are honoured as requests honours them,
    although they are resolved once per client rather than per request."""
    from tests.vendor_servers import FakeHelicone

    proxy = _ForwardProxy()
    try:
        with FakeHelicone() as vendor:
            for name in ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY",
                         "all_proxy", "NO_PROXY", "no_proxy"):  # fmt: skip
                monkeypatch.delenv(name, raising=False)
            monkeypatch.setenv("HTTP_PROXY", f"http://user:pw@127.0.0.1:{proxy.port}")
            if bypass:
                monkeypatch.setenv("NO_PROXY", "127.0.0.1")
            backend = _make(
                HeliconeBackend, "helicone", API_KEY=vendor.api_key, ENDPOINT=vendor.url
            )
            made.append(backend)
            report = backend.deliver(chat_runs(3), RecordingContext("helicone").ctx)
            assert report.deferred == {} and report.rejected == {}
            assert len(vendor.received) == 3
            endpoint = vendor.url
    finally:
        proxy.close()
    if bypass:
        assert proxy.seen == []
    else:
        assert [uri for uri, _ in proxy.seen] == [endpoint] * 3  # absolute URIs
        expected = "Basic " + base64.b64encode(b"user:pw").decode()
        assert {auth for _, auth in proxy.seen} == {expected}
