"""Arize Phoenix as a test peer: the real OTLP receiver, run from PyPI on loopback.

Facts this relies on were measured in ``shared/spec/otlp.md``:

* ``arize-phoenix`` is installed into its own virtualenv (about 850 MB, about 80 s), cached
  between runs under ``~/.cache/dispatch-celery/phoenix-venv-<version>`` (or
  ``$DISPATCH_PEER_CACHE``); a half-finished install is never used (``.complete`` marker);
* the server listens on 127.0.0.1 only: ``PHOENIX_HOST`` covers HTTP (UI, REST, OTLP/HTTP),
  and a small wrapper rewrites the gRPC listener's ``[::]`` to ``127.0.0.1``, because
  Phoenix binds gRPC on every interface whatever ``PHOENIX_HOST`` says;
* SQLite in a temporary working directory, telemetry and external resources off;
* start takes about 20 s (imports) on an idle machine, 85 s measured beside two other
  xdist workers on two cores, so ``/healthz`` is awaited for up to 240 s.

Without network on a laptop the install fails and the test skips; under ``CI=true`` it fails.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

PHOENIX_VERSION = "20.26.1"
INSTALL_TIMEOUT_S = 900.0
START_TIMEOUT_S = 240.0

SERVE_LOOPBACK = '''\
"""phoenix serve, with the OTLP/gRPC listener kept on loopback (it ignores PHOENIX_HOST)."""
import sys

import grpc.aio._server as _server

_add = _server.Server.add_insecure_port
_server.Server.add_insecure_port = lambda self, address: _add(
    self, address.replace("[::]", "127.0.0.1")
)

from phoenix.server.main import main  # noqa: E402

if __name__ == "__main__":
    sys.argv[0] = "phoenix"
    main()
'''


class PeerUnavailable(RuntimeError):
    """Phoenix could not be installed or started here (no network, no disk, ...)."""


def cache_dir() -> Path:
    base = os.environ.get("DISPATCH_PEER_CACHE")
    root = Path(base) if base else Path.home() / ".cache" / "dispatch-celery"
    return root / f"phoenix-venv-{PHOENIX_VERSION}"


def _python(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure_venv() -> tuple[Path, float]:
    """The cached virtualenv's python (installing it first if needed) and the install time
    in seconds (0.0 when the cache was there)."""
    venv = cache_dir()
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.parent / f"{venv.name}.lock"
    with lock_path.open("w") as lock:  # two test runs at once install once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".complete").is_file():
            return _python(venv), 0.0
        started = time.monotonic()
        staging = venv.parent / f"{venv.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(venv, ignore_errors=True)
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", str(staging)],
                check=True, capture_output=True, timeout=120,
            )  # fmt: skip
            pip = [
                str(_python(staging)),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
            ]
            subprocess.run(
                [*pip, f"arize-phoenix=={PHOENIX_VERSION}"],
                check=True, capture_output=True, timeout=INSTALL_TIMEOUT_S,
            )  # fmt: skip
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            shutil.rmtree(staging, ignore_errors=True)
            detail = getattr(exc, "stderr", b"") or b""
            tail = detail[-600:].decode("utf-8", "replace") if isinstance(detail, bytes) else ""
            raise PeerUnavailable(
                f"cannot install arize-phoenix=={PHOENIX_VERSION}: {exc} {tail}"
            ) from exc
        # A venv's scripts hold absolute paths: the venv must be built where it is used. The
        # interpreter itself is a symlink and does not care, and the wrapper is run with
        # ``python serve_loopback.py``, so renaming the finished staging directory is fine.
        staging.rename(venv)
        (venv / "serve_loopback.py").write_text(SERVE_LOOPBACK)
        (venv / ".complete").write_text(PHOENIX_VERSION)
        return _python(venv), time.monotonic() - started


@dataclass
class Phoenix:
    """A running Phoenix: base URL, the process, and how long install and start took."""

    url: str
    grpc_port: int
    process: subprocess.Popen[bytes]
    log: Path
    install_seconds: float
    start_seconds: float

    @property
    def traces_url(self) -> str:
        return f"{self.url}/v1/traces"

    def get(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=timeout) as response:  # noqa: S310
            return orjson.loads(response.read())

    def graphql(self, query: str, timeout: float = 10.0) -> Any:
        request = urllib.request.Request(  # noqa: S310 (our own loopback URL)
            f"{self.url}/graphql", data=orjson.dumps({"query": query}), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return orjson.loads(response.read())

    def record_count(self, project: str) -> int:
        """How many spans the project holds (a cheap poll while ingestion runs)."""
        reply = self.graphql(f'{{ getProjectByName(name: "{project}") {{ recordCount }} }}')
        found = (reply.get("data") or {}).get("getProjectByName")
        return int(found["recordCount"]) if found else 0

    def spans(self, project: str, **params: str) -> list[dict[str, Any]]:
        """Every span of ``project`` through the REST API (pages followed)."""
        out: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            query = {"limit": "1000", **params}
            if cursor:
                query["cursor"] = cursor
            qs = "&".join(f"{k}={urllib.parse.quote(v)}" for k, v in query.items())
            page = self.get(f"/v1/projects/{urllib.parse.quote(project)}/spans?{qs}")
            out.extend(page["data"])
            cursor = page.get("next_cursor")
            if not cursor:
                return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def run_phoenix(workdir: Path) -> Iterator[Phoenix]:
    """Install (cached) and start Phoenix with its data in ``workdir``; stop it at the end.

    Raises ``PeerUnavailable`` when it cannot be installed or does not become healthy.
    """
    python, install_seconds = ensure_venv()
    port, grpc_port = _free_port(), _free_port()
    data = workdir / "phoenix-data"
    data.mkdir(parents=True, exist_ok=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DISPATCH_", "OTEL_", "PHOENIX_", "LANGFUSE_"))
    }
    env.update(
        PHOENIX_HOST="127.0.0.1",
        PHOENIX_PORT=str(port),
        PHOENIX_GRPC_PORT=str(grpc_port),
        PHOENIX_WORKING_DIR=str(data),
        PHOENIX_TELEMETRY_ENABLED="false",
        PHOENIX_ALLOW_EXTERNAL_RESOURCES="false",
        PHOENIX_DISABLE_AGENT_ASSISTANT="true",
        PHOENIX_AGENTS_DISABLE_BASH="true",
        PHOENIX_LOG_MIGRATIONS="false",
    )
    log = workdir / "phoenix.log"
    started = time.monotonic()
    process = subprocess.Popen(
        [str(python), str(python.parent.parent / "serve_loopback.py"), "serve"],
        env=env, cwd=workdir, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = started + START_TIMEOUT_S
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_bytes()[-2000:].decode("utf-8", "replace")
                raise PeerUnavailable(f"Phoenix did not become healthy at {url}: {tail}")
            time.sleep(0.25)
        yield Phoenix(url, grpc_port, process, log, install_seconds, time.monotonic() - started)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
