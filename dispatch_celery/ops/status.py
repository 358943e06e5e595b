"""Per-service figures for ``dispatch status`` (and the metrics exporter)."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, cast

import orjson
import redis
from celery import Celery
from kombu.exceptions import ChannelError

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.batches.state import BatchStore

log = logging.getLogger("dispatch_celery.ops.status")


@dataclass
class ServiceStatus:
    service: str
    group: str
    stream_length: int
    group_exists: bool
    lag: int | None  # entries not yet read by the group (None: Redis cannot tell)
    pending: int  # read by a bridge, not yet acknowledged
    batches_in_flight: int
    bytes_in_flight: int
    queue_depth: int | None  # tasks waiting on the broker queue
    dead_letters: int
    trimmed_unread: int
    bridges: list[dict[str, Any]]
    counters: dict[str, int]

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


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


def service_status(
    client: redis.Redis,
    stream: str,
    service: str,
    *,
    group: str | None = None,
    app: Celery | None = None,
) -> ServiceStatus:
    group = group or c.default_group(service)
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
    batches, size = BatchStore(client, service).in_flight()
    counters = stats.read(client, service)
    return ServiceStatus(
        service=service,
        group=group,
        stream_length=length,
        group_exists=info is not None,
        lag=lag,
        pending=pending,
        batches_in_flight=batches,
        bytes_in_flight=size,
        queue_depth=queue_depth(app, service),
        dead_letters=int(client.xlen(c.deadletter_key(service))),
        trimmed_unread=counters.get("trimmed_unread", 0),
        bridges=bridges(client, service),
        counters=counters,
    )


def known_services(client: redis.Redis, stream: str, installed: list[str]) -> list[str]:
    """Installed backends, plus any service with state in Redis (a group or counters)."""
    found = set()
    try:
        for g in client.xinfo_groups(stream):
            name = g.get("name")
            name = name.decode() if isinstance(name, bytes) else str(name)
            if name.startswith("dispatch-"):
                found.add(name.removeprefix("dispatch-"))
    except redis.ResponseError:
        pass
    return sorted(found | set(installed))
