"""The worker's own cost per event, in one process, optionally under cProfile.

    python benchmarks/workercost.py                     # CPU us per event of an attempt (best of 5)
    python benchmarks/workercost.py --profile 25        # and cProfile's top 25 (tottime)
    python benchmarks/workercost.py --stages            # decode / record / redact / serialize
    python benchmarks/workercost.py --env DISPATCH_BATCH_SIZE=100

The batches are staged by the real bridge code (``Bridge`` with an enqueuer that only
records the tasks), then every task runs ``Deliverer.run`` (begin, decode, filter, build,
redact, the file backend's append with fsync and journal, the commit) in this process:
the worker without Celery, measured without the noise of other processes. ``--stages``
times the pure-Python steps of each event alone (no Redis, no file).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import Counter

from common import fill, load, private_redis

from dispatch_celery.cli.sample import sample_events
from dispatch_celery.settings import load_settings


def attempts(n: int, top: int, env: dict[str, str] | None = None, repeat: int = 5) -> None:
    from dispatch_celery.delivery.attempt import Deliverer
    from dispatch_celery.ingest.bridge import Bridge
    from dispatch_celery.ingest.enqueue import RecordingEnqueuer

    with private_redis("dispatch-profile-") as (url, client, work):
        settings = load_settings(
            {
                "DISPATCH_REDIS_URL": url,
                "DISPATCH_FILE_PATH": str(work / "events.jsonl"),
                "DISPATCH_HIGH_WATER_BATCHES": "100000000",
                "DISPATCH_HIGH_WATER_BYTES": str(2**50),
                **(env or {}),
            }
        )
        deliverer = Deliverer(settings)
        figures: list[tuple[float, float]] = []
        for round_ in range(repeat):
            fill(client, n)  # a fresh stream (and group) each round
            recorder = RecordingEnqueuer()
            bridge = Bridge(settings, "file", recorder, consumer="profile", client=client)
            bridge.start()
            while sum(events for _, events, _ in recorder.tasks) < n:
                bridge.step()
            first, *rest = recorder.tasks
            deliverer.run("file", first[0], first[2])  # warm up: backend, scripts, connections
            profiler = cProfile.Profile() if top and round_ == repeat - 1 else None
            cpu0, wall0 = time.process_time(), time.perf_counter()
            if profiler is not None:
                profiler.enable()
            for batch_id, _, token in rest:
                deliverer.run("file", batch_id, token)
            if profiler is not None:
                profiler.disable()
            cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
            events = sum(e for _, e, _ in rest)
            figures.append((cpu / events * 1e6, wall / events * 1e6))
            note = " (under cProfile: inflated)" if profiler is not None else ""
            print(
                f"round {round_ + 1}: {events} events in {len(rest)} attempts: "
                f"{figures[-1][0]:.1f} us CPU and {figures[-1][1]:.1f} us wall per event{note}"
            )
            if profiler is not None:
                pstats.Stats(profiler).sort_stats("tottime").print_stats(top)
        plain = sorted(cpu for cpu, _ in (figures[:-1] if top else figures))
        if plain:  # the profiled round's figure is left out: cProfile inflates it
            print(
                f"worker attempt CPU per event: best {plain[0]:.1f} us, median "
                f"{plain[len(plain) // 2]:.1f} us over {len(plain)} rounds; {load()}"
            )


def stages(n: int) -> None:
    """Each pure-Python step of the worker, per event (best of three passes)."""
    import orjson

    from dispatch_celery.decode.events import decode_entry
    from dispatch_celery.decode.filters import EventFilter
    from dispatch_celery.decode.records import build_record
    from dispatch_celery.decode.redact import Redactor

    datas = list(sample_events(n, seed=1))
    ids = [f"{1736930000000 + i}-0" for i in range(n)]
    redactor, flt = Redactor(), EventFilter()
    clock = time.perf_counter_ns
    best: dict[str, float] = {}
    for _ in range(3):
        spent: Counter[str] = Counter()
        for entry_id, data in zip(ids, datas, strict=True):
            t0 = clock()
            event = decode_entry("llm-proxy-events", entry_id, data)
            t1 = clock()
            spent["decode_entry"] += t1 - t0
            if flt.decide(event) != "deliver":
                continue
            t1 = clock()
            record = build_record(event, max_body_bytes=1024 * 1024)
            t2 = clock()
            record = redactor.redact_record(record)
            t3 = clock()
            redactor.redact_event(event)
            t4 = clock()
            orjson.dumps(record)
            t5 = clock()
            spent["build_record"] += t2 - t1
            spent["redact_record"] += t3 - t2
            spent["redact_event"] += t4 - t3
            spent["serialize"] += t5 - t4
        for name, ns in spent.items():
            best[name] = min(best.get(name, float("inf")), ns / n / 1000)
    for name, us in best.items():
        print(f"{name:14s} {us:6.2f} us/event")
    print(f"{'sum':14s} {sum(best.values()):6.2f} us/event; {load()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile's top N")
    ap.add_argument("--stages", action="store_true")
    ap.add_argument("--repeat", type=int, default=5, help="rounds (fresh stream each)")
    ap.add_argument("--env", action="append", default=[], help="NAME=value setting")
    args = ap.parse_args()
    if args.stages:
        stages(args.events)
        return
    attempts(args.events, args.profile, dict(e.split("=", 1) for e in args.env), args.repeat)


if __name__ == "__main__":
    main()
