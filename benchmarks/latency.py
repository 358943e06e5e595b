"""End-to-end latency at steady rates: stream entry written -> run record in the file.

    python benchmarks/latency.py                        # 20, 1000 and 5000 events/s, 30 s each
    python benchmarks/latency.py --rates 20,1000 --seconds 60
    python benchmarks/latency.py --env DISPATCH_FLUSH_LINGER=0.2   # try a setting

One bridge and one worker (default prefork pool) with the default settings (except
``DISPATCH_METHODS=*``, so that every event has a line to wait for), the file backend, a
producer process writing the sample events at the given rate (XADD, one pipelined burst
per millisecond tick). Measured from outside: the written time is the
entry id's millisecond (Redis's clock), the delivered time is when the record's line
appears in the file (the file is polled every millisecond). Where the time goes, per
event, from Redis keyspace notifications of the batch's keys (same host, same clock):

* batch wait: entry written -> its batch staged by the bridge (blob SET);
* queue wait: staged -> the attempt began in a worker (lease SET);
* delivery:   began -> the record is in the file (decode, redact, append + fsync).

Printed per rate: p50/p95/p99/max of the total, the mean and p99 of each part, tasks
(batches) per second and events per batch. The first two seconds of each rate are left
out (warm-up).
"""

from __future__ import annotations

import argparse
import bisect
import multiprocessing
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import redis
from common import STREAM, Pipeline, load, start_redis

from dispatch_celery import constants as c
from dispatch_celery.cli.sample import sample_events

WARMUP_S = 2.0
TICK_S = 0.001


def produce(url: str, rate: float, seconds: float, done: Any) -> None:
    """Write ``rate`` events/s for ``seconds`` (in a process of its own); puts the entry
    ids on the queue ``done``."""
    client = redis.Redis.from_url(url)
    events = sample_events(int(rate * seconds) + 10, seed=int(rate))
    start = time.perf_counter()
    sent = 0
    total = int(rate * seconds)
    ids: list[str] = []
    while sent < total:
        due = min(total, int((time.perf_counter() - start) * rate) + 1)
        if due > sent:
            pipe = client.pipeline(transaction=False)
            for _ in range(due - sent):
                pipe.xadd(STREAM, {"data": next(events)})
            ids += [i.decode() for i in pipe.execute()]
            sent = due
        time.sleep(TICK_S)
    done.put(ids)


def _ms(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


class Observer:
    """Keyspace notifications of the batches' keys, and the lines of the output file."""

    def __init__(self, url: str, out: Path, service: str = "file") -> None:
        self.client = redis.Redis.from_url(url)
        self.client.config_set("notify-keyspace-events", "K$g")
        self.blob = c.batch_key(service, "")
        self.lease = c.batch_lease_key(service, "")
        self.out = out
        self.staged: dict[str, float] = {}
        self.begun: dict[str, float] = {}
        self.seen: dict[str, float] = {}
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._keys, daemon=True),
            threading.Thread(target=self._tail, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _keys(self) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.psubscribe(f"__keyspace@0__:{self.blob}*", f"__keyspace@0__:{self.lease}*")
        blob = f"__keyspace@0__:{self.blob}".encode()
        lease = f"__keyspace@0__:{self.lease}".encode()
        while not self.stop.is_set():
            msg = pubsub.get_message(timeout=0.1)
            if msg is None or msg["data"] != b"set":
                continue
            now = time.time()
            channel: bytes = msg["channel"]
            if channel.startswith(blob):
                self.staged.setdefault(channel[len(blob) :].decode(), now)
            elif channel.startswith(lease):
                self.begun.setdefault(channel[len(lease) :].decode(), now)

    def _tail(self) -> None:
        while not self.out.exists() and not self.stop.is_set():
            time.sleep(TICK_S)
        with open(self.out, "rb") as f:
            rest = b""
            while not self.stop.is_set():
                chunk = f.read()
                if not chunk:
                    time.sleep(TICK_S)
                    continue
                now = time.time()
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    self.seen.setdefault(orjson.loads(line)["stream_id"], now)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(5)


def _pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


def measure(url: str, obs: Observer, rate: float, seconds: float) -> dict[str, Any]:
    done: Any = multiprocessing.Queue()
    t0 = time.time()
    producer = multiprocessing.Process(target=produce, args=(url, rate, seconds, done))
    producer.start()
    produced: list[str] = done.get()
    producer.join()
    t1 = time.time()
    deadline = time.monotonic() + 60
    while True:
        seen = dict(obs.seen)  # a C-level copy: atomic with respect to the tail thread
        mine = [s for s in produced if s in seen]
        if len(mine) >= len(produced) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    time.sleep(0.2)
    staged, begun = dict(obs.staged), dict(obs.begun)
    batches = sorted(
        (tuple(map(_ms, b.split("_"))), b)
        for b in staged
        if "_" in b and t0 * 1000 - 5000 <= _ms(b.split("_")[0])[0] <= t1 * 1000
    )
    firsts = [k[0] for k, _ in batches]
    total, wait, queue, deliver = [], [], [], []
    for sid in mine:
        written = _ms(sid)[0] / 1000
        if written < t0 + WARMUP_S:
            continue
        total.append(seen[sid] - written)
        i = bisect.bisect_right(firsts, _ms(sid)) - 1
        if i < 0:
            continue
        (first, last), batch = batches[i]
        if not first <= _ms(sid) <= last or batch not in begun:
            continue
        wait.append(staged[batch] - written)
        queue.append(begun[batch] - staged[batch])
        deliver.append(seen[sid] - begun[batch])
    in_window = [b for (first, _), b in batches if first[0] / 1000 >= t0 + WARMUP_S]
    span = max(1e-9, t1 - t0 - WARMUP_S)
    return {
        "rate": rate,
        "events": len(total),
        "missing": len(produced) - len(mine),
        "p50": _pct(total, 50),
        "p95": _pct(total, 95),
        "p99": _pct(total, 99),
        "max": max(total, default=0.0),
        "wait": (sum(wait) / max(1, len(wait)), _pct(wait, 99)),
        "queue": (sum(queue) / max(1, len(queue)), _pct(queue, 99)),
        "deliver": (sum(deliver) / max(1, len(deliver)), _pct(deliver, 99)),
        "tasks_s": len(in_window) / span,
        "per_batch": len(total) / max(1, len(in_window)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rates", default="20,1000,5000")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--env", action="append", default=[], help="NAME=value for the pipeline")
    ap.add_argument("--worker-args", default="")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dispatch-latency-"))
    url, proc = start_redis(work)
    client = redis.Redis.from_url(url)
    # Every event goes to the file (the default filter drops GET and OPTIONS, 5% of the mix).
    extra = {"DISPATCH_METHODS": "*", **dict(e.split("=", 1) for e in args.env)}
    pipeline = Pipeline(url, work, "file", extra)
    obs = None
    try:
        client.xgroup_create(STREAM, c.default_group("file"), id="$", mkstream=True)
        pipeline.start_worker(args=args.worker_args.split())
        pipeline.wait_ready(client)
        pipeline.start_bridge()
        time.sleep(2)
        obs = Observer(url, work / "events.jsonl")
        shown = " ".join(args.env) or "defaults"
        print(f"latency, entry written -> record in the file ({shown}); {load()}")
        print("| events/s | p50 ms | p95 ms | p99 ms | max ms | batch wait ms (mean/p99) "
              "| queue wait ms | delivery ms | tasks/s | events/task |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        for rate in (float(r) for r in args.rates.split(",")):
            m = measure(url, obs, rate, args.seconds)
            ms = {k: m[k] * 1000 for k in ("p50", "p95", "p99", "max")}
            part = {k: f"{m[k][0] * 1000:.0f} / {m[k][1] * 1000:.0f}" for k in
                    ("wait", "queue", "deliver")}  # fmt: skip
            lost = f" ({m['missing']} not seen)" if m["missing"] else ""
            print(
                f"| {rate:,.0f} | {ms['p50']:.0f} | {ms['p95']:.0f} | {ms['p99']:.0f} "
                f"| {ms['max']:.0f} | {part['wait']} | {part['queue']} | {part['deliver']} "
                f"| {m['tasks_s']:.1f} | {m['per_batch']:.0f}{lost} |",
                flush=True,
            )
        print(load())
    finally:
        if obs is not None:
            obs.close()
        pipeline.stop()
        client.close()
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
