"""Several streams: ``DISPATCH_STREAM`` (or ``--stream``) names one key or several.

Syntax: comma-separated items, each a stream key or a glob pattern (Redis ``SCAN MATCH``
syntax: ``*``, ``?``, ``[...]``; an item is a pattern when it contains one of ``*?[``),
e.g. ``DISPATCH_STREAM=llm-proxy-events`` (the default), ``events-a,events-b``, or
``llm-proxy-events-*``. Keys are used as given (a stream that does not exist yet is
created with the group, as before). A pattern is resolved with ``SCAN ... TYPE stream``
when the bridge starts and again every ``DISPATCH_STREAM_RESCAN`` seconds (30): a
shard the producer adds later is picked up within that time, with its group created at
``0`` so nothing written before is missed. A pattern never matches dispatch-celery's own
keys (``dispatch:*``, e.g. the dead-letter streams). Resolved keys are sorted, so every
bridge of a service sees the same list.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis

from dispatch_celery import constants as c
from dispatch_celery.batches.codec import Entry
from dispatch_celery.errors import ConfigError

_GLOB = frozenset("*?[")


def parse(spec: str) -> list[str]:
    """The items of a ``DISPATCH_STREAM`` value (keys and patterns), in order, deduplicated."""
    items: list[str] = []
    for raw in spec.split(","):
        item = raw.strip()
        if item and item not in items:
            items.append(item)
    if not items:
        raise ConfigError("DISPATCH_STREAM must name at least one stream key or pattern")
    return items


def is_pattern(item: str) -> bool:
    return any(ch in _GLOB for ch in item)


def resolve(client: redis.Redis, spec: str) -> list[str]:
    """The stream keys ``spec`` names now (patterns matched by SCAN), sorted."""
    keys: set[str] = set()
    for item in parse(spec):
        if not is_pattern(item):
            keys.add(item)
            continue
        for key in client.scan_iter(match=item, count=1000, _type="stream"):
            name = key.decode() if isinstance(key, bytes) else str(key)
            if not name.startswith(f"{c.PREFIX}:"):
                keys.add(name)
    return sorted(keys)


class StreamSet:
    """The keys a bridge reads, re-resolved every ``rescan`` seconds when ``spec`` has a
    pattern (a plain list never changes)."""

    def __init__(self, client: redis.Redis, spec: str, rescan: float) -> None:
        self.r = client
        self.spec = spec
        self.rescan = rescan
        items = parse(spec)
        self.dynamic = any(is_pattern(i) for i in items)
        # Several streams (or a pattern that may match several): batch ids name the stream.
        self.several = self.dynamic or len(items) > 1
        self.keys: list[str] = []
        self._next: float | None = None  # None: never resolved (or reset)

    def reset(self) -> None:
        """Forget the keys (a bridge's start-up: each gets its group and pending re-read)."""
        self.keys = []
        self._next = None

    def refresh(self, *, force: bool = False) -> list[str]:
        """Resolve at the first call, then again every ``rescan`` seconds when the value
        has a pattern (or when ``force``); returns the keys that are new."""
        now = time.monotonic()
        if not force and self._next is not None and (not self.dynamic or now < self._next):
            return []
        self._next = now + self.rescan
        found = resolve(self.r, self.spec)
        new = [k for k in found if k not in self.keys]
        # A key that disappeared (deleted, or a pattern that no longer matches it) stays
        # read: entries still pending in its group must be batched; it is harmless.
        self.keys = sorted({*self.keys, *found})
        return new


def describe(keys: Sequence[str], spec: str) -> str:
    """For log lines: the keys, and the pattern they came from when there is one."""
    shown = ", ".join(keys) if keys else "(no stream matches yet)"
    return shown if spec == ",".join(keys) or spec in keys else f"{shown} (from {spec!r})"


class StreamBuffers:
    """Entries read but not batched yet, per stream: a batch holds entries of one stream
    (its blob names the stream, for the XACK and the events' ids)."""

    def __init__(self) -> None:
        self.entries: dict[str, list[Entry]] = {}
        self.since: dict[str, float] = {}  # stream -> when its oldest buffered entry came

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def __bool__(self) -> bool:
        return any(self.entries.values())

    def clear(self) -> None:
        self.entries.clear()
        self.since.clear()

    def add(self, stream: str, entries: Sequence[Entry]) -> None:
        if not entries:
            return
        held = self.entries.setdefault(stream, [])
        if not held:
            self.since[stream] = time.monotonic()
        held.extend(entries)

    def oldest(self) -> float | None:
        """When the oldest buffered entry arrived (monotonic), None when empty."""
        times = [self.since[s] for s, held in self.entries.items() if held]
        return min(times) if times else None

    def take(
        self, batch_size: int, flush_interval: float, *, force: bool, max_bytes: int | None = None
    ) -> list[tuple[str, list[list[Entry]]]]:
        """The batches to publish now, per stream: full ones (``batch_size`` entries, or
        ``max_bytes`` of raw entry bytes: an entry over it makes a batch of its own), and
        the rest of a stream whose oldest entry waited ``flush_interval`` (everything when
        ``force``)."""
        now = time.monotonic()
        out: list[tuple[str, list[list[Entry]]]] = []
        for stream, held in self.entries.items():
            if not held:
                continue
            due = force or now - self.since[stream] >= flush_interval
            if max_bytes is None:
                n = len(held) if due else len(held) // batch_size * batch_size
                batches = [held[i : i + batch_size] for i in range(0, n, batch_size)]
            else:
                batches, n = _split(held, batch_size, max_bytes, due)
            if n == 0:
                continue
            rest = held[n:]
            self.entries[stream] = rest
            if rest:
                self.since[stream] = now
            out.append((stream, batches))
        return out


def _split(
    held: list[Entry], batch_size: int, max_bytes: int, due: bool
) -> tuple[list[list[Entry]], int]:
    """``held`` cut into batches of at most ``batch_size`` entries and ``max_bytes``; the
    last one only when it is full or ``due``. Returns the batches and how many entries."""
    batches: list[list[Entry]] = []
    start = size = 0
    for i, e in enumerate(held):
        n = len(e.data) if e.data is not None else len(e.other)
        if i > start and (i - start >= batch_size or size + n > max_bytes):
            batches.append(held[start:i])
            start, size = i, 0
        size += n
    if due or len(held) - start >= batch_size or size >= max_bytes:
        batches.append(held[start:])
        start = len(held)
    return batches, start
