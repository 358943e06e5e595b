"""Soak: the fault scenarios of issue 8 with their full-length faults.

    python benchmarks/soak.py                      # every case (~8 minutes)
    python benchmarks/soak.py --only vendor-outage,broker-outage
    python benchmarks/soak.py --json soak.json     # the figures as JSON too

The same scenario code as the fast tests (``tests/faults/``), with the faults of the issue:
Redis SHUTDOWN and kill -9 with a 5 s restart, RabbitMQ unreachable for 30 s, a 60 s vendor
outage (40 s of 503, then 20 s of refused connections) with the default-sized backoff
(base 2 s, cap 30 s), an outage beyond a 20 s retry budget, 30 s of hung connections, a
producer trimming 10,000 entries under lag, 30 s of a full disk. Per case it prints the
events published, delivered, dead-lettered, trimmed, lost (must be 0), the duplicates at
the receiver, the requests the failing server saw during the outage and the time from the
fault's end until delivery resumed. A case whose assertions fail is reported as FAILED with
the figures it had measured; the exit status is 1 if any case failed.

A private redis-server (Redis >= 7) holds the streams of the cases that do not start their
own; RabbitMQ must run on 127.0.0.1:5672 for the broker case (skipped otherwise); the disk
case needs root (tmpfs mount).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import redis  # noqa: E402

from tests.conftest import _redis_server_binary, free_port  # noqa: E402
from tests.faults import (  # noqa: E402
    test_broker_outage,
    test_disk_full,
    test_hung_connections,
    test_redis_restart,
    test_retry_budget,
    test_trim_under_lag,
    test_vendor_outage,
)
from tests.faults.kit import Figures, Lab  # noqa: E402

Case = Callable[[Lab], Figures]

CASES: dict[str, Case] = {
    "redis-restart": lambda lab: test_redis_restart.scenario_shutdown(lab, down_s=5.0),
    "redis-kill-9": lambda lab: test_redis_restart.scenario_kill9(lab, down_s=5.0),
    "broker-outage": lambda lab: test_broker_outage.scenario(lab, outage_s=30.0),
    "vendor-outage": lambda lab: test_vendor_outage.scenario(
        lab, answer_503_s=40.0, refuse_s=20.0, rate=30.0, base=2.0, cap=30.0
    ),
    "outage-beyond-budget": lambda lab: test_retry_budget.scenario(
        lab, budget_s=20.0, events=300, base=1.0, cap=5.0
    ),
    "hung-silent": lambda lab: test_hung_connections.scenario(lab, "silent", hang_s=30.0),
    "hung-drip": lambda lab: test_hung_connections.scenario(lab, "drip", hang_s=30.0),
    "producer-trims": lambda lab: test_trim_under_lag.scenario(lab, maxlen=1000, written=10_000),
    "disk-full": lambda lab: test_disk_full.scenario(lab, full_s=30.0),
}


def start_redis(workdir: Path) -> tuple[str, subprocess.Popen[bytes]]:
    binary = _redis_server_binary()
    if binary is None:
        raise SystemExit("soak: no redis-server found")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(workdir), "--maxmemory-policy", "noeviction",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            return url, proc
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("soak: redis-server did not start") from None
            time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated cases: " + ", ".join(CASES))
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directories")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",")] if args.only else list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown case(s): {', '.join(unknown)}")
    root = Path(tempfile.mkdtemp(prefix="dispatch-soak-"))
    url, server = start_redis(root)
    client = redis.Redis.from_url(url)
    results: list[dict[str, object]] = []
    failed = 0
    try:
        for name in names:
            client.flushall()
            lab = Lab(root / name, url)
            lab.tmp.mkdir()
            started = time.monotonic()
            status, detail = "ok", ""
            try:
                CASES[name](lab)
            except AssertionError as exc:
                status, detail = "FAILED", str(exc).splitlines()[0] if str(exc) else "assert"
                failed += 1
            except BaseException as exc:
                if type(exc).__name__ == "Skipped":  # pytest.skip(): a server is missing
                    status, detail = "skipped", str(exc)
                else:
                    status, detail = "ERROR", f"{type(exc).__name__}: {exc}"
                    traceback.print_exc()
                    failed += 1
            took = time.monotonic() - started
            for fig in lab.figures or [Figures(name)]:
                print(f"{status:<7} {fig.line()}  ({took:.0f}s)", flush=True)
                results.append({"status": status, "detail": detail, **fig.as_json()})
            if detail:
                print(f"        {detail[:300]}", flush=True)
    finally:
        client.close()
        server.terminate()
        server.wait(10)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"scratch directories kept in {root}")
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
