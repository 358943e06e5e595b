"""The batch blob codec: zstd-compressed blobs, and the uncompressed blobs of earlier
versions still readable (batches in flight across an upgrade)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from dispatch_celery import constants as c
from dispatch_celery.batches.codec import (
    Entry,
    decode,
    encode,
    encode_record,
    entry_from_fields,
    raw_size,
)
from dispatch_celery.cli.sample import sample_events
from tests.harness import bridge, event, jsonl, make, wait_for, worker

STREAM = "llm-proxy-events"


def _entries(datas: list[bytes]) -> list[Entry]:
    return [Entry(f"1736937000123-{i}", d) for i, d in enumerate(datas)]


def test_round_trip_keeps_every_entry_exactly() -> None:
    entries = [
        Entry("1-0", b'{"RequestID":"a"}'),
        Entry("1-1", b""),  # empty data is data, not "no data"
        Entry("1-2", None, b'{"other":"field"}'),  # no data field: kept for the dead letter
        Entry("2-0", "é ü \u2603 \x00 bytes".encode()),
    ]
    blob = encode(STREAM, "dispatch-file", entries)
    assert blob[:4] == b"DCZ1"
    batch = decode(blob)
    assert batch.stream == STREAM and batch.group == "dispatch-file"
    assert batch.entries == entries
    replay = decode(encode("events-b", "", entries[:1]))  # a replay batch: no group
    assert replay.stream == "events-b" and replay.group == "" and replay.entries == entries[:1]


def test_blobs_of_the_previous_format_still_decode() -> None:
    """A DCB1 blob (what earlier versions stored) in flight during an upgrade."""
    entries = _entries(list(sample_events(20)))
    old = encode_record(STREAM, "dispatch-file", entries)
    assert old[:4] == b"DCB1"
    assert (
        decode(old).entries == entries == decode(encode(STREAM, "dispatch-file", entries)).entries
    )


def test_realistic_batches_compress_several_times() -> None:
    entries = _entries(list(sample_events(100)))
    blob = encode(STREAM, "dispatch-file", entries)
    ratio = raw_size(entries) / len(blob)
    assert ratio > 4, f"sample batch compressed only {ratio:.1f}x"
    # the level is a parameter (the benchmark compares levels); every level decodes
    for level in (1, 3):
        assert decode(encode(STREAM, "g", entries, level=level)).entries == entries


def test_spec_vectors_round_trip(vectors: dict[str, dict[str, Any]]) -> None:
    datas = [v["xadd_fields"]["data"].encode() for v in vectors.values()]
    entries = _entries(datas)
    blob = encode(STREAM, "dispatch-file", entries)
    assert decode(blob).entries == entries
    assert len(blob) < len(encode_record(STREAM, "dispatch-file", entries))


def test_garbage_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="not a dispatch-celery batch blob"):
        decode(b"nonsense")
    with pytest.raises(ValueError, match="corrupt"):
        decode(b"DCZ1" + b"\x28\xb5\x2f\xfd garbage")
    truncated = encode(STREAM, "g", _entries([b"x" * 5000]))[:-8]
    with pytest.raises(ValueError, match="corrupt"):
        decode(truncated)


def test_an_uncompressed_blob_in_flight_across_the_upgrade_is_delivered(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """A batch an earlier version stored (DCB1, sized as a plain number) is delivered by
    this version's bridge and worker, and its accounting is released."""
    # not in the due index (an earlier version had none): published after the queue lease
    settings, app, _ = make(redis_url, tmp_path, DISPATCH_QUEUE_LEASE="2")
    entries = [Entry(f"1736937000123-{i}", event(i)) for i in range(5)]
    old = encode_record(STREAM, "", entries)
    r.set(c.batch_key("file", "old-batch"), old)
    r.hset(c.inflight_key("file"), "old-batch", len(old))  # an earlier version's value
    r.incrby(c.inflight_bytes_key("file"), len(old))
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 5, timeout=60, what="delivery")
        wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="accounting released")
    assert int(r.get(c.inflight_bytes_key("file")) or 0) == 0
    assert not r.exists(c.batch_key("file", "old-batch"))


def test_entries_from_redis_field_lists_and_from_dicts_agree() -> None:
    """The bridge reads fields as Redis sends them; every shape gives the same entry."""
    assert entry_from_fields(b"1-0", [b"data", b"x"]) == Entry("1-0", b"x")
    assert entry_from_fields(b"1-0", {b"data": b"x"}) == Entry("1-0", b"x")
    # more fields than data: data still wins; a repeated name keeps its last value
    assert entry_from_fields(b"1-0", [b"a", b"1", b"data", b"y"]).data == b"y"
    assert entry_from_fields("1-0", [b"data", b"x", b"data", b"z"]).data == b"z"
    # no data field: the other fields kept as JSON for the dead letter, either shape
    listed = entry_from_fields(b"1-1", [b"a", b"1", b"b", b"\xff"])
    mapped = entry_from_fields(b"1-1", {b"a": b"1", b"b": b"\xff"})
    assert listed == mapped and listed.data is None
    assert listed.other == b'{"a":"1","b":"\\\\xff"}'
