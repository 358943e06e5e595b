"""Which events a service's backend receives.

The filter runs in the worker on decoded events; a filtered or sampled-out event is
counted (never silently dropped) and its entry is settled like a delivered one.

Settings (``DISPATCH_<SERVICE>_<NAME>`` overrides ``DISPATCH_<NAME>``; unset = default):

==================  ===================================  ===========================
name                value                                default
==================  ===================================  ===========================
``METHODS``         comma list of HTTP methods; ``*``    ``POST``
                    for every method
``PATH_PREFIXES``   comma list of path prefixes          every path
                    (``/v1/chat`` matches
                    ``/v1/chat/completions``)
``STATUSES``        comma list of codes, ranges and      every status
                    classes: ``200-299,401,5xx``
``SAMPLE_RATE``     fraction of the remaining events     ``1``
                    to deliver, ``0`` .. ``1``
==================  ===================================  ===========================

Sampling is deterministic per event id (a hash of it), so a retried or replayed batch
makes the same choice for every event, and every worker agrees.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from dispatch_celery import constants as c
from dispatch_celery.decode.events import Event
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings

Decision = Literal["deliver", "filtered", "sampled"]

_METHOD_RE = re.compile(r"^[A-Z][A-Z0-9_-]*$")
_STATUS_RE = re.compile(r"^(?:(\d{3})(?:-(\d{3}))?|([1-5])xx)$")
_HASH_SPACE = 2**64


@dataclass(frozen=True)
class EventFilter:
    """A service's filter. ``None`` for a criterion means "everything passes"."""

    methods: frozenset[str] | None = frozenset(c.DEFAULT_METHODS)
    path_prefixes: tuple[str, ...] | None = None
    statuses: tuple[tuple[int, int], ...] | None = None  # inclusive ranges
    sample_rate: float = 1.0

    @classmethod
    def from_settings(cls, service: str, settings: Settings) -> EventFilter:
        """Read the service's filter; ``ConfigError`` naming the variable when invalid."""

        def lookup(name: str) -> tuple[str, str | None]:
            return settings.scoped_option(service, name)

        var, raw = lookup("METHODS")
        methods = parse_methods(var, raw) if raw is not None else frozenset(c.DEFAULT_METHODS)
        var, raw = lookup("PATH_PREFIXES")
        prefixes = parse_path_prefixes(var, raw) if raw is not None else None
        var, raw = lookup("STATUSES")
        statuses = parse_statuses(var, raw) if raw is not None else None
        var, raw = lookup("SAMPLE_RATE")
        rate = parse_sample_rate(var, raw) if raw is not None else 1.0
        return cls(methods=methods, path_prefixes=prefixes, statuses=statuses, sample_rate=rate)

    def decide(self, event: Event) -> Decision:
        """``deliver``, ``filtered`` (fails a criterion) or ``sampled`` (out of the sample)."""
        if self.methods is not None and event.method.upper() not in self.methods:
            return "filtered"
        if self.path_prefixes is not None and not event.path.startswith(self.path_prefixes):
            return "filtered"
        if self.statuses is not None and not any(
            low <= event.status <= high for low, high in self.statuses
        ):
            return "filtered"
        if self.sample_rate < 1.0 and not in_sample(event.event_id, self.sample_rate):
            return "sampled"
        return "deliver"


def in_sample(event_id: str, rate: float) -> bool:
    """Whether ``event_id`` falls in a sample of ``rate``; the same id always answers alike."""
    # blake2b rather than hash(): str hashes are salted per process.
    digest = hashlib.blake2b(event_id.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < rate * _HASH_SPACE


def _items(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def parse_methods(var: str, raw: str) -> frozenset[str] | None:
    """``POST,PUT`` -> {"POST", "PUT"}; ``*`` -> None (every method)."""
    items = _items(raw)
    if items == ["*"]:
        return None
    methods = frozenset(item.upper() for item in items)
    bad = sorted(m for m in methods if not _METHOD_RE.match(m))
    if not methods or bad:
        raise ConfigError(
            f"{var} must be a comma-separated list of HTTP methods (e.g. POST,PUT) or '*'; "
            f"got {raw!r}"
        )
    return methods


def parse_path_prefixes(var: str, raw: str) -> tuple[str, ...]:
    """``/v1/chat,/v1/embeddings`` -> ("/v1/chat", "/v1/embeddings")."""
    prefixes = tuple(_items(raw))
    if not prefixes or any(not p.startswith("/") for p in prefixes):
        raise ConfigError(
            f"{var} must be a comma-separated list of paths starting with '/'; got {raw!r}"
        )
    return prefixes


def parse_statuses(var: str, raw: str) -> tuple[tuple[int, int], ...]:
    """``200-299,401,5xx`` -> ((200, 299), (401, 401), (500, 599))."""
    ranges: list[tuple[int, int]] = []
    for item in _items(raw) or [""]:
        match = _STATUS_RE.match(item.lower())
        if match is None:
            raise ConfigError(
                f"{var} must list status codes, ranges and classes like '200-299,401,5xx'; "
                f"{item!r} is none of these"
            )
        code, upper, klass = match.groups()
        if klass is not None:
            low, high = int(klass) * 100, int(klass) * 100 + 99
        else:
            low = int(code)
            high = int(upper) if upper is not None else low
        if not 100 <= low <= high <= 599:
            raise ConfigError(f"{var}: {item!r} is not a range of HTTP statuses (100-599)")
        ranges.append((low, high))
    return tuple(_merged(ranges))


def _merged(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if out and low <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], high))
        else:
            out.append((low, high))
    return out


def parse_sample_rate(var: str, raw: str) -> float:
    """A fraction between 0 and 1 (``0.25``); a percentage is refused, not guessed."""
    try:
        rate = float(raw)
    except ValueError:
        raise ConfigError(f"{var} must be a number between 0 and 1, got {raw!r}") from None
    if math.isnan(rate) or not 0.0 <= rate <= 1.0:
        raise ConfigError(f"{var} must be a number between 0 and 1, got {raw!r}")
    return rate
