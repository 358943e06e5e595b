"""Cluster-wide counters of a service, kept in Redis so that every prefork child on every
host adds to the same figures (Prometheus exposition reads them back, see ``metrics``)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import cast

import redis

from dispatch_celery import constants as c

# Upper bounds (seconds) of the delivery-latency histogram: event end -> delivered.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)


class Counter(StrEnum):
    DELIVERED = "delivered"  # runs the backend accepted
    DEAD_LETTERED = "dead_lettered"  # entries written to the dead-letter stream
    MALFORMED = "malformed"  # ... of which could not be decoded
    FILTERED = "filtered"  # events the service's filter excluded
    SAMPLED_OUT = "sampled_out"  # events the sampling rate excluded
    RETRIES = "retries"  # delivery attempts that were retried
    TRIMMED_UNREAD = "trimmed_unread"  # entries the producer trimmed before we read them
    BATCHES = "batches"  # batches finished (delivered and/or dead-lettered)
    ENQUEUED = "enqueued_events"  # events the bridge handed to the broker
    BLOBS_LOST = "blobs_lost"  # batches whose blob vanished from Redis (lost writes, eviction)
    XACK_FAILED = "xack_failed"  # finished batches whose stream entries could not be XACKed
    GATED = "gated"  # attempts not made because the outage gate was closed (or paused)
    DEAD_LETTERS_TRIMMED = "dead_letters_trimmed"  # oldest dead letters dropped at the bound


def add(
    client: redis.Redis,
    service: str,
    counts: Mapping[Counter, int],
    latencies: Iterable[float] = (),
) -> None:
    """Add to the counters (and the latency histogram) in one round trip."""
    pipe = client.pipeline(transaction=False)
    queue_add(pipe, service, counts, latencies)
    if len(pipe):
        pipe.execute()


def queue_add(
    pipe: redis.client.Pipeline,
    service: str,
    counts: Mapping[Counter, int],
    latencies: Iterable[float] = (),
) -> None:
    """Queue the commands of ``add`` on a pipeline the caller executes."""
    key = c.stats_key(service)
    for name, n in counts.items():
        if n:
            pipe.hincrby(key, name.value, n)
    buckets: dict[str, int] = {}
    total = 0.0
    n_lat = 0
    for seconds in latencies:
        i = bisect.bisect_left(LATENCY_BUCKETS_S, seconds)
        label = str(LATENCY_BUCKETS_S[i]) if i < len(LATENCY_BUCKETS_S) else "+Inf"
        buckets[label] = buckets.get(label, 0) + 1
        total += max(seconds, 0.0)
        n_lat += 1
    if n_lat:
        lkey = c.latency_key(service)
        for label, n in buckets.items():
            pipe.hincrby(lkey, label, n)
        pipe.hincrbyfloat(lkey, "sum", total)
        pipe.hincrby(lkey, "count", n_lat)


def read(client: redis.Redis, service: str) -> dict[str, int]:
    raw = cast(dict[bytes, bytes], client.hgetall(c.stats_key(service)))
    out = {name.value: 0 for name in Counter}
    for k, v in raw.items():
        out[k.decode()] = int(v)
    return out


def read_latency(client: redis.Redis, service: str) -> tuple[list[tuple[str, int]], float, int]:
    """Cumulative buckets [(le, count)], sum, count."""
    raw = {
        k.decode(): v.decode()
        for k, v in cast(dict[bytes, bytes], client.hgetall(c.latency_key(service))).items()
    }
    cumulative: list[tuple[str, int]] = []
    running = 0
    for bound in LATENCY_BUCKETS_S:
        running += int(raw.get(str(bound), 0))
        cumulative.append((str(bound), running))
    running += int(raw.get("+Inf", 0))
    cumulative.append(("+Inf", running))
    return cumulative, float(raw.get("sum", 0.0)), int(raw.get("count", 0))
