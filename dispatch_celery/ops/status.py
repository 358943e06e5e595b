"""Per-service figures for ``dispatch status`` (and the metrics exporter and health).

A service may read several streams (``DISPATCH_STREAM=a,b`` or a pattern, see
``ingest.streamset``): the stream figures (length, lag, pending) are summed over them and
also listed per stream. The buffer figures (in-flight batches, compressed and raw bytes,
the high-water marks, the intake rate and how long the buffer lasts at it) come from
``batches.buffer``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import orjson
import redis
from celery import Celery
from kombu.exceptions import ChannelError

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.batches.buffer import BufferStatus, human_bytes, human_seconds, read_buffer
from dispatch_celery.ingest import streamset
from dispatch_celery.settings import Settings
from dispatch_celery.stats import Counter

log = logging.getLogger("dispatch_celery.ops.status")


@dataclass
class StreamStatus:
    stream: str
    length: int
    group_exists: bool
    lag: int | None  # entries not yet read by the group (None: Redis cannot tell)
    pending: int  # read by a bridge, not yet acknowledged
    trimmed_unread: int = 0  # entries of this stream the producer trimmed before we read them


@dataclass
class ServiceStatus:
    service: str
    group: str
    stream_length: int  # summed over the service's streams
    group_exists: bool  # on every stream
    lag: int | None
    pending: int
    batches_in_flight: int
    bytes_in_flight: int  # compressed bytes stored in Redis (what the high-water mark limits)
    raw_bytes_in_flight: int
    queue_depth: int | None  # tasks waiting on the broker queue
    dead_letters: int
    dead_letters_trimmed: int  # oldest dead letters dropped at DISPATCH_DEADLETTER_MAX_LEN
    trimmed_unread: int
    buffer: BufferStatus
    bridges: list[dict[str, Any]]
    counters: dict[str, int]
    streams: list[StreamStatus] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["buffer"] = self.buffer.as_json()
        return out


def _group_info(client: redis.Redis, stream: str, group: str) -> dict[str, Any] | None:
    try:
        groups = client.xinfo_groups(stream)
    except redis.ResponseError:
        return None
    for g in groups:
        name = g.get("name")
        if (name.decode() if isinstance(name, bytes) else name) == group:
            return g
    return None


def queue_depth(app: Celery | None, service: str) -> int | None:
    """Tasks waiting on the service's broker queue; None when the broker cannot tell."""
    if app is None:
        return None
    try:
        with app.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1)  # a status or scrape must not hang
            try:
                channel: Any = conn.default_channel  # the typed StdChannel lacks queue_declare
                ok = channel.queue_declare(c.queue_name(service), passive=True)
            except ChannelError:
                # kombu's Redis transport keeps a queue as a list that exists only while it
                # holds messages: "no such queue" there means an empty queue.
                return 0 if conn.transport.driver_type == "redis" else None
            return int(ok.message_count)
    except Exception as exc:  # broker unreachable: shown as unknown
        log.warning("cannot read the depth of queue %s: %s", c.queue_name(service), exc)
        return None


def bridges(client: redis.Redis, service: str) -> list[dict[str, Any]]:
    out = []
    for key in client.scan_iter(match=c.heartbeat_pattern(service), count=100):
        raw = cast(bytes | None, client.get(key))
        if raw:
            beat = orjson.loads(raw)
            beat["age_s"] = round(time.time() - float(beat.get("ts", 0)), 1)
            out.append(beat)
    return out


def stream_status(client: redis.Redis, stream: str, group: str) -> StreamStatus:
    info = _group_info(client, stream, group)
    length = int(client.xlen(stream)) if client.type(stream) == b"stream" else 0
    lag: int | None = None
    pending = 0
    if info is not None:
        pending = int(info.get("pending", 0))
        raw_lag = info.get("lag")
        lag = int(raw_lag) if raw_lag is not None else None
        if lag is None and "lag" not in info:  # Redis < 7: count what follows the cursor
            last = info.get("last-delivered-id", b"0-0")
            last_s = last.decode() if isinstance(last, bytes) else str(last)
            lag = len(client.xrange(stream, min=f"({last_s}", max="+", count=100000) or [])
    return StreamStatus(stream, length, info is not None, lag, pending)


def stream_keys(client: redis.Redis, streams: str | Sequence[str]) -> list[str]:
    """The keys a ``DISPATCH_STREAM`` value names now (or the given keys)."""
    return streamset.resolve(client, streams) if isinstance(streams, str) else list(streams)


def service_status(
    client: redis.Redis,
    streams: str | Sequence[str],
    service: str,
    *,
    group: str | None = None,
    app: Celery | None = None,
    settings: Settings | None = None,
) -> ServiceStatus:
    """``streams``: a ``DISPATCH_STREAM`` value (resolved here) or the resolved keys;
    ``settings``: the high-water marks shown when no live bridge reports its own."""
    group = group or c.default_group(service)
    per_stream = [stream_status(client, s, group) for s in stream_keys(client, streams)]
    trimmed = cast(dict[bytes, bytes], client.hgetall(c.trimmed_streams_key(service)))
    for st in per_stream:
        st.trimmed_unread = int(trimmed.get(st.stream.encode(), 0))
    lags = [s.lag for s in per_stream]
    beats = bridges(client, service)
    buffer = read_buffer(client, service, settings or Settings(), beats)
    counters = stats.read(client, service)
    return ServiceStatus(
        service=service,
        group=group,
        stream_length=sum(s.length for s in per_stream),
        group_exists=bool(per_stream) and all(s.group_exists for s in per_stream),
        lag=None if any(lag is None for lag in lags) else sum(cast(list[int], lags)),
        pending=sum(s.pending for s in per_stream),
        batches_in_flight=buffer.batches,
        bytes_in_flight=buffer.compressed_bytes,
        raw_bytes_in_flight=buffer.raw_bytes,
        queue_depth=queue_depth(app, service),
        dead_letters=int(client.xlen(c.deadletter_key(service))),
        dead_letters_trimmed=counters.get(Counter.DEAD_LETTERS_TRIMMED.value, 0),
        trimmed_unread=counters.get(Counter.TRIMMED_UNREAD.value, 0),
        buffer=buffer,
        bridges=beats,
        counters=counters,
        streams=per_stream,
    )


def known_services(
    client: redis.Redis, streams: str | Sequence[str], installed: list[str]
) -> list[str]:
    """Installed backends, plus any service with state in Redis (a group on a stream)."""
    found = set()
    for stream in stream_keys(client, streams):
        try:
            for g in client.xinfo_groups(stream):
                name = g.get("name")
                name = name.decode() if isinstance(name, bytes) else str(name)
                if name.startswith("dispatch-"):
                    found.add(name.removeprefix("dispatch-"))
        except redis.ResponseError:
            pass
    return sorted(found | set(installed))


_COLUMNS = (
    "length", "lag", "pending", "in-flight", "queue", "dead", "trimmed", "delivered",
    "filtered", "bridges",
)  # fmt: skip


def format_status(rows: Sequence[ServiceStatus]) -> list[str]:
    """``dispatch status`` as text: one table row per service, then its buffer line (and
    its streams, when it reads several)."""
    lines = ["".join([f"{'service':<12}", *(f"{h:>10}" for h in _COLUMNS)])]
    for r in rows:
        vals = (
            r.stream_length,
            "-" if r.lag is None else r.lag,
            r.pending,
            r.batches_in_flight,
            "-" if r.queue_depth is None else r.queue_depth,
            r.dead_letters,
            r.trimmed_unread,
            r.counters.get(Counter.DELIVERED.value, 0),
            r.counters.get(Counter.FILTERED.value, 0),
            len(r.bridges),
        )
        lines.append(f"{r.service:<12}" + "".join(f"{v!s:>10}" for v in vals))
        lines.append(f"  buffer: {format_buffer(r.buffer)}")
        if r.dead_letters_trimmed:
            lines.append(
                f"  dead letters dropped at the bound (DISPATCH_DEADLETTER_MAX_LEN): "
                f"{r.dead_letters_trimmed}"
            )
        if len(r.streams) > 1:
            for st in r.streams:
                lag = "-" if st.lag is None else st.lag
                lines.append(
                    f"  stream {st.stream}: length {st.length}, lag {lag}, "
                    f"pending {st.pending}, trimmed {st.trimmed_unread}"
                )
    return lines


def format_buffer(b: BufferStatus) -> str:
    ratio = f"{b.ratio:.1f}x" if b.ratio is not None else "-"
    text = (
        f"{b.batches}/{b.high_water_batches} batches, "
        f"{human_bytes(b.compressed_bytes)}/{human_bytes(b.high_water_bytes)} compressed "
        f"({human_bytes(b.raw_bytes)} raw, {ratio}), {b.fill * 100:.0f} % full"
    )
    if b.intake_eps is None:
        return f"{text}; intake unknown (no live bridge)"
    return (
        f"{text}; intake {b.intake_eps:,.1f} events/s, full in "
        f"{human_seconds(b.seconds_to_full)} if nothing is delivered"
    )
