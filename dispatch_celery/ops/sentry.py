"""Error reporting to Sentry, scrubbed (DESIGN.md invariant 7: secrets never leave).

With ``SENTRY_DSN`` set, bridges and workers report errors: unhandled exceptions, and
every log record at ERROR or above (the deliver task logs a backend's unexpected failure
with its traceback; the bridge logs what it cannot recover from). Workers also get
``CeleryIntegration`` (task failures, with the task name and its arguments, which are only
``(service, batch_id, event_count)``).

What keeps event content and credentials out of the reports:

* ``send_default_pii=False``, ``include_local_variables=False`` (a frame's locals hold
  events and clients), ``max_request_body_size="never"``;
* only the integrations listed below: no auto-enabled Redis/HTTP integrations, whose
  breadcrumbs would carry Redis commands (batch blobs) and request URLs; no ``argv``
  integration (a command line may carry ``--basic-auth=user:password``);
* ``before_send`` / ``before_breadcrumb`` drop request data and frame variables, cut long
  strings (an event body quoted in an error message is cut to its first few hundred
  characters) and run every string through ``logs.Scrubber``: credential-looking text
  and the exact values of the configured credentials (``logs.known_secrets``) become
  ``[REDACTED]``.

``SENTRY_ENVIRONMENT`` and ``SENTRY_RELEASE`` are read by the SDK itself.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any, cast

import sentry_sdk
from sentry_sdk.integrations import Integration
from sentry_sdk.integrations.atexit import AtexitIntegration
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.dedupe import DedupeIntegration
from sentry_sdk.integrations.excepthook import ExcepthookIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.integrations.modules import ModulesIntegration
from sentry_sdk.integrations.threading import ThreadingIntegration
from sentry_sdk.types import Breadcrumb, BreadcrumbHint, Event, Hint

from dispatch_celery.ops.logs import Scrubber, known_secrets
from dispatch_celery.settings import Settings

MAX_STRING = 512  # characters kept of one string in a report
_TRUNCATED = "...[truncated]"


def _cut(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_STRING else value[:MAX_STRING] + _TRUNCATED
    if depth > 20:
        return value
    if isinstance(value, dict):
        return {k: _cut(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        return [_cut(v, depth + 1) for v in value]
    return value


class EventScrubber:
    """``before_send`` and ``before_breadcrumb`` hooks."""

    def __init__(self, scrubber: Scrubber) -> None:
        self.scrubber = scrubber

    def clean(self, event: dict[str, Any]) -> dict[str, Any]:
        event.pop("request", None)
        extra = event.get("extra")
        if isinstance(extra, dict):
            extra.pop("sys.argv", None)
        for exc in (event.get("exception") or {}).get("values") or []:
            for frame in (exc.get("stacktrace") or {}).get("frames") or []:
                frame.pop("vars", None)
        for thread in (event.get("threads") or {}).get("values") or []:
            for frame in (thread.get("stacktrace") or {}).get("frames") or []:
                frame.pop("vars", None)
        cleaned: dict[str, Any] = self.scrubber.value(_cut(event))
        return cleaned

    def before_send(self, event: Event, hint: Hint) -> Event | None:
        return cast(Event, self.clean(cast(dict[str, Any], event)))

    def before_breadcrumb(self, crumb: Breadcrumb, hint: BreadcrumbHint) -> Breadcrumb | None:
        return self.clean(crumb)


def _release() -> str | None:
    try:
        return f"dispatch-celery@{version('dispatch-celery')}"
    except PackageNotFoundError:
        return None


def init_sentry(settings: Settings, component: str) -> bool:
    """Start reporting errors to ``settings.sentry_dsn``; False (and nothing done) without
    a DSN. ``component`` ("bridge", "worker", ...) becomes the ``component`` tag; "worker"
    adds the Celery integration."""
    if not settings.sentry_dsn:
        return False
    integrations: list[Integration] = [
        AtexitIntegration(),
        DedupeIntegration(),
        ExcepthookIntegration(),
        ModulesIntegration(),
        ThreadingIntegration(),
        LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
    ]
    if component == "worker":
        # No trace propagation: it would add headers to every task message for nothing.
        integrations.append(CeleryIntegration(propagate_traces=False))
    hooks = EventScrubber(Scrubber([*known_secrets(settings), settings.sentry_dsn]))
    sentry_sdk.init(
        dsn=settings.sentry_dsn,
        release=_release(),
        integrations=integrations,
        default_integrations=False,
        auto_enabling_integrations=False,
        send_default_pii=False,
        include_local_variables=False,
        max_request_body_size="never",
        before_send=hooks.before_send,
        before_breadcrumb=hooks.before_breadcrumb,
    )
    sentry_sdk.set_tag("component", component)
    return True
