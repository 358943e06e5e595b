"""Prometheus metrics: cluster-wide figures read from Redis at scrape time, per service."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.ops.metrics import build_registry, serve
from dispatch_celery.settings import Settings, load_settings
from tests.conftest import free_port
from tests.harness import bridge, event, jsonl, make, wait_for, worker, xadd_all

STREAM = "llm-proxy-events"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@contextmanager
def exporter(settings: Settings) -> Iterator[str]:
    """``dispatch metrics``' server (``serve``) in a thread; yields its /metrics URL."""
    stop = threading.Event()
    ready = threading.Event()
    where: list[int] = []

    def on_ready(host: str, port: int) -> None:
        where.append(port)
        ready.set()

    t = threading.Thread(
        target=serve,
        args=(settings, stop),
        kwargs={"address": "127.0.0.1", "port": free_port(), "on_ready": on_ready},
        daemon=True,
    )
    t.start()
    assert ready.wait(15), "metrics server did not start"
    try:
        yield f"http://127.0.0.1:{where[0]}/metrics"
    finally:
        stop.set()
        t.join(10)
    assert not t.is_alive()


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 (a local test URL)
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_count_what_the_pipeline_did(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path, DISPATCH_BATCH_SIZE="10")
    datas = [event(i, method="GET" if i % 5 == 0 else "POST") for i in range(40)]
    xadd_all(r, STREAM, datas)
    r.xadd(STREAM, {"data": b"not json at all"})
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 32, what="32 delivered")
        wait_for(lambda: r.xlen(c.deadletter_key("file")) == 1, what="1 dead letter")
        wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="all batches finished")
        with exporter(settings) as url:
            m = scrape(url)
    assert get(m, "dispatch_redis_up") == 1
    assert get(m, "dispatch_events_delivered_total", service="file") == 32
    assert get(m, "dispatch_events_dead_lettered_total", service="file") == 1
    assert get(m, "dispatch_events_malformed_total", service="file") == 1
    assert get(m, "dispatch_events_filtered_total", service="file", reason="filter") == 8
    assert get(m, "dispatch_events_filtered_total", service="file", reason="sample") == 0
    assert get(m, "dispatch_events_enqueued_total", service="file") == 41
    assert get(m, "dispatch_delivery_retries_total", service="file") == 0
    assert get(m, "dispatch_stream_trimmed_unread_total", service="file") == 0
    for quiet in ("dead_letters_trimmed", "batches_lost", "xack_failed", "attempts_gated"):
        assert get(m, f"dispatch_{quiet}_total", service="file") == 0
    assert get(m, "dispatch_stream_lag", service="file") == 0
    assert get(m, "dispatch_stream_pending", service="file") == 0
    assert get(m, "dispatch_queue_depth", service="file") == 0
    assert get(m, "dispatch_batches_in_flight", service="file") == 0
    assert get(m, "dispatch_dead_letters", service="file") == 1
    assert get(m, "dispatch_bridges", service="file") == 1
    # the latency histogram: one observation per delivered event, cumulative buckets
    assert get(m, "dispatch_delivery_latency_seconds_count", service="file") == 32
    assert get(m, "dispatch_delivery_latency_seconds_bucket", service="file", le="+Inf") == 32
    assert get(m, "dispatch_delivery_latency_seconds_sum", service="file") > 0
    bounds = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in m.items()
        if name == "dispatch_delivery_latency_seconds_bucket" and dict(labels)["service"] == "file"
    )
    assert [v for _, v in bounds] == sorted(v for _, v in bounds)
    # installed backends are listed even before they have any state
    assert get(m, "dispatch_events_delivered_total", service="helicone") == 0
    assert get(m, "dispatch_events_delivered_total", service="lunary") == 0


def test_metrics_show_a_backlog_while_workers_are_away(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(redis_url, tmp_path, DISPATCH_BATCH_SIZE="10")
    xadd_all(r, STREAM, [event(i) for i in range(30)])
    with bridge(settings, app, "file"):  # batches enqueued, no worker to take them
        wait_for(lambda: r.hlen(c.inflight_key("file")) == 3, what="3 batches in flight")
    # the producer keeps writing while no bridge reads: lag; and a service found only in
    # Redis (a group of a service that is not installed) is reported too
    xadd_all(r, STREAM, [event(i) for i in range(30, 45)])
    r.xgroup_create(STREAM, "dispatch-archive2", id="0")
    with exporter(settings) as url:
        m = scrape(url)
    assert get(m, "dispatch_batches_in_flight", service="file") == 3
    assert get(m, "dispatch_bytes_in_flight", service="file") > 0
    assert get(m, "dispatch_queue_depth", service="file") == 3
    assert get(m, "dispatch_stream_lag", service="file") == 15
    assert get(m, "dispatch_events_enqueued_total", service="file") == 30
    assert get(m, "dispatch_events_delivered_total", service="file") == 0
    assert get(m, "dispatch_stream_lag", service="archive2") == 45
    assert get(m, "dispatch_bridges", service="file") == 0


def test_a_scrape_without_redis_says_so_instead_of_failing(tmp_path: Path) -> None:
    settings = load_settings({"DISPATCH_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=1)
    from prometheus_client import generate_latest

    text = generate_latest(build_registry(settings, client, services=["file"])).decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples == {"dispatch_redis_up": 0.0}


def test_every_counter_the_pipeline_keeps_is_exported(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """Each stats counter reaches the scrape with its value (none is kept in Redis only)."""
    from dispatch_celery.stats import Counter

    settings, _, _ = make(redis_url, tmp_path)
    values = {counter: i + 1 for i, counter in enumerate(Counter)}
    stats.add(r, "file", values)
    with exporter(settings) as url:
        m = scrape(url)
    exported = [
        value
        for (name, labels), value in m.items()
        if name.endswith("_total") and ("service", "file") in labels
    ]
    for counter, value in values.items():  # each counter's value is unique
        assert value in exported, f"{counter.value} is not exported"
