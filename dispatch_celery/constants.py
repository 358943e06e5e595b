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
DEFAULT_BATCH_SIZE = 100  # events per batch / task
DEFAULT_FLUSH_INTERVAL_S = 1.0  # a partial batch is flushed after this long
DEFAULT_READ_COUNT = 500  # entries per XREADGROUP call
DEFAULT_MAX_ATTEMPTS = 8  # delivery attempts before a batch's remaining runs are dead-lettered
DEFAULT_VISIBILITY_TIMEOUT_S = 300  # broker redelivers an unacknowledged task after this
DEFAULT_TASK_TIME_LIMIT_S = 120  # hard limit of one delivery attempt
DEFAULT_RETRY_BASE_DELAY_S = 2.0  # first backoff step
DEFAULT_RETRY_MAX_DELAY_S = 120.0  # cap of one backoff step (also caps Retry-After)
DEFAULT_HIGH_WATER_BATCHES = 200  # bridge pauses reading above this many batches in flight
DEFAULT_HIGH_WATER_BYTES = 256 * 1024 * 1024  # ... or above this many raw bytes in flight
DEFAULT_CLAIM_IDLE_S = 60.0  # entries idle this long in a dead consumer's PEL are claimed
DEFAULT_STAGED_RECOVERY_S = 15.0  # a staged batch older than this lost its bridge
DEFAULT_MAX_BODY_BYTES = 1024 * 1024  # cap of one run's input and of its output
DEFAULT_FILE_PATH = "./dispatch-events.jsonl"
DEFAULT_FILE_FORMAT = "record"
DEFAULT_METRICS_PORT = 9808
DEFAULT_METHODS = ("POST",)
HEARTBEAT_TTL_S = 30  # a bridge that has not beaten for this long is dead

# --- Celery -------------------------------------------------------------------------------
TASK_DELIVER = "dispatch.deliver"


def queue_name(service: str) -> str:
    """The Celery queue of a service is named exactly after it (``-Q helicone``)."""
    return service


def default_group(service: str) -> str:
    return f"dispatch-{service}"


# --- Redis keys ---------------------------------------------------------------------------
PREFIX = "dispatch"


def batch_key(service: str, batch_id: str) -> str:
    """The blob holding one batch's raw entries; deleted once delivered or dead-lettered."""
    return f"{PREFIX}:batch:{service}:{batch_id}"


def batch_done_key(service: str, batch_id: str) -> str:
    """SET of entry ids of a batch already delivered or dead-lettered (partial progress)."""
    return f"{PREFIX}:batch-done:{service}:{batch_id}"


def staged_key(service: str) -> str:
    """ZSET batch_id -> staging time (s): blob stored, task not yet confirmed by the broker."""
    return f"{PREFIX}:staged:{service}"


def inflight_key(service: str) -> str:
    """HASH batch_id -> raw bytes: task enqueued, batch not yet finished."""
    return f"{PREFIX}:inflight:{service}"


def inflight_bytes_key(service: str) -> str:
    """Counter of the raw bytes of all batches in ``inflight_key``."""
    return f"{PREFIX}:inflight-bytes:{service}"


def deadletter_key(service: str) -> str:
    """Dead-letter stream of a service."""
    return f"{PREFIX}:dlq:{service}"


def stats_key(service: str) -> str:
    """HASH of cluster-wide counters of a service (see ``stats.Counter``)."""
    return f"{PREFIX}:stats:{service}"


def latency_key(service: str) -> str:
    """HASH of the delivery-latency histogram of a service (bucket -> count, sum)."""
    return f"{PREFIX}:latency:{service}"


def heartbeat_key(service: str, consumer: str) -> str:
    """Expiring key a live bridge refreshes; its value is a JSON status line."""
    return f"{PREFIX}:bridge:{service}:{consumer}"


def heartbeat_pattern(service: str) -> str:
    return f"{PREFIX}:bridge:{service}:*"


def ratelimit_key(service: str) -> str:
    """GCRA state (theoretical arrival time) shared by all workers of a service."""
    return f"{PREFIX}:ratelimit:{service}"


def ratelimit_pause_key(service: str) -> str:
    """Set by a worker that got a 429: every worker of the service pauses until it expires."""
    return f"{PREFIX}:ratelimit-pause:{service}"


def batch_attempts_key(service: str, batch_id: str) -> str:
    """Counter of delivery attempts of a batch, across retries *and* worker crashes."""
    return f"{PREFIX}:batch-attempts:{service}:{batch_id}"


def trim_cursor_key(service: str) -> str:
    """HASH group -> "<last-delivered id>|<count>": trimmed entries already counted."""
    return f"{PREFIX}:trim-cursor:{service}"


def touched_key(service: str) -> str:
    """ZSET batch_id -> time (s) its last attempt began; a batch untouched for longer than
    any retry could wait has lost its task, and the bridge re-publishes it."""
    return f"{PREFIX}:touched:{service}"
