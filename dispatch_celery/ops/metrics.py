"""Prometheus metrics: ``dispatch metrics`` serves them on ``DISPATCH_METRICS_PORT`` (9808).

Every figure is cluster-wide and read from Redis *at scrape time* by a custom collector:
the counters live in Redis (``stats.py``; every prefork child on every host adds to the
same hash), so one exporter for the whole deployment is enough, any number of them agree,
and restarting a worker never resets a counter. Each metric carries a ``service`` label.

========================================  =========  =========================================
metric                                    type       meaning
========================================  =========  =========================================
dispatch_events_delivered_total           counter    runs the backend accepted
dispatch_events_dead_lettered_total       counter    entries written to the dead-letter stream
dispatch_events_malformed_total           counter    ... of which could not be decoded
dispatch_events_filtered_total            counter    events not sent by choice; label
                                                     ``reason``: ``filter`` (the service's
                                                     filter rules) or ``sample`` (sampled out)
dispatch_events_enqueued_total            counter    events the bridges handed to the broker
dispatch_batches_total                    counter    batches finished
dispatch_delivery_retries_total           counter    delivery attempts that were retried
dispatch_stream_trimmed_unread_total      counter    entries the producer trimmed unread
dispatch_dead_letters_trimmed_total       counter    oldest dead letters dropped at the bound
                                                     (DISPATCH_DEADLETTER_MAX_LEN)
dispatch_batches_lost_total               counter    in-flight batches whose blob vanished
                                                     (lost Redis writes, eviction)
dispatch_xack_failed_total                counter    finished batches whose entries could not
                                                     be acknowledged (re-read, then skipped)
dispatch_attempts_gated_total             counter    attempts not made: outage gate closed or
                                                     service paused (credentials)
dispatch_delivery_latency_seconds         histogram  event end (stream entry time) to delivery
dispatch_stream_lag                       gauge      entries the group has not read yet
dispatch_stream_pending                   gauge      read by a bridge, not yet acknowledged
dispatch_queue_depth                      gauge      tasks waiting on the broker queue
dispatch_batches_in_flight                gauge      batches enqueued and not yet finished
dispatch_bytes_in_flight                  gauge      their compressed size, as stored in Redis
                                                     (what DISPATCH_HIGH_WATER_BYTES limits)
dispatch_raw_bytes_in_flight              gauge      their raw (uncompressed event) size
dispatch_buffer_fill_ratio                gauge      in-flight share of the high-water mark
                                                     (0..1, the larger of batches and bytes)
dispatch_buffer_high_water_bytes          gauge      the high-water mark in compressed bytes
dispatch_intake_events_per_second         gauge      the producer's rate, as bridges measure it
dispatch_buffer_seconds_to_full           gauge      time until the high-water mark at that
                                                     rate if nothing were delivered
dispatch_dead_letters                     gauge      entries now in the dead-letter stream
dispatch_bridges                          gauge      bridges with a live heartbeat
dispatch_redis_up                         gauge      1 when Redis answered this scrape (no label)
========================================  =========  =========================================

Services: the installed backends plus any service with state in Redis (a consumer group).
A gauge Redis cannot tell (lag of a group that does not exist yet, depth of a queue not yet
declared) is left out of the scrape rather than reported as 0.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterable, Sequence

import redis
from celery import Celery
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dispatch_celery import stats
from dispatch_celery.app import create_app
from dispatch_celery.ops.status import ServiceStatus, known_services, service_status
from dispatch_celery.registry import installed
from dispatch_celery.settings import Settings
from dispatch_celery.stats import Counter

log = logging.getLogger("dispatch_celery.ops.metrics")

# (metric name without _total, help, stats counter)
_COUNTERS: tuple[tuple[str, str, Counter], ...] = (
    ("dispatch_events_delivered", "Runs the backend accepted.", Counter.DELIVERED),
    ("dispatch_events_dead_lettered", "Entries written to the dead-letter stream.",
     Counter.DEAD_LETTERED),
    ("dispatch_events_malformed", "Entries that could not be decoded (also dead-lettered).",
     Counter.MALFORMED),
    ("dispatch_events_enqueued", "Events the bridges handed to the broker.", Counter.ENQUEUED),
    ("dispatch_batches", "Batches finished (delivered and/or dead-lettered).", Counter.BATCHES),
    ("dispatch_delivery_retries", "Delivery attempts that were retried.", Counter.RETRIES),
    ("dispatch_stream_trimmed_unread",
     "Entries the producer trimmed from the stream before the group read them.",
     Counter.TRIMMED_UNREAD),
    ("dispatch_dead_letters_trimmed",
     "Oldest dead letters dropped at the stream's bound (DISPATCH_DEADLETTER_MAX_LEN).",
     Counter.DEAD_LETTERS_TRIMMED),
    ("dispatch_batches_lost",
     "In-flight batches whose blob vanished from Redis (lost writes or eviction).",
     Counter.BLOBS_LOST),
    ("dispatch_xack_failed",
     "Finished batches whose stream entries could not be acknowledged.",
     Counter.XACK_FAILED),
    ("dispatch_attempts_gated",
     "Attempts not made while the outage gate was closed or the service paused.",
     Counter.GATED),
)  # fmt: skip


def _seconds_to_full(s: ServiceStatus) -> float | None:
    left = s.buffer.seconds_to_full
    return None if left is None or math.isinf(left) else left


# (metric name, help, value of a ServiceStatus; None: left out of the scrape)
_GAUGES: tuple[tuple[str, str, Callable[[ServiceStatus], float | None]], ...] = (
    ("dispatch_stream_lag", "Stream entries the service's group has not read yet.",
     lambda s: s.lag),
    ("dispatch_stream_pending", "Entries read by a bridge and not yet acknowledged.",
     lambda s: s.pending),
    ("dispatch_queue_depth", "Delivery tasks waiting on the broker queue.",
     lambda s: s.queue_depth),
    ("dispatch_batches_in_flight", "Batches enqueued and not yet delivered or dead-lettered.",
     lambda s: s.batches_in_flight),
    ("dispatch_bytes_in_flight",
     "Compressed bytes of the batches in flight, as stored in Redis (the high-water mark "
     "DISPATCH_HIGH_WATER_BYTES limits them).", lambda s: s.bytes_in_flight),
    ("dispatch_raw_bytes_in_flight", "Raw (uncompressed event) bytes of the batches in flight.",
     lambda s: s.raw_bytes_in_flight),
    ("dispatch_buffer_fill_ratio",
     "In-flight share of the high-water mark, 0..1 (the larger of batches and bytes).",
     lambda s: s.buffer.fill),
    ("dispatch_buffer_high_water_bytes", "The high-water mark, in compressed bytes.",
     lambda s: s.buffer.high_water_bytes),
    ("dispatch_intake_events_per_second",
     "Entries/s the producer adds to the service's streams, as its bridges measure it.",
     lambda s: s.buffer.intake_eps),
    ("dispatch_buffer_seconds_to_full",
     "Seconds until the buffer reaches its high-water mark at the current intake rate if "
     "nothing were delivered.", _seconds_to_full),
    ("dispatch_dead_letters", "Entries currently in the dead-letter stream.",
     lambda s: s.dead_letters),
)  # fmt: skip


class DispatchCollector(Collector):
    """Reads every figure from Redis (and the broker, for queue depths) on each scrape."""

    def __init__(
        self,
        settings: Settings,
        client: redis.Redis,
        app: Celery | None = None,
        services: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.app = app
        self._services = services or self._known

    def _known(self) -> list[str]:
        return known_services(self.client, self.settings.stream, installed(self.settings))

    def describe(self) -> Iterable[Metric]:
        # Nothing to describe up front: registering must not scrape Redis.
        return []

    def collect(self) -> Iterable[Metric]:
        up = GaugeMetricFamily("dispatch_redis_up", "1 when Redis answered this scrape.")
        try:
            families = self._families()
        except redis.RedisError as exc:
            log.warning("scrape failed: cannot read Redis: %s", exc)
            up.add_metric([], 0)
            return [up]
        up.add_metric([], 1)
        return [up, *families]

    def _families(self) -> list[Metric]:
        services = list(self._services())
        counters = {
            name: CounterMetricFamily(name, doc, labels=["service"]) for name, doc, _ in _COUNTERS
        }
        filtered = CounterMetricFamily(
            "dispatch_events_filtered",
            "Events not delivered by choice: reason=filter (the service's filter rules) or "
            "reason=sample (sampled out).",
            labels=["service", "reason"],
        )
        latency = HistogramMetricFamily(
            "dispatch_delivery_latency_seconds",
            "Seconds from the event's end (its stream entry time) to its delivery.",
            labels=["service"],
        )
        gauges = {
            name: GaugeMetricFamily(name, doc, labels=["service"]) for name, doc, _ in _GAUGES
        }
        bridges = GaugeMetricFamily(
            "dispatch_bridges", "Bridges of the service with a live heartbeat.", labels=["service"]
        )
        for service in services:
            status: ServiceStatus = service_status(
                self.client, self.settings.stream, service, app=self.app, settings=self.settings
            )
            figures = status.counters
            for name, _, counter in _COUNTERS:
                counters[name].add_metric([service], figures.get(counter.value, 0))
            filtered.add_metric([service, "filter"], figures.get(Counter.FILTERED.value, 0))
            filtered.add_metric([service, "sample"], figures.get(Counter.SAMPLED_OUT.value, 0))
            buckets, total, _count = stats.read_latency(self.client, service)
            latency.add_metric([service], [(le, float(n)) for le, n in buckets], total)
            for name, _, value_of in _GAUGES:
                value = value_of(status)
                if value is not None:
                    gauges[name].add_metric([service], value)
            bridges.add_metric([service], len(status.bridges))
        return [*counters.values(), filtered, latency, *gauges.values(), bridges]


def build_registry(
    settings: Settings,
    client: redis.Redis,
    app: Celery | None = None,
    services: Sequence[str] = (),
) -> CollectorRegistry:
    """A registry holding only the dispatch collector (no process metrics of the exporter)."""
    registry = CollectorRegistry(auto_describe=False)
    chosen = list(services)
    registry.register(
        DispatchCollector(settings, client, app, (lambda: chosen) if chosen else None)
    )
    return registry


def serve(
    settings: Settings,
    stop: threading.Event,
    *,
    address: str,
    port: int | None = None,
    services: Sequence[str] = (),
    on_ready: Callable[[str, int], None] | None = None,
) -> None:
    """Serve ``/metrics`` until ``stop`` is set (a threaded HTTP server; scrapes run in
    their own threads and share one thread-safe Redis connection pool)."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
    registry = build_registry(settings, client, create_app(settings), services)
    server, thread = start_http_server(port or settings.metrics_port, address, registry)
    host, bound = server.server_address[:2]
    log.info("serving Prometheus metrics on http://%s:%d/metrics", host, bound)
    if on_ready is not None:
        on_ready(str(host), int(bound))
    try:
        stop.wait()
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        client.close()
