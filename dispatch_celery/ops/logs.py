"""Logging: configured by the edges (CLI, Celery's ``setup_logging`` signal), never at import.

``DISPATCH_LOG_FORMAT=text`` (default) prints ``time level logger message key=value ...``;
``json`` prints one JSON object per line (``ts``, ``level``, ``logger``, ``msg``, the
``extra=`` fields, ``exc`` for a traceback). Structured fields come from ``extra=`` and never
include credentials or event bodies.

Every line also goes through a :class:`Scrubber` (defence in depth, DESIGN.md invariant 7):
a library or a backend may put a key into an exception message or a URL, and a log line
must not carry it on. The scrubber replaces credential-looking strings and, when the edge
passes them (``configure_logging(..., secrets=known_secrets(settings))``), the exact values
of the configured credentials. Sentry events go through the same scrubber (``sentry.py``).
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import urlparse

import orjson

from dispatch_celery.settings import Settings

REDACTED = "[REDACTED]"
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}

# Broader than the content redactor's patterns on purpose (short ``sk-`` keys too): a log
# line or an error report loses nothing of value when a look-alike is masked.
_SENSITIVE_NAMES = (
    r"api[_-]?key|x-api-key|apikey|authorization|proxy-authorization|access[_-]?token|"
    r"refresh[_-]?token|auth[_-]?token|token|client[_-]?secret|secret[_-]?key|secret|"
    r"password|passwd|pwd|private[_-]?key|cookie|set-cookie"
)
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # "<name>: <value>", "<name>=<value>", '"<name>": "<value>"': keep the name.
    (re.compile(
        rf"(?P<keep>(?<![A-Za-z0-9_-])(?i:{_SENSITIVE_NAMES})[\"']?\s*[:=]\s*[\"']?"
        r"(?:(?i:bearer|basic|token)\s+)?)[^\s\"',;&}\]]+"
    ), r"\g<keep>" + REDACTED),
    (re.compile(r"(?P<keep>(?i:\bbearer|\bbasic)\s+)[A-Za-z0-9._~+/-]{8,}=*"),
     r"\g<keep>" + REDACTED),
    (re.compile(r"(?<![A-Za-z0-9_-])(?:sk|rk)-[A-Za-z0-9_-]{6,}"), REDACTED),
    (re.compile(r"eyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"(?<![A-Za-z0-9])A[KS]IA[0-9A-Z]{16}(?![A-Za-z0-9])"), REDACTED),
    (re.compile(r"gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,}|xox[abprs]-[\w-]{10,}"),
     REDACTED),
    # URL user info: scheme://user:password@host
    (re.compile(r"(?P<keep>://[^/\s:@]*:)[^/\s@]+@"), r"\g<keep>" + REDACTED + "@"),
)  # fmt: skip
# Settings whose values are credentials, by the end of their name.
_SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|PASS|DSN|AUTH|CREDENTIALS?)$")
_MIN_SECRET_LEN = 6  # shorter values ("1", "true") would mask half the log


def known_secrets(settings: Settings) -> list[str]:
    """The configured credential values: ``*_KEY``, ``*_SECRET``, ``*_TOKEN``,
    ``*_PASSWORD``, ``*_AUTH``, ``*_DSN`` settings and passwords inside Redis/broker URLs."""
    found: set[str] = set()
    for name, raw in settings.env.items():
        value = raw.strip()
        if _SECRET_NAME.search(name.upper()) and len(value) >= _MIN_SECRET_LEN:
            found.add(value)
            for part in value.split(","):  # FLOWER_BASIC_AUTH=user:pass,user2:pass2
                _, _, password = part.partition(":")
                if len(password) >= _MIN_SECRET_LEN:
                    found.add(password)
    for url in (settings.redis_url, settings.broker_url):
        url_password = urlparse(url).password
        if url_password and len(url_password) >= _MIN_SECRET_LEN:
            found.add(url_password)
    return sorted(found, key=len, reverse=True)  # longest first: no partial leftovers


class Scrubber:
    """Replaces credential-looking text and known secret values with ``[REDACTED]``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def text(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
        return text

    def value(self, value: Any, depth: int = 0) -> Any:
        """``value`` with every string inside scrubbed (dicts, lists and tuples rebuilt)."""
        if isinstance(value, str):
            return self.text(value)
        if depth > 20:  # deeper than any log record or error report we produce
            return value
        if isinstance(value, dict):
            return {k: self.value(v, depth + 1) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.value(v, depth + 1) for v in value)
        return value


_DEFAULT = Scrubber()


def scrub_text(text: str) -> str:
    """``text`` with credential-looking parts replaced (patterns only, no known values)."""
    return _DEFAULT.text(text)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _ts(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
        f".{int(record.msecs):03d}Z"
    )


class TextFormatter(logging.Formatter):
    """``time level logger message key=value ...``, scrubbed."""

    def __init__(self, scrubber: Scrubber | None = None) -> None:
        super().__init__()
        self.scrubber = scrubber or _DEFAULT

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_ts(record)} {record.levelname:<7} {record.name} {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return self.scrubber.text(line)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, every string scrubbed."""

    def __init__(self, scrubber: Scrubber | None = None) -> None:
        super().__init__()
        self.scrubber = scrubber or _DEFAULT

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _ts(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            doc.setdefault(key, value)  # an extra never overwrites ts/level/logger/msg
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        # default=str first, then scrub: non-JSON values (exceptions, objects) become their
        # str() and get scrubbed like everything else.
        plain = orjson.loads(orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS))
        return orjson.dumps(self.scrubber.value(plain)).decode()


def configure_logging(
    level: str = "info",
    fmt: str = "text",
    stream: TextIO | None = None,
    secrets: Iterable[str] = (),
) -> None:
    """Install one handler on the root logger (text or JSON), replacing any others.

    ``secrets``: exact values to mask in every line, e.g. ``known_secrets(settings)``.
    """
    scrubber = Scrubber(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(scrubber) if fmt == "json" else TextFormatter(scrubber))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that would log request details at INFO/DEBUG stay at WARNING.
    for noisy in ("urllib3", "requests", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
