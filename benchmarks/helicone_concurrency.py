"""How much the Helicone backend's concurrency buys: runs/s at concurrency 1 vs the default.

Helicone has no batch endpoint, so each run is one request; with a vendor that takes
~100 ms per request, one request at a time caps a worker process at ~10 runs/s. This
benchmark starts a local Helicone-compatible endpoint (the contract-enforcing fake of the
test suite) that answers every log after ``--latency`` seconds, delivers batches of 100 runs
through ``HeliconeBackend.deliver`` at both settings in the same run, and prints runs/s, the
ratio (target >= 15x) and the most requests the server saw in flight at once.

    python benchmarks/helicone_concurrency.py [--latency 0.1] [--batches 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.vendor_servers

from dispatch_celery.backends.helicone import DEFAULT_CONCURRENCY, HeliconeBackend
from dispatch_celery.settings import load_settings
from tests.vendor_servers import FakeHelicone, RecordingContext, chat_runs

BATCH = 100  # the core's default batch size


def measure(latency: float, concurrency: int, batches: int) -> tuple[float, int, int, int]:
    """(runs/s, runs, max in flight seen by the server, connections opened)."""
    with FakeHelicone(delay=latency) as server:
        env = {
            "DISPATCH_HELICONE_API_KEY": server.api_key,
            "DISPATCH_HELICONE_ENDPOINT": server.url,
            "DISPATCH_HELICONE_CONCURRENCY": str(concurrency),
        }
        backend = HeliconeBackend.from_settings("helicone", load_settings(env))
        ctx = RecordingContext("helicone").ctx
        try:
            backend.deliver(chat_runs(concurrency, "warm-up"), ctx)  # open the pool once
            runs = [chat_runs(BATCH, f"batch-{i}") for i in range(batches)]
            started = time.perf_counter()
            for batch in runs:
                report = backend.deliver(batch, ctx)
                assert not report.deferred, report
                assert not report.rejected, report
            elapsed = time.perf_counter() - started
        finally:
            backend.close()
        assert not server.violations, server.violations
        total = BATCH * batches
        return total / elapsed, total, server.max_in_flight, server.connections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.1, help="server answer delay, s")
    parser.add_argument("--batches", type=int, default=4, help="batches of 100 at the default")
    args = parser.parse_args()

    serial = measure(args.latency, 1, 1)
    pooled = measure(args.latency, DEFAULT_CONCURRENCY, args.batches)
    for label, (rate, runs, in_flight, conns) in (
        ("concurrency 1", serial),
        (f"concurrency {DEFAULT_CONCURRENCY} (default)", pooled),
    ):
        print(
            f"{label:<26} {rate:8.1f} runs/s  ({runs} runs, max in flight {in_flight}, "
            f"{conns} connections)"
        )
    ratio = pooled[0] / serial[0]
    verdict = "OK" if ratio >= 15 else "BELOW TARGET"
    print(f"speed-up {ratio:.1f}x (target >= 15x): {verdict}")


if __name__ == "__main__":
    main()
