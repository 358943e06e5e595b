"""Scale-out on one machine: 1, 2 and 4 worker processes, and two bridges of one service.

    python benchmarks/scale.py                 # 100k sample events per configuration
    python benchmarks/scale.py --events 50000 --env DISPATCH_BATCH_SIZE=500

The same drain (file backend) with one worker whose prefork pool has 1, 2 or 4 processes
(``-c N``), then two workers of 2 processes each, then two bridges (two consumers of the
service's group) with one worker of 2. Printed: events/s, the speed-up against one
process, and how busy the machine's cores were (CPU of the bridges, workers and Redis
over wall time and cores: 100% is saturated).
"""

from __future__ import annotations

import argparse

from common import drain, load, private_redis

CONFIGS: list[tuple[str, list[list[str]], int]] = [
    ("1 worker process (-c 1)", [["-c", "1"]], 1),
    ("2 worker processes (-c 2)", [["-c", "2"]], 1),
    ("4 worker processes (-c 4)", [["-c", "4"]], 1),
    ("2 workers x 2 processes", [["-c", "2"], ["-c", "2"]], 1),
    ("2 bridges, 2 worker processes", [["-c", "2"]], 2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--env", action="append", default=[], help="NAME=value for the pipeline")
    args = ap.parse_args()
    env = dict(e.split("=", 1) for e in args.env)
    with private_redis("dispatch-scale-") as (url, client, work):
        print(f"scale-out, {args.events} sample events, file backend {env or ''}; {load()}")
        print("| configuration | events/s | speed-up | cores busy | worker us/event |")
        print("|---|---|---|---|---|")
        base = None
        for name, workers, bridges in CONFIGS:
            m = drain(url, client, work, args.events, env=env, worker_args=workers, bridges=bridges)
            base = base or m["rate"]
            print(
                f"| {name} | {m['rate']:,.0f} | {m['rate'] / base:.2f}x "
                f"| {m['cpu_share'] * 100:.0f}% | {m['worker_us']:.1f} |",
                flush=True,
            )
        print(load())


if __name__ == "__main__":
    main()
