"""Fault 7: the disk of the file backend fills up.

``DISPATCH_FILE_PATH`` lives on a 512 KiB tmpfs mounted by the test (root needed; skipped
otherwise, failed under CI=true). A filler takes every free block; the next appends hit
ENOSPC (some after writing part of a batch into the last page). ENOSPC must be transient
(no dead letter), no torn or partial line may remain in the file while the disk is full,
and delivery resumes, each event exactly once, when space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from dispatch_celery import constants as c
from dispatch_celery import stats
from tests.conftest import need_server
from tests.faults.kit import (
    Figures,
    Lab,
    Producer,
    Stack,
    account,
    dead_letters,
    file_counts,
    settle,
    wait_resumed,
)

# One xdist worker runs the fault scenarios one after another: they time real outages.
pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults")]

DISK = "512k"
PARTIAL_GRACE_S = 1.0  # an append in progress may show part of a line for a moment


@contextlib.contextmanager
def small_disk(where: Path) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        need_server(f"a tmpfs mount (root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(path: Path) -> int:
    """Write ``path`` until the disk is full; returns the bytes written."""
    written = 0
    with path.open("wb", buffering=0) as f:
        for size in (65536, 4096, 512, 1):
            chunk = b"\0" * size
            while True:
                try:
                    n = f.write(chunk)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
                written += n or 0
                if not n:
                    break
    return written


def _partial_tail(path: Path) -> bytes:
    """What follows the last newline (a torn line), and any invalid complete line."""
    data = path.read_bytes() if path.exists() else b""
    for line in data[: data.rfind(b"\n") + 1].splitlines():
        try:
            orjson.loads(line)
        except orjson.JSONDecodeError:
            return line
    return data[data.rfind(b"\n") + 1 :]


def scenario(lab: Lab, *, full_s: float = 5.0) -> Figures:
    fig = lab.figures_for("disk-full", full_s)
    with small_disk(lab.tmp / "disk") as disk:
        out = disk / "events.jsonl"
        filler = disk / "filler"
        env = lab.env(DISPATCH_BATCH_SIZE="20", DISPATCH_FILE_PATH=str(out))
        stack = Stack(env, lab.tmp)
        producer = Producer(lab.redis_url, 1.0)
        r = lab.client()
        try:
            stack.bridge("file")
            stack.worker("file", concurrency=1)
            producer.burst(50)
            stack.wait(lambda: len(file_counts(out)) >= 50, 30, "the first 50 delivered")
            fig.extra["filler_bytes"] = fill(filler)
            full_at = time.monotonic()
            producer.burst(100)
            stack.wait(
                lambda: (
                    "No space left" in stack.text("worker")
                    or stats.read(r, "file").get("retries", 0) > 0
                ),
                30,
                "an append to fail with ENOSPC",
            )
            partial_since: float | None = None
            while time.monotonic() - full_at < full_s:
                tail = _partial_tail(out)
                if not tail:
                    partial_since = None
                elif partial_since is None:
                    partial_since = time.monotonic()
                else:
                    assert time.monotonic() - partial_since < PARTIAL_GRACE_S, (
                        f"a torn line stays in the file while the disk is full: {tail[:80]!r}"
                    )
                time.sleep(0.1)
            assert not dead_letters(r, "file"), "ENOSPC dead-lettered events: it is transient"
            stack.assert_running()
            filler.unlink()
            fig.fault_s = round(time.monotonic() - full_at, 1)
            fig.resume_s = wait_resumed(lambda: len(file_counts(out)), 60, stack)
            published = producer.published()
            settle(lambda: set(file_counts(out)) >= set(published), timeout=60, stack=stack)
            settle(lambda: r.hlen(c.inflight_key("file")) == 0, timeout=20, stack=stack)
            stack.assert_running()
            got = file_counts(out)
            account(fig, published, got, dead_letters(r, "file"))
            assert max(got.values()) == 1, "an event was appended twice"
            assert not _partial_tail(out), "a torn line remains"
            assert os.path.getsize(out) > 0
        finally:
            producer.close()
            r.close()
            stack.close()
    return fig


def test_a_full_disk_is_transient_leaves_no_torn_line_and_resumes(lab: Lab) -> None:
    scenario(lab)
