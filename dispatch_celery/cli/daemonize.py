"""``--detach`` (python-daemon) and ``dispatch stop``: pidfiles that tell the truth."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dispatch_celery.errors import ConfigError


def read_pid(pidfile: Path) -> int | None:
    try:
        text = pidfile.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.EPERM
    return True


def check_pidfile(pidfile: Path) -> None:
    """Refuse to start over a live process; clear a stale pidfile."""
    pid = read_pid(pidfile)
    if pid is not None and alive(pid):
        raise ConfigError(f"already running with pid {pid} (pidfile {pidfile}); stop it first")
    pidfile.unlink(missing_ok=True)


def detach(pidfile: Path, logfile: Path, on_term: Callable[[int, Any], None]) -> Any:
    """Enter a daemon context: forked, detached, stdout/stderr to ``logfile``, pidfile
    written (and removed on exit), SIGTERM calling ``on_term``. Returns the open context."""
    import daemon
    import daemon.pidfile

    pidfile.parent.mkdir(parents=True, exist_ok=True)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    check_pidfile(pidfile)
    log = logfile.open("a", buffering=1)
    ctx = daemon.DaemonContext(
        working_directory=os.getcwd(),
        umask=0o022,
        pidfile=daemon.pidfile.TimeoutPIDLockFile(str(pidfile.resolve()), acquire_timeout=1),
        stdout=log,
        stderr=log,
        signal_map={signal.SIGTERM: on_term, signal.SIGINT: on_term, signal.SIGHUP: None},
        files_preserve=[log],
    )
    ctx.open()
    return ctx


def stop(pidfile: Path, timeout: float) -> str:
    """SIGTERM the process of ``pidfile`` and wait until it is gone."""
    pid = read_pid(pidfile)
    if pid is None:
        raise ConfigError(f"no pid in {pidfile}: nothing to stop")
    if not alive(pid):
        pidfile.unlink(missing_ok=True)
        return f"process {pid} was not running; removed stale pidfile {pidfile}"
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return f"stopped process {pid}"
        time.sleep(0.1)
    raise ConfigError(f"process {pid} did not exit within {timeout:g} s after SIGTERM")
