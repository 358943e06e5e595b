"""The in-flight buffer: compressed and raw bytes counted, the high-water mark in compressed
bytes, the intake rate and how long the buffer lasts, `dispatch health` failing before the
buffer is full, the figures in status and metrics."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import redis
from click.testing import CliRunner
from prometheus_client import generate_latest

from dispatch_celery import constants as c
from dispatch_celery.batches.buffer import IntakeMeter, read_buffer
from dispatch_celery.batches.codec import Entry, encode, raw_size
from dispatch_celery.batches.state import BatchStore
from dispatch_celery.cli.ops import health
from dispatch_celery.cli.sample import sample_events
from dispatch_celery.ops.health import check_health
from dispatch_celery.ops.metrics import build_registry
from dispatch_celery.ops.status import format_status, service_status
from dispatch_celery.settings import Settings, load_settings
from tests.harness import bridge, jsonl, make, wait_for, worker, xadd_all

STREAM = "llm-proxy-events"


def stage(r: redis.Redis, n_batches: int, per_batch: int = 100) -> tuple[int, int]:
    """Store batches of sample events as a bridge does; (compressed, raw) bytes staged."""
    store = BatchStore(r, "file")
    datas = list(sample_events(n_batches * per_batch))
    comp = raw = 0
    items = []
    for b in range(n_batches):
        entries = [Entry(f"{b + 1}-{i}", d) for i, d in enumerate(datas[b * 100 : b * 100 + 100])]
        blob = encode(STREAM, "dispatch-file", entries)
        items.append((f"b{b}", blob, raw_size(entries)))
        comp += len(blob)
        raw += raw_size(entries)
    store.stage_many(items, "test-bridge", 60.0)
    return comp, raw


def test_both_sizes_are_counted_and_the_mark_is_in_compressed_bytes(r: redis.Redis) -> None:
    comp, raw = stage(r, 3)
    assert raw > 4 * comp  # sample events compress well
    settings = load_settings({"DISPATCH_HIGH_WATER_BATCHES": "10"})
    buf = read_buffer(r, "file", settings)
    assert (buf.batches, buf.compressed_bytes, buf.raw_bytes) == (3, comp, raw)
    assert buf.high_water_batches == 10 and buf.high_water_bytes == c.DEFAULT_HIGH_WATER_BYTES
    assert abs(buf.fill - 0.3) < 1e-9 and buf.ratio is not None and buf.ratio > 4
    assert buf.intake_eps is None and buf.seconds_to_full is None  # no live bridge
    # the bytes mark counts compressed bytes: raw bytes above it do not fill the buffer
    by_bytes = read_buffer(r, "file", load_settings({"DISPATCH_HIGH_WATER_BYTES": str(raw)}))
    assert by_bytes.fill < 0.5


def test_the_intake_rate_and_the_time_to_full(r: redis.Redis) -> None:
    meter = IntakeMeter()
    r.xadd(STREAM, {"data": b"x"})
    meter.observe(r, [STREAM], read_total=0)
    xadd_all(r, STREAM, [b"x"] * 200)
    time.sleep(0.2)
    meter.observe(r, [STREAM], read_total=150)
    assert meter.intake_eps is not None and meter.intake_eps > 0
    assert meter.read_eps is not None and meter.read_eps > 0
    meter.staged(events=100, compressed=25_000, raw=200_000)
    settings = load_settings(
        {"DISPATCH_HIGH_WATER_BATCHES": "1000", "DISPATCH_HIGH_WATER_BYTES": "1000000"}
    )
    beat = {**meter.heartbeat(settings), "intake_eps": 100.0, "age_s": 1.0}
    assert beat["events_per_batch"] == 100 and beat["compressed_per_event"] == 250
    buf = read_buffer(r, "file", load_settings({}), [beat])
    # the bridge's marks win over this process' defaults; 1 MB at 250 B/event, 100 events/s
    assert buf.high_water_bytes == 1_000_000 and buf.intake_eps == 100.0
    assert buf.seconds_to_full is not None and abs(buf.seconds_to_full - 40.0) < 1e-6
    stale = {**beat, "age_s": c.HEARTBEAT_TTL_S + 1}  # a dead bridge's figures are ignored
    assert read_buffer(r, "file", settings, [stale]).intake_eps is None


def test_health_fails_before_the_buffer_is_full(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    env = {"DISPATCH_REDIS_URL": redis_url, "DISPATCH_HIGH_WATER_BATCHES": "5"}
    settings = load_settings(env)
    stage(r, 3)  # 60 %: fine
    report = check_health(settings, services=["file"], only=["buffer"])
    (check,) = [ch for ch in report.checks if ch.name == "buffer"]
    assert check.status == "ok" and report.healthy, check.detail
    assert "60 % full" in check.detail and "3 of 5 batches" in check.detail
    r.flushall()
    stage(r, 4)  # 80 %: the default threshold
    result = CliRunner().invoke(
        health, ["--json", "--service", "file", "--only", "buffer"], env=env
    )
    assert result.exit_code == 1, result.output
    (check_json,) = [ch for ch in orjson.loads(result.output)["checks"] if ch["name"] == "buffer"]
    assert check_json["status"] == "fail" and "80 % full (max 80 %)" in check_json["detail"]
    assert "stops reading" in check_json["detail"]
    env["DISPATCH_HEALTH_MAX_BUFFER"] = "90"  # configurable (per service too)
    report = check_health(load_settings(env), services=["file"], only=["buffer"])
    assert report.healthy
    env["DISPATCH_FILE_HEALTH_MAX_BUFFER"] = "50"
    assert not check_health(load_settings(env), services=["file"], only=["buffer"]).healthy


def test_health_warns_when_redis_could_not_hold_a_full_buffer(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    saved = str(r.config_get("maxmemory")["maxmemory"])
    r.config_set("maxmemory", str(1024**3))
    try:
        settings = load_settings({"DISPATCH_REDIS_URL": redis_url})  # 4 GiB mark by default
        report = check_health(settings, services=["file"], only=["buffer"])
    finally:
        r.config_set("maxmemory", saved)
    (check,) = [ch for ch in report.checks if ch.name == "buffer"]
    assert check.status == "warn" and "maxmemory" in check.detail and report.healthy


def test_status_and_metrics_show_the_buffer(r: redis.Redis) -> None:
    comp, raw = stage(r, 2)
    settings = Settings()
    status = service_status(r, STREAM, "file", settings=settings)
    assert (status.batches_in_flight, status.bytes_in_flight) == (2, comp)
    assert status.raw_bytes_in_flight == raw
    doc = status.as_json()
    assert doc["buffer"]["compressed_bytes"] == comp and doc["buffer"]["raw_bytes"] == raw
    assert doc["buffer"]["high_water_bytes"] == c.DEFAULT_HIGH_WATER_BYTES
    lines = format_status([status])
    assert any(line.startswith("  buffer: 2/50000 batches") for line in lines), lines
    text = generate_latest(build_registry(settings, r, services=["file"])).decode()
    assert f'dispatch_bytes_in_flight{{service="file"}} {float(comp)}' in text
    assert f'dispatch_raw_bytes_in_flight{{service="file"}} {float(raw)}' in text
    assert 'dispatch_buffer_fill_ratio{service="file"} 4e-05' in text


def test_a_running_bridge_reports_intake_and_time_to_full(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    """End to end: a real bridge measures the producer's rate and stages compressed blobs;
    `dispatch status --json` shows both sizes and the estimate."""
    settings, app, _ = make(redis_url, tmp_path, DISPATCH_BATCH_SIZE="50")
    with bridge(settings, app, "file"):  # no worker: batches stay in flight
        xadd_all(r, STREAM, list(sample_events(200)))
        wait_for(lambda: r.hlen(c.inflight_key("file")) == 4, what="4 batches in flight")
        xadd_all(r, STREAM, list(sample_events(200, seed=2)))  # intake between beats
        wait_for(lambda: _beat(r).get("intake_eps") not in (None, 0.0), timeout=20, what="intake")
        status = service_status(r, STREAM, "file", settings=settings)
    buf = status.buffer
    assert buf.batches == 8 and buf.raw_bytes > 4 * buf.compressed_bytes > 0
    assert buf.intake_eps is not None and buf.intake_eps > 0
    assert buf.seconds_to_full is not None and buf.seconds_to_full > 0
    with worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) > 0, what="delivery")
        wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="buffer drained")
    after = read_buffer(r, "file", settings)
    assert (after.batches, after.compressed_bytes, after.raw_bytes) == (0, 0, 0)


def _beat(r: redis.Redis) -> dict[str, object]:
    keys = r.keys(c.heartbeat_pattern("file"))
    raw = r.get(keys[0]) if keys else None
    return orjson.loads(raw) if isinstance(raw, bytes) else {}
