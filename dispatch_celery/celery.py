"""``celery -A dispatch_celery worker -Q <service>`` finds ``app`` here.

This module is an edge: it builds the settings from the environment once. Bad
configuration stops the worker at start with a message naming the variable.
"""

from __future__ import annotations

import sys

from dispatch_celery.app import create_app
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import load_settings

try:
    settings = load_settings()
except ConfigError as exc:
    print(f"dispatch-celery: configuration error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None

app = create_app(settings)
