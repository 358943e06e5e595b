"""Every name that Redis or the broker sees, and every default with its unit.

Keys are namespaced under ``dispatch:`` so that dispatch-celery can share a Redis with
llm-proxy and anything else; nothing here touches a key it did not create, except the
producer's stream (read through our own consumer groups only).
"""

from __future__ import annotations

# --- the producer's stream -------------------------------------------------------------
DEFAULT_STREAM = "llm-proxy-events"
DATA_FIELD = b"data"

# --- defaults (units in the names) -------------------------------------------------------
DEFAULT_REDIS_URL = "redis://localhost:6379/0"
# Events per batch / task, at most. A task costs the worker ~2 ms besides its events
# (Celery's consumer and task events, the begin and commit round trips, one fsync):
# measured with benchmarks/drain.py, 500 a batch drains ~1.6x faster than 100 did. Quiet
# traffic is not held back by it (DISPATCH_FLUSH_LINGER), big events by the byte cap.
DEFAULT_BATCH_SIZE = 500
DEFAULT_BATCH_MAX_BYTES = 4 * 1024 * 1024  # ... and raw event bytes per batch, at most
DEFAULT_FLUSH_INTERVAL_S = 1.0  # a partial batch is flushed after this long
# ... or this long after its first entry once the bridge has caught up (a read came back
# short): quiet traffic is delivered within ~the linger, busy traffic still fills batches.
# At most ~1/linger partial batches a second: 10 tasks/s at 1k events/s, as batches of
# 100 filled in 1 s made before (benchmarks/latency.py: p99 ~150 ms at 20 and 1k/s).
DEFAULT_FLUSH_LINGER_S = 0.1
DEFAULT_READ_COUNT = 500  # entries per XREADGROUP call
DEFAULT_VISIBILITY_TIMEOUT_S = 300  # broker redelivers an unacknowledged task after this
DEFAULT_TASK_TIME_LIMIT_S = 120  # hard limit of one delivery attempt
DEFAULT_RETRY_BASE_DELAY_S = 2.0  # first backoff step
DEFAULT_RETRY_MAX_DELAY_S = 300.0  # cap of one backoff step (waits are out of the broker)
DEFAULT_RETRY_BUDGET_S = 3600.0  # attempts without progress for this long: dead-letter
DEFAULT_MAX_CRASHES = 5  # attempts in a row that never ended (worker killed): dead-letter
DEFAULT_CREDENTIALS_PROBE_INTERVAL_S = 30.0  # a paused service is probed this often
DEFAULT_QUEUE_LEASE_S = 300.0  # a published batch whose task has not begun by then is re-published
# The in-flight buffer is what holds a vendor outage (llm-proxy trims its stream to ~10,000
# entries). Sizing: a 1-hour outage at 1,000 events/s of ~8 KB is 3.6 M events, ~29 GB raw,
# 36,000 full batches of 100; blobs are zstd-compressed (~8.7x measured on the sample
# events, see benchmarks/compression.py), ~3.3 GB in Redis. Redis needs that much memory
# free (maxmemory above it, with room for the streams): `dispatch health` checks it.
DEFAULT_HIGH_WATER_BATCHES = 50_000  # bridge pauses reading above this many batches in flight
DEFAULT_HIGH_WATER_BYTES = 4 * 1024**3  # ... or above this many compressed bytes in Redis
DEFAULT_DEADLETTER_MAX_LEN = 100_000  # dead-letter stream bound (exact; overflow counted)
DEFAULT_REDIS_MEMORY_MAX_PERCENT = 80  # bridge pauses when Redis uses this much of maxmemory
DEFAULT_STREAM_RESCAN_S = 30.0  # a glob DISPATCH_STREAM is re-resolved (SCAN) this often
DEFAULT_CLAIM_IDLE_S = 60.0  # entries idle this long in a dead consumer's PEL are claimed
DEFAULT_STAGED_RECOVERY_S = 15.0  # a staged batch older than this lost its bridge
DEFAULT_MAX_BODY_BYTES = 1024 * 1024  # cap of one run's input and of its output
DEFAULT_FILE_PATH = "./dispatch-events.jsonl"
DEFAULT_FILE_FORMAT = "record"
DEFAULT_METRICS_PORT = 9808
DEFAULT_METHODS = ("POST",)
HEARTBEAT_TTL_S = 30  # a bridge that has not beaten for this long is dead
# The checks of `dispatch health` (names users pass to --only), in report order.
HEALTH_CHECKS = (
    "redis", "eviction", "bridges", "workers", "lag", "dead-letters", "buffer", "paused",
)  # fmt: skip

# --- Celery -------------------------------------------------------------------------------
TASK_DELIVER = "dispatch.deliver"


def queue_name(service: str) -> str:
    """The Celery queue of a service is named exactly after it (``-Q helicone``)."""
    return service


def default_group(service: str) -> str:
    return f"dispatch-{service}"


# --- Redis keys ---------------------------------------------------------------------------
PREFIX = "dispatch"


def _key(kind: str, *parts: str) -> str:
    """``dispatch:<kind>:<part>:...``: the one place a Redis key is spelled."""
    return ":".join((PREFIX, kind, *map(str, parts)))


def batch_key(service: str, batch_id: str) -> str:
    """The blob holding one batch's raw entries; deleted once delivered or dead-lettered."""
    return _key("batch", service, batch_id)


def batch_done_key(service: str, batch_id: str) -> str:
    """SET of entry ids of a batch already delivered or dead-lettered (partial progress)."""
    return _key("batch-done", service, batch_id)


def staged_key(service: str) -> str:
    """HASH batch_id -> "<bridge consumer>|<staging time (s)>": blob stored, task not yet
    confirmed by the broker (the bridge that restarts re-publishes its own at once)."""
    return _key("staged", service)


def inflight_key(service: str) -> str:
    """HASH batch_id -> "<compressed bytes> <raw bytes>" (a plain number from an earlier
    version counts as both): stored by a bridge, not yet finished (delivered or
    dead-lettered). HLEN is the number of batches in flight."""
    return _key("inflight", service)


def inflight_bytes_key(service: str) -> str:
    """Counter of the compressed bytes (blob sizes) of all batches in ``inflight_key``: what
    ``DISPATCH_HIGH_WATER_BYTES`` limits."""
    return _key("inflight-bytes", service)


def inflight_raw_bytes_key(service: str) -> str:
    """Counter of the raw (uncompressed event) bytes of all batches in ``inflight_key``."""
    return _key("inflight-raw-bytes", service)


def deadletter_key(service: str) -> str:
    """Dead-letter stream of a service."""
    return _key("dlq", service)


def stats_key(service: str) -> str:
    """HASH of cluster-wide counters of a service (see ``stats.Counter``)."""
    return _key("stats", service)


def latency_key(service: str) -> str:
    """HASH of the delivery-latency histogram of a service (bucket -> count, sum)."""
    return _key("latency", service)


def heartbeat_key(service: str, consumer: str) -> str:
    """Expiring key a live bridge refreshes; its value is a JSON status line."""
    return _key("bridge", service, consumer)


def heartbeat_pattern(service: str) -> str:
    return _key("bridge", service, "*")


def ratelimit_key(service: str) -> str:
    """GCRA state (theoretical arrival time) shared by all workers of a service."""
    return _key("ratelimit", service)


def ratelimit_pause_key(service: str) -> str:
    """Set by a worker that got a 429: every worker of the service pauses until it expires."""
    return _key("ratelimit-pause", service)


def batch_state_key(service: str, batch_id: str) -> str:
    """HASH of a batch's retry state (``delivery.retry``): attempts and crashes without
    progress, budget spent, whether an attempt is running; counted across worker crashes."""
    return _key("batch-state", service, batch_id)


def batch_lease_key(service: str, batch_id: str) -> str:
    """Lock (SET NX PX) held by the attempt running a batch: a concurrent copy does nothing."""
    return _key("batch-lease", service, batch_id)


def due_key(service: str) -> str:
    """ZSET batch_id -> unix time (s) at which a bridge must (re)publish the batch, unless it
    finished or the time was moved: the one recovery index of every batch in flight."""
    return _key("due", service)


def tickets_key(service: str) -> str:
    """HASH batch_id -> token of the one task copy allowed to run the batch (the last
    published); any other copy is stale and does nothing."""
    return _key("tickets", service)


def parked_key(service: str) -> str:
    """ZSET batch_id -> parking time: batches waiting for the outage gate or the credentials
    pause to lift; the attempt that finds the service working again wakes them."""
    return _key("parked", service)


def gate_key(service: str) -> str:
    """HASH until, delay, reason: the outage gate; while closed, attempts do not send."""
    return _key("gate", service)


def gate_probe_key(service: str) -> str:
    """Lock (SET NX PX) of the one attempt probing the service at the gate's end."""
    return _key("gate-probe", service)


def pause_key(service: str) -> str:
    """HASH reason, since: the service refused our credentials and is paused."""
    return _key("paused", service)


def pause_probe_key(service: str) -> str:
    """Lock (SET NX PX probe interval) of the one attempt probing a paused service."""
    return _key("paused-probe", service)


def trim_cursor_key(service: str) -> str:
    """HASH "<group>|<stream>" -> "<last-delivered id>|<count>": trimmed entries already
    counted (an earlier version's field was "<group>")."""
    return _key("trim-cursor", service)


def trimmed_streams_key(service: str) -> str:
    """HASH stream -> entries the producer trimmed from it before the group read them (the
    per-stream share of ``Counter.TRIMMED_UNREAD``)."""
    return _key("trimmed", service)
