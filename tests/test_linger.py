"""The bridge's flush decision: a partial batch waits the linger once the bridge has caught
up (quiet traffic is fast), the flush interval while reads come back full (busy traffic
fills batches); a batch is full at its entry count or its byte cap."""

from __future__ import annotations

import random
import time

import redis

from dispatch_celery.batches.codec import Entry
from dispatch_celery.ingest.bridge import Bridge
from dispatch_celery.ingest.enqueue import RecordingEnqueuer
from dispatch_celery.ingest.streamset import StreamBuffers
from dispatch_celery.settings import Settings

STREAM = "llm-proxy-events"


def add(r: redis.Redis, n: int) -> None:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(STREAM, {"data": b'{"RequestID":"r%d"}' % i})
    pipe.execute()


def test_a_quiet_stream_is_flushed_after_the_linger_not_the_interval(
    r: redis.Redis, settings: Settings
) -> None:
    s = settings.with_overrides(flush_interval=30.0, flush_linger=0.05)
    rec = RecordingEnqueuer()
    bridge = Bridge(s, "file", rec, consumer="c1", client=r)
    bridge.start()
    add(r, 3)
    started = time.monotonic()
    while not rec.tasks and time.monotonic() - started < 5:
        bridge.step()
    assert [events for _, events, _ in rec.tasks] == [3]
    assert time.monotonic() - started < 2  # the linger, not the 30 s interval
    assert bridge.flush_wait() == 0.05


def test_while_reads_come_back_full_batches_fill_up(r: redis.Redis, settings: Settings) -> None:
    s = settings.with_overrides(
        flush_interval=30.0, flush_linger=0.05, batch_size=100, read_count=100
    )
    rec = RecordingEnqueuer()
    bridge = Bridge(s, "file", rec, consumer="c1", client=r)
    add(r, 250)
    bridge.start()
    bridge.step()  # a full read: behind, so nothing partial may go out
    assert bridge.behind and bridge.flush_wait() == 30.0
    started = time.monotonic()
    while sum(events for _, events, _ in rec.tasks) < 250 and time.monotonic() - started < 5:
        bridge.step()
    assert [events for _, events, _ in rec.tasks] == [100, 100, 50]


def sizes(taken: list[tuple[str, list[list[Entry]]]]) -> list[list[int]]:
    return [[len(e.data or b"") for e in batch] for _, batches in taken for batch in batches]


def test_batches_are_cut_at_the_byte_cap_too() -> None:
    buf = StreamBuffers()
    buf.add("s", [Entry(f"1-{i}", b"x" * n) for i, n in enumerate([3, 3, 3, 3, 9, 1])])
    # [3,3] is closed by the next entry, [3,3] too, 9 is over the cap alone; [1] waits.
    assert sizes(buf.take(100, 60, force=False, max_bytes=7)) == [[3, 3], [3, 3], [9]]
    assert len(buf) == 1
    assert sizes(buf.take(100, 60, force=True, max_bytes=7)) == [[1]]


def test_a_batch_at_the_byte_cap_is_full_and_entries_without_data_count_too() -> None:
    buf = StreamBuffers()
    buf.add("s", [Entry("1-0", b"x" * 4), Entry("1-1", None, b'{"a":"b"}'), Entry("1-2", b"y")])
    taken = buf.take(100, 60, force=False, max_bytes=13)  # 4 + 9 = 13: full
    assert [[e.entry_id for e in b] for _, bs in taken for b in bs] == [["1-0", "1-1"]]
    assert len(buf) == 1


def test_without_a_byte_cap_the_count_alone_cuts_as_before() -> None:
    rng = random.Random(5)
    for _ in range(200):
        entries = [Entry(f"1-{i}", b"x" * rng.randrange(5)) for i in range(rng.randrange(30))]
        size, force = rng.randrange(1, 8), rng.random() < 0.5
        a, b = StreamBuffers(), StreamBuffers()
        a.add("s", entries)
        b.add("s", entries)
        assert sizes(a.take(size, 60, force=force)) == sizes(
            b.take(size, 60, force=force, max_bytes=1 << 30)
        )
        assert len(a) == len(b)
