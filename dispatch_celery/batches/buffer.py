"""The in-flight buffer of a service: the batches stored in Redis that are not finished yet.

It is what holds a vendor outage (llm-proxy trims its stream to ~10,000 entries, so the
stream itself holds seconds). Two sizes are counted per batch, atomically with the batch's
state (``batches.state``, which owns the ``inflight`` HASH and its two byte counters): its
blob's **compressed** size, which ``DISPATCH_HIGH_WATER_BYTES`` limits (it is what Redis
stores), and its **raw** size (the events' own bytes), for status.

How long the buffer lasts: each bridge measures the producer's intake rate (the stream's
``entries-added`` over its housekeeping interval; Redis < 7: the bridge's own reading
rate) and the compressed bytes and events per batch it stages, and publishes them in its
heartbeat (``IntakeMeter``). ``read_buffer`` combines them with the in-flight counters:
``seconds_to_full`` is the time until the high-water mark at the current intake rate if
nothing were delivered (the outage case): "the buffer holds N minutes of an outage".
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import redis

from dispatch_celery import constants as c
from dispatch_celery.settings import Settings


class IntakeMeter:
    """Kept by a bridge: the producer's rate and the shape of what the bridge stages.

    ``observe`` is called at every housekeeping round with the stream keys read;
    ``staged`` at every flush. ``heartbeat`` gives the figures for the heartbeat."""

    def __init__(self) -> None:
        self._added: dict[str, tuple[float, int]] = {}  # stream -> (monotonic, entries-added)
        self._read: tuple[float, int] | None = None
        self.intake_eps: float | None = None  # entries/s the producer adds (all streams)
        self.read_eps: float | None = None  # entries/s this bridge reads
        self._events = 0
        self._batches = 0
        self._compressed = 0
        self._raw = 0

    def staged(self, events: int, compressed: int, raw: int) -> None:
        """One batch stored (a running sum; the shares decay so they follow the traffic)."""
        if self._events > 1_000_000:  # keep recent shape: halve the history now and then
            self._events //= 2
            self._batches = max(1, self._batches // 2)
            self._compressed //= 2
            self._raw //= 2
        self._events += events
        self._batches += 1
        self._compressed += compressed
        self._raw += raw

    def observe(self, client: redis.Redis, streams: Sequence[str], read_total: int) -> None:
        now = time.monotonic()
        if self._read is not None and now > self._read[0]:
            self.read_eps = max(0.0, (read_total - self._read[1]) / (now - self._read[0]))
        self._read = (now, read_total)
        rate = 0.0
        known = False
        for stream in streams:
            added = _entries_added(client, stream)
            if added is None:
                continue
            prev = self._added.get(stream)
            self._added[stream] = (now, added)
            if prev is not None and now > prev[0]:
                rate += max(0, added - prev[1]) / (now - prev[0])
                known = True
        for gone in set(self._added) - set(streams):
            del self._added[gone]
        self.intake_eps = rate if known else None

    def heartbeat(self, settings: Settings) -> dict[str, Any]:
        per_batch = self._events / self._batches if self._batches else None
        return {
            "intake_eps": _round(self.intake_eps),
            "read_eps": _round(self.read_eps),
            "events_per_batch": _round(per_batch),
            "compressed_per_event": _round(self._compressed / self._events)
            if self._events
            else None,
            "raw_per_event": _round(self._raw / self._events) if self._events else None,
            "high_water_batches": settings.high_water_batches,
            "high_water_bytes": settings.high_water_bytes,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _entries_added(client: redis.Redis, stream: str) -> int | None:
    """The stream's ``entries-added`` (Redis >= 7), None when unknown."""
    try:
        info = client.xinfo_stream(stream)
    except redis.ResponseError:  # no such key (yet)
        return 0
    added = info.get("entries-added")
    return int(added) if added is not None else None


@dataclass
class BufferStatus:
    batches: int  # batches in flight (stored, not finished)
    compressed_bytes: int  # their blobs, as stored in Redis
    raw_bytes: int  # their events' own bytes
    high_water_batches: int
    high_water_bytes: int  # compressed bytes
    intake_eps: float | None  # entries/s the producer adds (None: no live bridge tells)
    seconds_to_full: float | None  # at that rate with nothing delivered; None: unknown

    @property
    def fill(self) -> float:
        """How full, 0..1+ (the larger of the two high-water marks' shares)."""
        return max(
            self.batches / max(1, self.high_water_batches),
            self.compressed_bytes / max(1, self.high_water_bytes),
        )

    @property
    def ratio(self) -> float | None:
        return self.raw_bytes / self.compressed_bytes if self.compressed_bytes else None

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fill"] = round(self.fill, 4)
        out["compression_ratio"] = None if self.ratio is None else round(self.ratio, 2)
        return out


def in_flight(client: redis.Redis, service: str) -> tuple[int, int, int]:
    """(batches, compressed bytes, raw bytes) in flight, in one round trip."""
    pipe = client.pipeline(transaction=False)
    pipe.hlen(c.inflight_key(service))
    pipe.get(c.inflight_bytes_key(service))
    pipe.get(c.inflight_raw_bytes_key(service))
    count, size, raw = pipe.execute()
    return int(count), max(0, int(size or 0)), max(0, int(raw or 0))


def read_buffer(
    client: redis.Redis,
    service: str,
    settings: Settings,
    heartbeats: Iterable[Mapping[str, Any]] = (),
) -> BufferStatus:
    """The buffer of ``service``; rates and high-water marks from the live bridges'
    heartbeats (a bridge may run with other marks than this process), else settings."""
    batches, size, raw = in_flight(client, service)
    beats = [b for b in heartbeats if b.get("age_s", 0) < c.HEARTBEAT_TTL_S]
    hw_batches = min(
        (int(b["high_water_batches"]) for b in beats if b.get("high_water_batches")),
        default=settings.high_water_batches,
    )
    hw_bytes = min(
        (int(b["high_water_bytes"]) for b in beats if b.get("high_water_bytes")),
        default=settings.high_water_bytes,
    )
    rates = [float(b["intake_eps"]) for b in beats if b.get("intake_eps") is not None]
    if not rates:  # Redis < 7: the bridges' own reading rate (the sum: they share a group)
        read = [float(b["read_eps"]) for b in beats if b.get("read_eps") is not None]
        rates = [sum(read)] if read else []
    # Every bridge of a service reads the same streams: they see the same producer rate.
    intake = max(rates) if rates else None
    status = BufferStatus(batches, size, raw, hw_batches, hw_bytes, intake, None)
    status.seconds_to_full = _seconds_to_full(status, beats, settings)
    return status


def _seconds_to_full(
    status: BufferStatus, beats: Sequence[Mapping[str, Any]], settings: Settings
) -> float | None:
    if status.fill >= 1:
        return 0.0
    eps = status.intake_eps
    if eps is None:
        return None
    if eps <= 0:
        return math.inf
    per_batch = _mean(b.get("events_per_batch") for b in beats) or min(
        float(settings.batch_size), max(1.0, eps * settings.flush_interval)
    )
    per_event = _mean(b.get("compressed_per_event") for b in beats)
    if per_event is None and status.batches:  # no live bridge staged yet: what is stored
        per_event = status.compressed_bytes / (status.batches * per_batch)
    left = [(status.high_water_batches - status.batches) * per_batch / eps]
    if per_event:
        left.append((status.high_water_bytes - status.compressed_bytes) / (eps * per_event))
    return max(0.0, min(left))


def _mean(values: Iterable[Any]) -> float | None:
    nums = [float(v) for v in values if v is not None]
    return sum(nums) / len(nums) if nums else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # unreachable


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if math.isinf(s):
        return "no intake"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"
