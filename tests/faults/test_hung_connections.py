"""Fault 5: hung connections. The vendor accepts the TCP connection and never answers
("silent"), or answers one byte a second ("drip": a per-read timeout never fires; only a
total deadline per request ends it).

One worker consumes two queues (helicone, pointed at the hung server, and file); both
services read the same stream. Connect and read deadlines must end each request, the
attempt must end inside the task's soft time limit (no time-limit kill), the runs are
retried and delivered once the server behaves, and the file deliveries of the same worker
keep flowing while Helicone hangs.
"""

from __future__ import annotations

import re
import time

import pytest

from dispatch_celery import constants as c
from tests.faults.kit import (
    Figures,
    Lab,
    Producer,
    RawVendor,
    Stack,
    account,
    dead_letters,
    file_counts,
    settle,
    wait_resumed,
)

# One xdist worker runs the fault scenarios one after another: they time real outages.
pytestmark = [pytest.mark.faults, pytest.mark.xdist_group("faults")]

TIME_LIMIT = 8  # DISPATCH_TASK_TIME_LIMIT of the test harness
READ_TIMEOUT = 2.0
# The file deliveries of the worker may lag behind the stream while Helicone hangs, but
# only by about one hung request (a read deadline), never for the length of the hang.
NOT_BLOCKED_S = 4.0


def _task_seconds(stack: Stack, name: str) -> list[float]:
    """Run times Celery logged for the worker's finished tasks ("succeeded in 1.23s")."""
    out = []
    for rec in stack.records(name):
        m = re.search(r"succeeded in ([\d.]+)s", str(rec.get("msg", "")))
        if m:
            out.append(float(m.group(1)))
    return out


def scenario(lab: Lab, mode: str, *, hang_s: float = 7.0, rate: float = 20.0) -> Figures:
    fig = lab.figures_for(f"hung-{mode}", hang_s)
    out = lab.tmp / "events.jsonl"
    with RawVendor(mode) as vendor:
        env = lab.env(
            DISPATCH_BATCH_SIZE="10",
            DISPATCH_TASK_TIME_LIMIT=str(TIME_LIMIT),
            DISPATCH_HELICONE_API_KEY="sk-helicone-test-key",
            DISPATCH_HELICONE_ENDPOINT=vendor.url,
            DISPATCH_HELICONE_CONCURRENCY="10",
            DISPATCH_HELICONE_CONNECT_TIMEOUT="1",
            DISPATCH_HELICONE_READ_TIMEOUT=str(READ_TIMEOUT),
        )
        stack = Stack(env, lab.tmp)
        producer = Producer(lab.redis_url, rate)
        r = lab.client()
        try:
            stack.bridge("helicone")
            stack.bridge("file")
            stack.worker("helicone,file", concurrency=2)
            producer.start()
            stack.wait(lambda: vendor.hung > 0, 30, "a request to hang")
            hung_at = time.time()
            time.sleep(hang_s)
            # the same worker kept delivering the file service while Helicone hung
            cutoff = time.time() - NOT_BLOCKED_S
            due = {i for i, t in producer.acked_at.copy().items() if hung_at < t <= cutoff}
            late = due - set(file_counts(out))
            assert not late, (
                f"{len(late)} of {len(due)} file events published during the hang were not "
                f"delivered within {NOT_BLOCKED_S:g}s: the hung vendor blocked the worker"
            )
            assert not vendor.counts(), "the hung server got an answered request"
            assert not dead_letters(r, "helicone")
            fig.requests_during_outage = vendor.hung
            vendor.mode = "ok"
            fig.resume_s = wait_resumed(lambda: len(vendor.counts()), 60, stack)
            time.sleep(2)
            producer.stop()
            published = producer.published()
            for pred in (
                lambda: set(vendor.counts()) >= set(published),
                lambda: set(file_counts(out)) >= set(published),
                lambda: r.hlen(c.inflight_key("helicone")) + r.hlen(c.inflight_key("file")) == 0,
            ):
                settle(pred, timeout=60, stack=stack)
            stack.assert_running()
            account(fig, published, vendor.counts(), dead_letters(r, "helicone"))
            file_fig = Figures("file")
            account(file_fig, published, file_counts(out), dead_letters(r, "file"))
            fig.extra["file_delivered"] = file_fig.delivered
            log = stack.text("worker")
            assert "TimeLimitExceeded" not in log, "an attempt was killed by the hard time limit"
            assert "SoftTimeLimitExceeded" not in log and "soft time limit" not in log, (
                "an attempt ran into the soft time limit: the request deadlines did not fire"
            )
            runs = _task_seconds(stack, "worker")
            assert runs, "no finished task in the worker log"
            fig.extra["longest_task_s"] = max(runs)
            assert max(runs) < TIME_LIMIT
        finally:
            producer.close()
            r.close()
            stack.close()
    return fig


@pytest.mark.parametrize("mode", ["silent", "drip"])
def test_hung_vendor_connections_time_out_and_do_not_block_the_worker(lab: Lab, mode: str) -> None:
    scenario(lab, mode)
