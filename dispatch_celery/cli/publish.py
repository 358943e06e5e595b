"""``dispatch publish``: write events into the stream like llm-proxy does."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import cycle
from pathlib import Path

import orjson
import redis

from dispatch_celery.errors import ConfigError

CHUNK = 1000


def publish_events(
    client: redis.Redis,
    stream: str | Sequence[str],
    events: Iterable[bytes],
    *,
    maxlen: int | None = None,
) -> int:
    """XADD each event as ``data``, round-robin over the stream keys given (a producer
    sharding its stream); returns how many were written."""
    keys = cycle([stream] if isinstance(stream, str) else list(stream))
    n = 0
    pipe = client.pipeline(transaction=False)
    for data in events:
        pipe.xadd(next(keys), {"data": data}, maxlen=maxlen, approximate=True)
        n += 1
        if len(pipe) >= CHUNK:
            pipe.execute()
    if len(pipe):
        pipe.execute()
    return n


def publish_targets(client: redis.Redis, spec: str) -> list[str]:
    """The stream keys ``DISPATCH_STREAM`` names now (``ConfigError`` when a pattern
    matches none: there is nothing to publish to)."""
    from dispatch_celery.ingest.streamset import resolve

    keys = resolve(client, spec)
    if not keys:
        raise ConfigError(
            f"DISPATCH_STREAM={spec!r} matches no stream yet; name the keys to write to"
        )
    return keys


def publish_archive(client: redis.Redis, stream: str, path: Path) -> tuple[int, int]:
    """Replay a ``raw`` archive; keeps each entry's original id (its time, and the stable id
    of events without a RequestID) where the stream allows it, else lets Redis assign one.
    Returns (kept ids, new ids)."""
    kept = fresh = 0
    batch: list[tuple[str, bytes]] = []

    def flush() -> None:
        nonlocal kept, fresh
        pipe = client.pipeline(transaction=False)
        for sid, data in batch:
            pipe.xadd(stream, {"data": data}, id=sid or "*")
        results = pipe.execute(raise_on_error=False)
        retry = [
            data
            for (_, data), res in zip(batch, results, strict=True)
            if isinstance(res, Exception)
        ]
        kept += len(batch) - len(retry)
        if retry:
            fresh += publish_events(client, stream, retry)
        batch.clear()

    for sid, data in read_archive(path):
        batch.append((sid, data))
        if len(batch) >= CHUNK:
            flush()
    if batch:
        flush()
    return kept, fresh


def read_archive(path: Path) -> Iterable[tuple[str, bytes]]:
    """Events of a ``raw`` file archive (lines ``{"stream_id": ..., "data": "<json>"}``)."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = orjson.loads(line)
                data = doc["data"]
            except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{path}:{lineno}: not a raw archive line (expected an object with a "
                    f"'data' string; write archives with DISPATCH_FILE_FORMAT=raw): {exc}"
                ) from None
            if not isinstance(data, str):
                raise ConfigError(f"{path}:{lineno}: 'data' must be a string")
            sid = doc.get("stream_id")
            yield (sid if isinstance(sid, str) else ""), data.encode()
