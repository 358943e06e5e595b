"""The README's configuration table states the defaults the code has (it drifted once:
the batch size read 100 while the code used 500)."""

from __future__ import annotations

import re
from pathlib import Path

from dispatch_celery.settings import load_settings

README = Path(__file__).resolve().parent.parent / "README.md"
# variable -> the Settings field it sets (single-valued numeric rows of the table)
FIELDS = {
    "DISPATCH_STREAM_RESCAN": "stream_rescan",
    "DISPATCH_BATCH_SIZE": "batch_size",
    "DISPATCH_FLUSH_INTERVAL": "flush_interval",
    "DISPATCH_FLUSH_LINGER": "flush_linger",
    "DISPATCH_READ_COUNT": "read_count",
    "DISPATCH_RETRY_BUDGET": "retry_budget",
    "DISPATCH_MAX_CRASHES": "max_crashes",
    "DISPATCH_CREDENTIALS_PROBE_INTERVAL": "credentials_probe_interval",
    "DISPATCH_QUEUE_LEASE": "queue_lease",
    "DISPATCH_VISIBILITY_TIMEOUT": "visibility_timeout",
    "DISPATCH_TASK_TIME_LIMIT": "task_time_limit",
    "DISPATCH_REDIS_MEMORY_MAX_PERCENT": "redis_memory_max_percent",
    "DISPATCH_DEADLETTER_MAX_LEN": "deadletter_max_len",
    "DISPATCH_CLAIM_IDLE": "claim_idle",
    "DISPATCH_STAGED_RECOVERY": "staged_recovery",
    "DISPATCH_MAX_BODY_BYTES": "max_body_bytes",
    "DISPATCH_METRICS_PORT": "metrics_port",
}


def _table_defaults() -> dict[str, str]:
    """``variable -> default`` of the configuration table's single-variable rows."""
    text = README.read_text()
    section = text[text.index("## Configuration") : text.index("**Why these timing defaults")]
    rows: dict[str, str] = {}
    for line in section.splitlines():
        m = re.match(r"^\| `(DISPATCH_[A-Z_]+)` \|.*\| (.*) \|$", line)
        if m:
            rows[m[1]] = m[2]
    return rows


def test_the_configuration_table_shows_the_defaults_of_the_code() -> None:
    settings = load_settings({})
    rows = _table_defaults()
    for variable, attribute in FIELDS.items():
        assert variable in rows, f"{variable} is missing from the README's table"
        shown = re.match(r"^`([0-9.]+)`", rows[variable])
        assert shown, f"{variable}: no default in the README ({rows[variable]!r})"
        assert float(shown[1]) == float(getattr(settings, attribute)), (
            f"{variable}: README says {shown[1]}, the code {getattr(settings, attribute)}"
        )
