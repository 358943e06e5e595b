"""Flower configuration for dispatch-celery.

Run it with::

    celery -A dispatch_celery flower --conf=flower/flowerconfig.py

How Flower reads this file (flower/command.py, tornado.options.parse_config_file): it
applies ``FLOWER_*`` environment variables first, then the command-line flags, then
*executes this file as Python* and takes every module-level name that matches one of its
options (``port``, ``db``, ...), then applies the command-line flags again. So flags win
over this file, and this file would win over ``FLOWER_*`` variables if it set an option
blindly; it therefore only replaces Flower's *defaults* (it compares against them) and
leaves anything the operator set alone. Helper names start with ``_`` so that none of
them is mistaken for a Flower option.

What it enforces:

* **Authentication is required.** One of
  - ``FLOWER_BASIC_AUTH=user:password`` (or several, comma-separated), or
    ``--basic-auth=user:password``;
  - OAuth with Flower's own options: ``FLOWER_AUTH_PROVIDER`` (e.g.
    ``flower.views.auth.GithubLoginHandler``, ``GoogleAuth2LoginHandler``,
    ``GitLabLoginHandler``, ``OktaLoginHandler``), ``FLOWER_AUTH`` (who may log in: an
    e-mail address, ``a@x.com|b@y.com``, or ``.*@example.com``), ``FLOWER_OAUTH2_KEY``,
    ``FLOWER_OAUTH2_SECRET``, ``FLOWER_OAUTH2_REDIRECT_URI`` (and
    ``FLOWER_COOKIE_SECRET`` so that logins survive a restart).
  Without either, Flower refuses to start (exit code 2, a message saying what to set)
  unless ``DISPATCH_FLOWER_ALLOW_OPEN=1`` says an open dashboard is intended (e.g. bound
  to localhost behind another proxy). Flower's ``/metrics`` and ``/healthcheck`` are
  unauthenticated by Flower's design; they show no task arguments.
* **State persists across restarts**: ``persistent=True``, stored in ``FLOWER_DB``
  (default ``./.dispatch/flower.db``), saved every minute
  (``FLOWER_STATE_SAVE_INTERVAL``, ms) and at shutdown, so a killed Flower loses at most
  a minute of history.
* **Port**: ``--port`` / ``FLOWER_PORT``, else ``$PORT`` (a PaaS gives the ``web``
  process its port there), else 5555.
* **No event content, no credentials.** Deliver tasks carry only
  ``(service, batch_id, event_count)`` (the batch itself stays in Redis), so the task
  list shows which service and batch, and how many events, and nothing else. As defence
  in depth, ``format_task`` below scrubs credential-looking strings from what the pages
  show of exceptions, tracebacks and results.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tornado.options import options as _options

_env = os.environ
_TRUE = ("1", "true", "yes", "on")


def _fail(message: str) -> None:
    print(f"dispatch-celery flower: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def _basic_auth_ok(credentials: list[str]) -> bool:
    return all(":" in c and c.split(":", 1)[0] and c.split(":", 1)[1] for c in credentials)


def _oauth_missing() -> list[str]:
    wanted = {
        "FLOWER_AUTH_PROVIDER": _options.auth_provider,
        "FLOWER_OAUTH2_KEY": _options.oauth2_key or _env.get("FLOWER_OAUTH2_KEY"),
        "FLOWER_OAUTH2_SECRET": _options.oauth2_secret or _env.get("FLOWER_OAUTH2_SECRET"),
        "FLOWER_OAUTH2_REDIRECT_URI": (
            _options.oauth2_redirect_uri or _env.get("FLOWER_OAUTH2_REDIRECT_URI")
        ),
    }
    return [name for name, value in wanted.items() if not value]


# --- authentication ----------------------------------------------------------------------
_basic = [c for c in (_options.basic_auth or []) if c]
if _basic and not _basic_auth_ok(_basic):
    _fail("FLOWER_BASIC_AUTH must be user:password (comma-separated for several users)")
if _options.auth and _oauth_missing():
    _fail(
        "FLOWER_AUTH is set, so OAuth login is wanted, but "
        + ", ".join(_oauth_missing())
        + " is not; see flower/flowerconfig.py"
    )
if not _basic and not _options.auth:
    if _env.get("DISPATCH_FLOWER_ALLOW_OPEN", "").strip().lower() in _TRUE:
        print(
            "dispatch-celery flower: WARNING: no authentication configured and "
            "DISPATCH_FLOWER_ALLOW_OPEN is set: anyone who reaches this port sees the "
            "dashboard and can control workers",
            file=sys.stderr,
            flush=True,
        )
    else:
        _fail(
            "refusing to start without authentication. Set FLOWER_BASIC_AUTH=user:password, "
            "or OAuth (FLOWER_AUTH_PROVIDER, FLOWER_AUTH, FLOWER_OAUTH2_KEY, "
            "FLOWER_OAUTH2_SECRET, FLOWER_OAUTH2_REDIRECT_URI), or DISPATCH_FLOWER_ALLOW_OPEN=1 "
            "if an open dashboard is really intended"
        )

# --- port: flag / FLOWER_PORT > $PORT (PaaS) > 5555 ---------------------------------------
if _options.port == 5555 and _env.get("PORT", "").strip():
    try:
        port = int(_env["PORT"])
    except ValueError:
        _fail(f"PORT must be a port number, got {_env['PORT']!r}")

# --- persistent state ---------------------------------------------------------------------
persistent = True
if _options.db == "flower":  # Flower's default name: put it under the state directory
    db = os.path.join(".dispatch", "flower.db")
_db_dir = os.path.dirname(os.path.abspath(globals().get("db", _options.db)))
os.makedirs(_db_dir, exist_ok=True)
if not _options.state_save_interval:
    state_save_interval = 60_000  # ms; also saved at shutdown (SIGTERM)
if _options.max_tasks == 100_000:
    # Saving pickles the whole state in Flower's event loop: keep it small enough that a
    # save takes well under a second. The Redis counters (`dispatch metrics`) keep totals.
    max_tasks = 10_000
if _options.purge_offline_workers is None:
    purge_offline_workers = 3600  # s; workers of old deploys leave the list after an hour

# --- what the pages show -------------------------------------------------------------------
if _options.tasks_columns == "name,uuid,state,received,runtime,worker":
    # args = (service, batch_id, event_count): which batch of which service, how many events
    tasks_columns = "name,state,args,received,runtime,retries,worker,uuid"


def format_task(task: Any) -> Any:
    """Scrub credential-looking text from a task before a page shows it (defence in depth:
    the task's arguments never carry content or credentials in the first place)."""
    from dispatch_celery.ops.logs import scrub_text

    for _name in ("args", "kwargs", "result", "exception", "traceback"):
        _value = getattr(task, _name, None)
        if isinstance(_value, str):
            setattr(task, _name, scrub_text(_value))
    return task
