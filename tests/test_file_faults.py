"""Fault 7: a full disk under the file backend, on a real small file system (a 256 KiB
tmpfs mounted for the test). ENOSPC is transient, no torn or partial line remains, the
journal stays whole, and delivery resumes once space is freed: every event lands once."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import redis

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.backend import DeliveryContext, Run
from dispatch_celery.backends.file import FileBackend
from dispatch_celery.decode.events import decode_entry
from dispatch_celery.decode.records import build_record
from dispatch_celery.errors import TransientDeliveryError
from tests.conftest import need_server
from tests.harness import bridge, event, jsonl, make, wait_for, worker, xadd_all

FS_BYTES = 256 * 1024


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (needs root, or CAP_SYS_ADMIN); skipped elsewhere unless CI=true."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mnt)],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        done = None
    if done is None or done.returncode != 0:
        need_server("a mountable small file system (mount -t tmpfs needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=10, check=False)


def fill(path: Path, leave: int = 0) -> None:
    """Fill the file system with ``path``, then free ``leave`` bytes of it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        block = b"x" * 4096
        while True:
            try:
                if os.write(fd, block) < len(block):
                    break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    size = path.stat().st_size
    os.truncate(path, max(0, size - leave))


def runs(start: int, n: int) -> list[Run]:
    out = []
    for i in range(start, start + n):
        ev = decode_entry("llm-proxy-events", f"1700000000000-{i}", event(i, content="y" * 300))
        out.append(Run(build_record(ev, max_body_bytes=1 << 20), ev))
    return out


def ctx(batch: str) -> DeliveryContext:
    return DeliveryContext(service="file", batch_id=batch, attempt=1)


def whole_lines(path: Path) -> list[dict[str, object]]:
    """Every line of the file, asserting there is no torn or partial one."""
    data = path.read_bytes() if path.exists() else b""
    assert not data or data.endswith(b"\n"), "a partial line was left behind"
    return [orjson.loads(line) for line in data.splitlines()]


def test_disk_full_is_transient_without_a_partial_line_and_resumes(small_fs: Path) -> None:
    out = small_fs / "events.jsonl"
    filler = small_fs / "filler"
    backend = FileBackend(out)
    batches = {f"b{k}": runs(k * 10, 10) for k in range(12)}
    fill(filler, leave=24 * 1024)

    delivered: list[str] = []
    failed: list[str] = []
    reasons: list[str] = []
    for batch_id, batch in batches.items():
        before = out.stat().st_size if out.exists() else 0
        try:
            backend.deliver(batch, ctx(batch_id))
        except TransientDeliveryError as exc:
            reasons.append(str(exc))
            failed.append(batch_id)
            # the failed append was cut back exactly: no torn line, no half batch
            assert (out.stat().st_size if out.exists() else 0) == before
        else:
            delivered.append(batch_id)
        whole_lines(out)
        journal = backend.journal_path.read_bytes() if backend.journal_path.exists() else b""
        assert not journal or journal.endswith(b"\n"), "a torn journal line"
    assert delivered, "some batches fit before the disk filled up"
    assert len(failed) >= 2, "the disk filled up part-way"
    assert all("file system is full" in reason for reason in reasons)
    got = [rec["stream_id"] for rec in whole_lines(out)]
    assert len(got) == 10 * len(delivered) == len(set(got))

    filler.unlink()  # space freed: the retries go in, each once
    for batch_id in failed:
        backend.deliver(batches[batch_id], ctx(batch_id))
    for batch_id in delivered[:2]:  # a retry of a batch that made it is not appended again
        backend.deliver(batches[batch_id], ctx(batch_id))
    final = [str(rec["stream_id"]) for rec in whole_lines(out)]
    assert sorted(final) == sorted(run.event.stream_id for b in batches.values() for run in b)


def test_a_full_disk_pauses_the_pipeline_and_it_resumes(
    small_fs: Path, redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    out = small_fs / "events.jsonl"
    filler = small_fs / "filler"
    settings, app, _ = make(
        redis_url, tmp_path, DISPATCH_FILE_PATH=str(out), DISPATCH_BATCH_SIZE="20"
    )
    fill(filler, leave=16 * 1024)
    total = 200
    xadd_all(r, "llm-proxy-events", [event(i, content="z" * 300) for i in range(total)])
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: stats.read(r, "file")["retries"] >= 2, what="appends failing (ENOSPC)")
        assert len(whole_lines(out)) < total
        filler.unlink()
        wait_for(lambda: len(jsonl(out)) >= total, timeout=60, what="every event in the file")
        wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="batches finished")
    ids = [rec["stream_id"] for rec in whole_lines(out)]
    assert len(ids) == total == len(set(ids))  # no event lost, none twice
    assert r.xlen(c.deadletter_key("file")) == 0
