"""The dead-letter stream's size bound: exact trimming, the overflow counted (atomically,
also inside the worker's transaction), shown by status and metrics, logged as a warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import redis

from dispatch_celery import constants as c
from dispatch_celery import stats
from dispatch_celery.delivery.deadletters import DeadLetters, NewDeadLetter
from dispatch_celery.ops.metrics import build_registry
from dispatch_celery.ops.status import format_status, service_status
from dispatch_celery.settings import load_settings
from dispatch_celery.stats import Counter
from tests.harness import bridge, make, wait_for, worker, xadd_all, xrange

STREAM = "llm-proxy-events"


def _letters(n: int, start: int = 0) -> list[NewDeadLetter]:
    return [NewDeadLetter(f"reason {i}", f"data {i}".encode(), f"1-{i}") for i in range(start, n)]


def test_the_bound_trims_exactly_and_counts_what_it_dropped(
    r: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    dl = DeadLetters(r, "file", max_len=10)
    assert dl.add(_letters(6), stream=STREAM, batch_id="b1", attempts=1) == 0
    assert dl.count() == 6 and stats.read(r, "file")[Counter.DEAD_LETTERS_TRIMMED.value] == 0
    with caplog.at_level(logging.WARNING, logger="dispatch_celery.delivery.deadletters"):
        assert dl.add(_letters(25, 6), stream=STREAM, batch_id="b2", attempts=3) == 15
    assert dl.count() == 10  # exact, not approximate trimming
    kept = [d.stream_id for d in dl.iter()]
    assert kept == [f"1-{i}" for i in range(15, 25)]  # the oldest went first
    assert stats.read(r, "file")[Counter.DEAD_LETTERS_TRIMMED.value] == 15
    assert "DISPATCH_DEADLETTER_MAX_LEN=10" in caplog.text and "15 oldest" in caplog.text
    # every field of a dead letter survives the Lua path
    last = dl.get(xrange(r, c.deadletter_key("file"))[-1][0].decode())
    assert last is not None
    assert (last.reason, last.data, last.stream, last.batch_id, last.attempts) == (
        "reason 24",
        b"data 24",
        STREAM,
        "b2",
        3,
    )


def test_inside_a_transaction_with_the_batch_end(r: redis.Redis) -> None:
    """The worker writes dead letters, counters and the batch's end in one MULTI."""
    dl = DeadLetters(r, "file", max_len=3)
    pipe = r.pipeline(transaction=True)
    pipe.set("before", 1)
    at = dl.add(_letters(5), stream=STREAM, batch_id="b", attempts=1, pipe=pipe)
    pipe.set("after", 1)
    assert at == 1
    assert dl.add([], stream=STREAM, batch_id="b", attempts=1, pipe=pipe) is None
    results = pipe.execute()
    assert dl.trimmed(results[at]) == 2
    assert r.xlen(c.deadletter_key("file")) == 3 and r.get("after") == b"1"
    assert stats.read(r, "file")[Counter.DEAD_LETTERS_TRIMMED.value] == 2


def test_setting_is_validated() -> None:
    assert load_settings({}).deadletter_max_len == c.DEFAULT_DEADLETTER_MAX_LEN == 100_000
    assert load_settings({"DISPATCH_DEADLETTER_MAX_LEN": "5"}).deadletter_max_len == 5
    from dispatch_celery.errors import ConfigError

    with pytest.raises(ConfigError, match="DISPATCH_DEADLETTER_MAX_LEN"):
        load_settings({"DISPATCH_DEADLETTER_MAX_LEN": "0"})


class _Records(logging.Handler):
    """Records of one logger, whatever the worker did to the root logger's handlers."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_flood_of_dead_letters_stays_bounded_end_to_end(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, _ = make(
        redis_url, tmp_path, DISPATCH_DEADLETTER_MAX_LEN="10", DISPATCH_BATCH_SIZE="10"
    )
    xadd_all(r, STREAM, [f"not json {i}".encode() for i in range(35)])
    records = _Records()
    logger = logging.getLogger("dispatch_celery.delivery.deadletters")
    logger.addHandler(records)
    try:
        with bridge(settings, app, "file"), worker(app, "file"):
            wait_for(lambda: stats.read(r, "file")["dead_lettered"] == 35, what="dead letters")
            wait_for(lambda: r.hlen(c.inflight_key("file")) == 0, what="batches finished")
    finally:
        logger.removeHandler(records)
    assert r.xlen(c.deadletter_key("file")) == 10
    assert stats.read(r, "file")[Counter.DEAD_LETTERS_TRIMMED.value] == 25
    assert any("dispatch:dlq:file is at its bound" in m for m in records.messages), records
    status = service_status(r, STREAM, "file", settings=settings)
    assert status.dead_letters == 10 and status.dead_letters_trimmed == 25
    assert any("dropped at the bound" in line and "25" in line for line in format_status([status]))
    from prometheus_client import generate_latest

    text = generate_latest(build_registry(settings, r, services=["file"])).decode()
    assert 'dispatch_dead_letters_trimmed_total{service="file"} 25.0' in text
