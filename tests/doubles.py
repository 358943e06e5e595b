"""A backend test double usable across processes.

Selected with ``DISPATCH_BACKEND_FLAKY=tests.doubles:FlakyBackend``.

It appends what it receives to ``DISPATCH_<SERVICE>_PATH`` (one JSON line per run) and is
steered through a Redis hash ``test:flaky:<service>``:

* ``transient``: number of calls that raise ``TransientDeliveryError`` (``retry_after``)
* ``permanent``: number of calls that raise ``PermanentDeliveryError``
* ``sleep``: seconds each call sleeps before writing (to kill a worker mid-batch)
and sets ``test:flaky:<service>:reject`` / ``:defer`` (run ids refused / deferred once).
Every call is logged to the list ``test:flaky:<service>:calls`` (time, attempt, runs).
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, cast

import orjson
import redis

from dispatch_celery.backend import DeliveryContext, DeliveryReport, Run
from dispatch_celery.errors import ConfigError, PermanentDeliveryError, TransientDeliveryError
from dispatch_celery.settings import Settings


class FlakyBackend:
    name: ClassVar[str] = "flaky"

    def __init__(self, service: str, path: Path, client: redis.Redis) -> None:
        self.service = service
        self.path = path
        self.r = client
        self.ctl = f"test:flaky:{service}"

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> FlakyBackend:
        path = settings.option(service, "PATH")
        if not path:
            raise ConfigError(f"{settings.option_name(service, 'PATH')} is required")
        return cls(service, Path(path), redis.Redis.from_url(settings.redis_url))

    def deliver(self, runs: Sequence[Run], ctx: DeliveryContext) -> DeliveryReport:
        self.r.rpush(
            f"{self.ctl}:calls",
            orjson.dumps(
                {"t": time.time(), "attempt": ctx.attempt, "runs": len(runs), "batch": ctx.batch_id}
            ),
        )
        ctl = {
            k.decode(): v.decode()
            for k, v in cast(dict[bytes, bytes], self.r.hgetall(self.ctl)).items()
        }
        if float(ctl.get("sleep", 0)) > 0:
            time.sleep(float(ctl["sleep"]))
        if int(self.r.hincrby(self.ctl, "permanent", -1)) >= 0:
            raise PermanentDeliveryError("flaky: permanent failure")
        self.r.hset(self.ctl, "permanent", 0)
        if int(self.r.hincrby(self.ctl, "transient", -1)) >= 0:
            after = ctl.get("retry_after")
            raise TransientDeliveryError(
                "flaky: transient failure", retry_after=float(after) if after else None
            )
        self.r.hset(self.ctl, "transient", 0)
        report = DeliveryReport()
        reject = {m.decode() for m in cast(set[bytes], self.r.smembers(f"{self.ctl}:reject"))}
        lines = []
        for run in runs:
            if run.id in reject:
                report.rejected[run.id] = "flaky: rejected"
            elif self.r.srem(f"{self.ctl}:defer", run.id):
                report.deferred[run.id] = "flaky: deferred"
            else:
                lines.append(
                    orjson.dumps(
                        {
                            "id": run.id,
                            "stream_id": run.event.stream_id,
                            "attempt": ctx.attempt,
                            "batch": ctx.batch_id,
                        }
                    )
                )
        if lines:
            with self.path.open("ab") as f:
                fcntl.flock(f, fcntl.LOCK_EX)
                f.write(b"\n".join(lines) + b"\n")
                f.flush()
                os.fsync(f.fileno())
        return report

    def close(self) -> None:
        self.r.close()
