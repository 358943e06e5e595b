"""Compression of batch blobs: ratio and speed of zstd levels on realistic events.

    python benchmarks/compression.py                  # levels 1-3, batches of 100
    python benchmarks/compression.py --levels -1,1,3,6 --events 20000

Two inputs:
* the sample events (``dispatch_celery.cli.sample``: the mix ``dispatch publish --sample``
  writes, ~1.8 KB each: chat, SSE, gzip bodies, embeddings, errors), in batches of
  ``--batch-size`` exactly as the bridge encodes them;
* the spec's stream vectors (shared/spec/stream-vectors.json; ``DISPATCH_SPEC_DIR`` or found
  walking up from here): each vector once, as one batch, and one by one.

Per level it prints the ratio (raw record bytes / blob bytes) and the single-thread speed of
compressing and decompressing, in MB/s of raw record and in events/s. "dict" rows compress
with a zstd dictionary trained on other sample events (seed 1), to show whether a shared
dictionary would be worth its distribution and versioning trouble.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import zstandard

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dispatch_celery.batches import codec  # noqa: E402
from dispatch_celery.batches.codec import Entry  # noqa: E402
from dispatch_celery.cli.sample import sample_events  # noqa: E402
from tests.vendor_servers import load_vectors, vectors_path  # noqa: E402

STREAM = "llm-proxy-events"
GROUP = "dispatch-file"


def _entries(datas: Sequence[bytes]) -> list[Entry]:
    return [Entry(f"1736937000123-{i}", d) for i, d in enumerate(datas)]


def _batches(datas: Sequence[bytes], size: int) -> list[bytes]:
    """The uncompressed records of consecutive batches of ``size`` events."""
    return [
        codec.encode_record(STREAM, GROUP, _entries(datas[i : i + size]))
        for i in range(0, len(datas), size)
    ]


def _timed(fn: Callable[[], object], min_s: float = 0.5) -> float:
    """Seconds per call of ``fn`` (repeated for at least ``min_s``)."""
    fn()  # warm up
    n = 0
    start = time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_s:
            return elapsed / n


def measure(
    label: str,
    records: Sequence[bytes],
    events: int,
    level: int,
    zdict: zstandard.ZstdCompressionDict | None = None,
) -> None:
    cctx = (
        zstandard.ZstdCompressor(level=level, dict_data=zdict)
        if zdict is not None
        else zstandard.ZstdCompressor(level=level)
    )
    dctx = (
        zstandard.ZstdDecompressor(dict_data=zdict)
        if zdict is not None
        else zstandard.ZstdDecompressor()
    )
    blobs = [cctx.compress(r) for r in records]
    raw = sum(len(r) for r in records)
    packed = sum(len(b) + 4 for b in blobs)  # + the DCZ1 magic

    def compress_all() -> None:
        for r in records:
            cctx.compress(r)

    def decompress_all() -> None:
        for b in blobs:
            dctx.decompress(b)

    t_c = _timed(compress_all)
    t_d = _timed(decompress_all)
    mb = raw / 1e6
    print(
        f"{label:<34} {level:>5} {raw / packed:>7.2f}x "
        f"{mb / t_c:>9.0f} {events / t_c:>12,.0f} {mb / t_d:>9.0f} {events / t_d:>12,.0f}"
    )


def header() -> None:
    print(
        f"{'input':<34} {'level':>5} {'ratio':>8} {'comp MB/s':>9} {'comp ev/s':>12} "
        f"{'dec MB/s':>9} {'dec ev/s':>12}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--levels", default="1,2,3", help="comma-separated zstd levels [1,2,3]")
    ap.add_argument("--events", type=int, default=10_000, help="sample events [10000]")
    ap.add_argument("--batch-size", type=int, default=100, help="events per batch [100]")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    samples = list(sample_events(args.events))
    avg = sum(map(len, samples)) / len(samples)
    print(
        f"zstandard {zstandard.__version__} (libzstd {zstandard.ZSTD_VERSION}), "
        f"codec level {codec.LEVEL}; {len(samples)} sample events, {avg:,.0f} B each"
    )
    trained = zstandard.train_dictionary(64 * 1024, [bytes(s) for s in sample_events(5000, seed=1)])
    batches = _batches(samples, args.batch_size)
    singles = _batches(samples[:2000], 1)
    header()
    for level in levels:
        measure(f"sample, batches of {args.batch_size}", batches, len(samples), level)
    for level in levels:
        measure(
            f"sample, batches of {args.batch_size}, dict", batches, len(samples), level, trained
        )
    for level in levels:
        measure("sample, one event per blob", singles, len(singles), level)
    for level in levels:
        measure("sample, one event per blob, dict", singles, len(singles), level, trained)

    path = vectors_path(REPO)
    if path is None:
        print("spec vectors not found (set DISPATCH_SPEC_DIR); skipped")
        return
    datas = [
        v["xadd_fields"]["data"].encode()
        for v in load_vectors(path).values()
        if "data" in v.get("xadd_fields", {})
    ]
    print(f"\nspec vectors: {len(datas)} entries, {sum(map(len, datas)):,} B ({path})")
    header()
    whole = [codec.encode_record(STREAM, GROUP, _entries(datas))]
    each = _batches(datas, 1)
    for level in levels:
        measure("vectors, all in one batch", whole, len(datas), level)
    for level in levels:
        measure("vectors, one per blob", each, len(datas), level)
    for level in levels:
        measure("vectors, one per blob, dict", each, len(datas), level, trained)

    # The codec end to end (record building + compression), as the bridge calls it.
    entries = [_entries(samples[i : i + args.batch_size]) for i in range(0, len(samples), 100)]

    def encode_all() -> None:
        for e in entries:
            codec.encode(STREAM, GROUP, e)

    blobs = [codec.encode(STREAM, GROUP, e) for e in entries]

    def decode_all() -> None:
        for b in blobs:
            codec.decode(b)

    t_e, t_d = _timed(encode_all), _timed(decode_all)
    print(
        f"\ncodec.encode (level {codec.LEVEL}): {len(samples) / t_e:,.0f} events/s; "
        f"codec.decode: {len(samples) / t_d:,.0f} events/s (one core)"
    )


if __name__ == "__main__":
    main()
