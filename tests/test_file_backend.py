"""The file backend: one append per batch, fsync, no torn or interleaved lines, retries
and replays never append a batch twice."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import orjson
import pytest

from dispatch_celery.backend import DeliveryContext, Run
from dispatch_celery.backends.file import FileBackend
from dispatch_celery.decode.events import decode_entry
from dispatch_celery.decode.records import build_record
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import load_settings
from tests.harness import event


def runs(start: int, n: int) -> list[Run]:
    out = []
    for i in range(start, start + n):
        ev = decode_entry("llm-proxy-events", f"1700000000000-{i}", event(i))
        out.append(Run(build_record(ev, max_body_bytes=1 << 20), ev))
    return out


def ctx(batch: str, attempt: int = 1) -> DeliveryContext:
    return DeliveryContext(service="file", batch_id=batch, attempt=attempt)


def lines(path: Path) -> list[dict[str, object]]:
    return [orjson.loads(x) for x in path.read_bytes().splitlines()]


def test_a_retried_batch_is_appended_once(tmp_path: Path) -> None:
    b = FileBackend(tmp_path / "out.jsonl")
    batch = runs(0, 5)
    b.deliver(batch, ctx("b1"))
    b.deliver(runs(5, 3), ctx("b2"))
    b.deliver(batch, ctx("b1", attempt=2))  # the worker died before acknowledging
    ids = [rec["stream_id"] for rec in lines(tmp_path / "out.jsonl")]
    assert len(ids) == 8 == len(set(ids))


def test_a_torn_tail_is_cut_before_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    b = FileBackend(path)
    b.deliver(runs(0, 2), ctx("b1"))
    with path.open("ab") as f:  # a crash in the middle of a write
        f.write(b'{"id": "half a li')
    b.deliver(runs(2, 2), ctx("b2"))
    data = path.read_bytes()
    assert data.endswith(b"\n") and b"half a li" not in data
    assert [rec["stream_id"] for rec in lines(path)] == [f"1700000000000-{i}" for i in range(4)]


def test_raw_format_keeps_the_entry_for_replay(tmp_path: Path) -> None:
    b = FileBackend(tmp_path / "raw.jsonl", "raw")
    batch = runs(0, 2)
    b.deliver(batch, ctx("b1"))
    got = lines(tmp_path / "raw.jsonl")
    assert got[0]["stream_id"] == "1700000000000-0"
    assert orjson.loads(str(got[0]["data"])) == orjson.loads(event(0))


def test_rotation_by_size(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    b = FileBackend(path, rotate_bytes=4000)
    for k in range(6):
        b.deliver(runs(k * 3, 3), ctx(f"b{k}"))
    rotated = sorted(tmp_path.glob("out.jsonl.[0-9]"))
    assert rotated, "expected rotated files"
    total = sum(len(lines(p)) for p in [path, *rotated])
    assert total == 18
    assert path.stat().st_size <= 4000


def test_a_batch_retried_after_a_rotation_is_not_appended_again(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    b = FileBackend(path, rotate_bytes=4000)
    first = runs(0, 3)
    b.deliver(first, ctx("b1"))
    k = 1
    while not (tmp_path / "out.jsonl.1").exists():  # the next batches rotate b1 away
        b.deliver(runs(k * 3, 3), ctx(f"b{k + 1}"))
        k += 1
    b.deliver(first, ctx("b1", attempt=2))  # its worker died before acknowledging
    b.deliver(runs((k - 1) * 3, 3), ctx(f"b{k}", attempt=2))  # and the one just after
    files = [path, *sorted(tmp_path.glob("out.jsonl.[0-9]"))]
    ids = [rec["stream_id"] for p in files for rec in lines(p)]
    assert len(ids) == 3 * k == len(set(ids))
    assert not (tmp_path / "out.jsonl.batches.1").exists()  # the journal stayed put


def test_a_torn_journal_line_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    b = FileBackend(path)
    b.deliver(runs(0, 2), ctx("b1"))
    with b.journal_path.open("ab") as j:  # a crash in the middle of a journal write
        j.write(b"file/b2 0123456789abcdef 12")
    b.deliver(runs(2, 2), ctx("b2"))
    b.deliver(runs(2, 2), ctx("b2", attempt=2))
    assert [rec["stream_id"] for rec in lines(path)] == [f"1700000000000-{i}" for i in range(4)]


def test_a_batch_journaled_by_an_earlier_version_is_not_appended_again(tmp_path: Path) -> None:
    """Journal lines of earlier versions carry a blake2b digest: a batch written before an
    upgrade and retried after it is still recognised."""
    import hashlib

    path = tmp_path / "out.jsonl"
    b = FileBackend(path)
    batch = runs(0, 3)
    payload = b"".join(b.line(run) for run in batch)
    path.write_bytes(payload)  # what the earlier version appended, and journaled like this:
    st = path.stat()
    legacy = hashlib.blake2b(payload, digest_size=16).hexdigest()
    b.journal_path.write_text(f"file/b1 {legacy} {st.st_dev}:{st.st_ino} 0 {len(payload)}\n")
    b.deliver(batch, ctx("b1", attempt=2))
    assert len(lines(path)) == 3
    b.deliver(runs(3, 2), ctx("b2"))
    b.deliver(runs(3, 2), ctx("b2", attempt=2))  # and this version's digest line too
    assert [rec["stream_id"] for rec in lines(path)] == [f"1700000000000-{i}" for i in range(5)]


def test_a_batch_whose_bytes_changed_is_appended_again(tmp_path: Path) -> None:
    """Same batch, other bytes (the rules changed between attempts): what is in the file
    is not what this attempt delivers, so it goes in; nothing is skipped on a tag alone."""
    path = tmp_path / "out.jsonl"
    b = FileBackend(path)
    b.deliver(runs(0, 2), ctx("b1"))
    b.deliver(runs(0, 3), ctx("b1", attempt=2))
    assert len(lines(path)) == 5


def _writer(path: str, k: int) -> None:
    b = FileBackend(Path(path))
    for j in range(20):
        b.deliver(runs(k * 1000 + j * 25, 25), ctx(f"w{k}-{j}"))


def test_concurrent_processes_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    procs = [multiprocessing.Process(target=_writer, args=(str(path), k)) for k in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = lines(path)  # every line parses: none torn, none interleaved
    assert len(got) == 4 * 20 * 25 == len({rec["stream_id"] for rec in got})


def test_config_errors_name_the_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="DISPATCH_FILE_FORMAT"):
        FileBackend.from_settings("file", load_settings({"DISPATCH_FILE_FORMAT": "xml"}))
    with pytest.raises(ConfigError, match="DISPATCH_FILE_PATH"):
        FileBackend.from_settings(
            "file", load_settings({"DISPATCH_FILE_PATH": str(tmp_path / "missing" / "x.jsonl")})
        )
    ok = FileBackend.from_settings(
        "file", load_settings({"DISPATCH_FILE_PATH": str(tmp_path / "x.jsonl")})
    )
    assert ok.path == tmp_path / "x.jsonl" and os.access(tmp_path, os.W_OK)
