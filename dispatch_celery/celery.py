"""``celery -A dispatch_celery worker -Q <service>`` finds ``app`` here.

This module is an edge: it builds the settings from the environment once. Bad
configuration stops the worker at start with a message naming the variable.

Sentry (``SENTRY_DSN``) starts on ``celeryd_init``: that signal fires only in a *worker*'s
main process (not for ``celery flower`` or ``celery inspect``, which import this module
too), after the worker is set up and before the prefork pool forks its children. The
children inherit the initialised SDK; its transport thread is per process (it restarts
itself when it finds a new pid), and the Celery integration patches task tracing before
any child builds a tracer. That is the order Sentry documents for Celery workers.
"""

from __future__ import annotations

import sys
from typing import Any

from celery.signals import celeryd_init

from dispatch_celery.app import create_app
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import load_settings

try:
    settings = load_settings()
except ConfigError as exc:
    print(f"dispatch-celery: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

app = create_app(settings)


@celeryd_init.connect
def _start_sentry(**_: Any) -> None:
    # Imported here: `celery flower` / `celery inspect` import this module and need no SDK.
    from dispatch_celery.ops.sentry import init_sentry

    init_sentry(settings, "worker")
