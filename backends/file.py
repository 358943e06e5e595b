"""The ``file`` backend: JSONL, one run record (or raw entry) per line.

Durability and exactly-once appends, also with many worker processes on one file:

* Each batch is appended with one ``write`` on an ``O_APPEND`` descriptor while holding an
  exclusive ``flock`` on ``<path>.lock``, so lines of concurrent workers never interleave.
* The data is ``fsync``ed before ``deliver`` returns.
* A journal ``<path>.batches`` records, before each append, the batch id, the digest of
  its bytes, the file they go to (device and inode) and the offset. A retried batch whose
  bytes are already in place is not appended again (a worker may die after the fsync,
  before the task is acknowledged), also when the file was rotated in between: the journal
  stays where it is and the inode finds the rotated file.
* A failed append (disk full: ``ENOSPC``/``EDQUOT``, an I/O error) is cut back to the size
  the file had before it, so no torn or partial line remains, and raises a transient error:
  the batch is retried and goes in once space is freed.
* A torn tail (a crash in the middle of a write) is cut back to the last newline under the
  lock, before the next append: that batch was never reported delivered and will be
  retried, so readers never see a partial line for long and never a partial line inside.
* ``DISPATCH_FILE_ROTATE_BYTES``: rotate to ``<path>.1`` (older ones shift, 5 kept) when the
  next append would cross the size; 0 (the default) never rotates.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import ClassVar

import orjson

from dispatch_celery import constants as c
from dispatch_celery.backend import DeliveryContext, DeliveryReport, Run
from dispatch_celery.errors import ConfigError, TransientDeliveryError
from dispatch_celery.settings import Settings

JOURNAL_TAIL_BYTES = 256 * 1024  # how far back a retry looks for its batch
JOURNAL_MAX_BYTES = 4 * 1024 * 1024  # the journal is compacted beyond this
ROTATE_KEEP = 5
_FULL = {errno.ENOSPC, errno.EDQUOT}


# A batch's digest in the journal: SHA-256 (SHA-NI makes it ~2 GB/s here, twice blake2b),
# 32 hex digits after a prefix that tells it from the blake2b digests earlier versions
# wrote (``_digest_like`` still checks those: a batch retried across an upgrade).
_DIGEST_PREFIX = "s"


def payload_digest(payload: bytes) -> str:
    return _DIGEST_PREFIX + hashlib.sha256(payload).hexdigest()[:32]


def _legacy_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _digest_like(digest: str, data: bytes) -> str:
    """``data``'s digest made the way ``digest`` was (this version's, or the legacy one)."""
    return payload_digest(data) if digest.startswith(_DIGEST_PREFIX) else _legacy_digest(data)


class FileBackend:
    name: ClassVar[str] = "file"

    def __init__(self, path: Path, fmt: str = c.DEFAULT_FILE_FORMAT, rotate_bytes: int = 0) -> None:
        self.path = path
        self.format = fmt
        self.rotate_bytes = rotate_bytes
        self.lock_path = path.with_name(path.name + ".lock")
        self.journal_path = path.with_name(path.name + ".batches")

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> FileBackend:
        path_var = settings.option_name(service, "PATH")
        path = Path(settings.option(service, "PATH", c.DEFAULT_FILE_PATH) or "")
        fmt = (settings.option(service, "FORMAT", c.DEFAULT_FILE_FORMAT) or "").lower()
        if fmt not in ("record", "raw"):
            raise ConfigError(
                f"{settings.option_name(service, 'FORMAT')} must be 'record' or 'raw', got {fmt!r}"
            )
        rotate_bytes = settings.positive_int(service, "ROTATE_BYTES", 0, zero_ok=True)
        parent = path.resolve().parent
        if not parent.is_dir():
            raise ConfigError(f"{path_var}: directory {str(parent)!r} does not exist")
        if not os.access(parent, os.W_OK):
            raise ConfigError(f"{path_var}: directory {str(parent)!r} is not writable")
        return cls(path, fmt, rotate_bytes)

    def line(self, run: Run) -> bytes:
        if self.format == "raw":
            return (
                orjson.dumps(
                    {"stream_id": run.event.stream_id, "data": run.raw.decode("utf-8", "replace")}
                )
                + b"\n"
            )
        # The core's serialization of the record, made by the credential scan, when it has one.
        return (run.json if run.json is not None else orjson.dumps(run.record)) + b"\n"

    def deliver(self, runs: Sequence[Run], ctx: DeliveryContext) -> DeliveryReport:
        payload = b"".join(self.line(run) for run in runs)
        if not payload:
            return DeliveryReport()
        digest = payload_digest(payload)
        tag = f"{ctx.service}/{ctx.batch_id}"
        try:
            self._append_once(tag, digest, payload)
        except OSError as exc:  # disk full, permissions changed, ...: retry later
            why = exc.strerror or type(exc).__name__
            if exc.errno in _FULL:
                why += " (the file system is full: the batch is retried once space is freed)"
            raise TransientDeliveryError(f"cannot append to {self.path}: {why}") from exc
        return DeliveryReport()

    def close(self) -> None:
        return None

    # --- internals ---------------------------------------------------------------------

    def _open(self) -> int:
        return os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)

    def _append_once(self, tag: str, digest: str, payload: bytes) -> None:
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                fd = self._open()
                try:
                    size = self._cut_torn_tail(fd)
                    if self._already_written(tag, digest, payload):
                        return
                    if self.rotate_bytes and size and size + len(payload) > self.rotate_bytes:
                        os.close(fd)
                        fd = -1
                        self._rotate()
                        fd = self._open()
                        size = 0
                    st = os.fstat(fd)
                    self._journal(f"{tag} {digest} {st.st_dev}:{st.st_ino} {size} {len(payload)}\n")
                    self._write(fd, size, payload)
                finally:
                    if fd >= 0:
                        os.close(fd)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    @staticmethod
    def _write(fd: int, size: int, payload: bytes) -> None:
        """Append and sync, or leave the file exactly as it was (``size`` bytes)."""
        try:
            written = os.write(fd, payload)
            while written < len(payload):  # a short write: the disk filled up part-way
                written += os.write(fd, payload[written:])
            os.fdatasync(fd)
        except OSError:
            # No partial batch may stay behind: its complete lines would be appended again
            # by the retry (duplicates), its last line would be torn.
            with suppress(OSError):
                os.ftruncate(fd, size)
                os.fsync(fd)
            raise

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

    def _files(self) -> list[Path]:
        return [self.path] + [
            self.path.with_name(f"{self.path.name}.{i}") for i in range(1, ROTATE_KEEP + 1)
        ]

    def _find(self, where: bytes) -> Path | None:
        """The data file (current or rotated) with this ``dev:ino``."""
        for candidate in self._files():
            try:
                st = candidate.stat()
            except FileNotFoundError:
                continue
            if f"{st.st_dev}:{st.st_ino}".encode() == where:
                return candidate
        return None

    def _already_written(self, tag: str, digest: str, payload: bytes) -> bool:
        """Whether the journal's last record of this batch with these bytes (``digest``)
        points at bytes still in place. Lines of earlier versions carry a blake2b digest:
        the payload's is computed only when such a line of this batch is found."""
        try:
            with open(self.journal_path, "rb") as j:
                j.seek(0, os.SEEK_END)
                end = j.tell()
                j.seek(max(0, end - JOURNAL_TAIL_BYTES))
                tail = j.read()
        except FileNotFoundError:
            return False
        needle = b"\n" + f"{tag} ".encode()
        tail = b"\n" + tail
        legacy: str | None = None
        at = len(tail)
        while (at := tail.rfind(needle, 0, at)) >= 0:
            stop = tail.find(b"\n", at + 1)
            fields = tail[at + len(needle) : stop if stop >= 0 else len(tail)].split()
            if not fields:
                continue
            found = fields[0].decode("ascii", "replace")
            if found != digest:
                if found.startswith(_DIGEST_PREFIX):
                    continue  # the batch's bytes differed then (e.g. other redaction rules)
                legacy = legacy or _legacy_digest(payload)
                if found != legacy:
                    continue
            verdict = self._in_place(fields[1:], len(payload), found)
            if verdict is not None:
                return verdict
        return False

    def _in_place(self, fields: list[bytes], length: int, digest: str) -> bool | None:
        """Whether the journal line's bytes (``where offset n``) are in place; None for a
        torn or foreign line (look further back)."""
        if len(fields) == 2:  # written before the journal named files: the current one
            fields.insert(0, b"")
        if len(fields) != 3 or not (fields[1].isdigit() and fields[2].isdigit()):
            return None
        where, offset, n = fields[0], int(fields[1]), int(fields[2])
        target = self._find(where) if where else self.path
        if n != length or target is None:
            return False  # rotated out of reach: appending again beats losing it
        with open(target, "rb") as data:
            chunk = os.pread(data.fileno(), n, offset)
        return _digest_like(digest, chunk) == digest

    def _journal(self, line: str) -> None:
        try:
            if self.journal_path.stat().st_size > JOURNAL_MAX_BYTES:
                self._compact_journal()
        except FileNotFoundError:
            pass
        # Not fsynced: the journal must reach the page cache before the data (a killed
        # process loses neither), but only the data must survive a power cut; losing the
        # journal line then costs at worst one duplicate batch on retry, never an event.
        fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            data = line.encode()
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a torn line (a crash mid-write) stays a line of its own
            try:
                written = os.write(fd, data)
                if written < len(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                with suppress(OSError):
                    os.ftruncate(fd, size)  # no torn journal line either
                raise
        finally:
            os.close(fd)

    def _compact_journal(self) -> None:
        with open(self.journal_path, "rb") as j:
            j.seek(-JOURNAL_TAIL_BYTES, os.SEEK_END)
            tail = j.read()
        tail = tail[tail.find(b"\n") + 1 :]
        tmp = self.journal_path.with_name(self.journal_path.name + ".tmp")
        try:
            tmp.write_bytes(tail)
            os.replace(tmp, self.journal_path)
        finally:
            tmp.unlink(missing_ok=True)

    def _rotate(self) -> None:
        # The journal stays: its lines name the data file by inode, which a rename keeps,
        # so a batch retried right after the rotation is still found in ``<path>.1``.
        for i in range(ROTATE_KEEP - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
