"""The ``file`` backend: JSONL, one run record (or raw entry) per line.

Durability and exactly-once appends, also with many worker processes on one file:

* Each batch is appended with one ``write`` on an ``O_APPEND`` descriptor while holding an
  exclusive ``flock`` on ``<path>.lock``, so lines of concurrent workers never interleave.
* The data is ``fsync``ed before ``deliver`` returns.
* A journal ``<path>.batches`` records, before each append, the batch id, the digest of
  its bytes and the offset they go to. A retried batch whose bytes are already in place is
  not appended again (a worker may die after the fsync, before the task is acknowledged).
* A torn tail (a crash in the middle of a write) is cut back to the last newline under the
  lock, before the next append: that batch was never reported delivered and will be
  retried, so readers never see a partial line for long and never a partial line inside.
* ``DISPATCH_FILE_ROTATE_BYTES``: rotate to ``<path>.1`` (older ones shift) when the next
  append would cross the size.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import orjson

from dispatch_celery.backend import DeliveryContext, DeliveryReport, Run
from dispatch_celery.errors import ConfigError, TransientDeliveryError
from dispatch_celery.settings import Settings

JOURNAL_TAIL_BYTES = 256 * 1024  # how far back a retry looks for its batch
JOURNAL_MAX_BYTES = 4 * 1024 * 1024  # the journal is compacted beyond this
ROTATE_KEEP = 5


class FileBackend:
    name: ClassVar[str] = "file"

    def __init__(self, path: Path, fmt: str = "record", rotate_bytes: int = 0) -> None:
        self.path = path
        self.format = fmt
        self.rotate_bytes = rotate_bytes
        self.lock_path = path.with_name(path.name + ".lock")
        self.journal_path = path.with_name(path.name + ".batches")

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> FileBackend:
        path = Path(settings.option(service, "PATH", "./dispatch-events.jsonl") or "")
        fmt = (settings.option(service, "FORMAT", "record") or "record").lower()
        if fmt not in ("record", "raw"):
            raise ConfigError(
                f"{settings.option_name(service, 'FORMAT')} must be 'record' or 'raw', got {fmt!r}"
            )
        rotate_raw = settings.option(service, "ROTATE_BYTES", "0") or "0"
        if not rotate_raw.isdigit():
            raise ConfigError(
                f"{settings.option_name(service, 'ROTATE_BYTES')} must be a number of bytes "
                f"(0 = never rotate), got {rotate_raw!r}"
            )
        parent = path.resolve().parent
        if not parent.is_dir():
            raise ConfigError(
                f"{settings.option_name(service, 'PATH')}: directory {str(parent)!r} does not exist"
            )
        if not os.access(parent, os.W_OK):
            raise ConfigError(
                f"{settings.option_name(service, 'PATH')}: directory {str(parent)!r} "
                "is not writable"
            )
        return cls(path, fmt, int(rotate_raw))

    def line(self, run: Run) -> bytes:
        if self.format == "raw":
            return (
                orjson.dumps(
                    {"stream_id": run.event.stream_id, "data": run.raw.decode("utf-8", "replace")}
                )
                + b"\n"
            )
        return orjson.dumps(run.record) + b"\n"

    def deliver(self, runs: Sequence[Run], ctx: DeliveryContext) -> DeliveryReport:
        payload = b"".join(self.line(run) for run in runs)
        if not payload:
            return DeliveryReport()
        digest = hashlib.blake2b(payload, digest_size=16).hexdigest()
        tag = f"{ctx.service}/{ctx.batch_id}"
        try:
            self._append_once(tag, digest, payload)
        except OSError as exc:  # disk full, permissions changed, ...: retry later
            raise TransientDeliveryError(f"cannot append to {self.path}: {exc.strerror}") from exc
        return DeliveryReport()

    def close(self) -> None:
        return None

    # --- internals ---------------------------------------------------------------------

    def _append_once(self, tag: str, digest: str, payload: bytes) -> None:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    size = self._cut_torn_tail(fd)
                    if self._already_written(fd, size, tag, digest, len(payload)):
                        return
                    if self.rotate_bytes and size and size + len(payload) > self.rotate_bytes:
                        os.close(fd)
                        fd = -1
                        self._rotate()
                        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
                        size = 0
                    self._journal(f"{tag} {digest} {size} {len(payload)}\n")
                    written = os.write(fd, payload)
                    while written < len(payload):  # only on odd filesystems; still one lock
                        written += os.write(fd, payload[written:])
                    os.fdatasync(fd)
                finally:
                    if fd >= 0:
                        os.close(fd)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _cut_torn_tail(self, fd: int) -> int:
        size = os.fstat(fd).st_size
        if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
            return size
        start = max(0, size - 4 * 1024 * 1024)
        tail = os.pread(fd, size - start, start)
        keep = start + tail.rfind(b"\n") + 1 if b"\n" in tail else start
        os.ftruncate(fd, keep)
        os.fsync(fd)
        return keep

    def _already_written(self, fd: int, size: int, tag: str, digest: str, length: int) -> bool:
        try:
            with open(self.journal_path, "rb") as j:
                j.seek(0, os.SEEK_END)
                end = j.tell()
                j.seek(max(0, end - JOURNAL_TAIL_BYTES))
                tail = j.read()
        except FileNotFoundError:
            return False
        needle = f"{tag} {digest} ".encode()
        for line in reversed(tail.splitlines()):
            if not line.startswith(needle):
                continue
            offset, n = (int(x) for x in line[len(needle) :].split())
            if n == length and offset + n <= size:
                chunk = os.pread(fd, n, offset)
                if hashlib.blake2b(chunk, digest_size=16).hexdigest() == digest:
                    return True
            return False
        return False

    def _journal(self, line: str) -> None:
        try:
            if self.journal_path.stat().st_size > JOURNAL_MAX_BYTES:
                self._compact_journal()
        except FileNotFoundError:
            pass
        # Not fsynced: the journal must reach the page cache before the data (a killed
        # process loses neither), but only the data must survive a power cut; losing the
        # journal line then costs at worst one duplicate batch on retry, never an event.
        with open(self.journal_path, "ab") as j:
            j.write(line.encode())

    def _compact_journal(self) -> None:
        with open(self.journal_path, "rb") as j:
            j.seek(-JOURNAL_TAIL_BYTES, os.SEEK_END)
            tail = j.read()
        tail = tail[tail.find(b"\n") + 1 :]
        tmp = self.journal_path.with_name(self.journal_path.name + ".tmp")
        tmp.write_bytes(tail)
        os.replace(tmp, self.journal_path)

    def _rotate(self) -> None:
        for i in range(ROTATE_KEEP - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        # offsets in the journal refer to the old file; start a new one
        if self.journal_path.exists():
            os.replace(
                self.journal_path, self.journal_path.with_name(self.journal_path.name + ".1")
            )
