"""Operations commands of ``dispatch``: ``metrics`` and ``health``.

Standalone click commands; ``cli/commands.py`` adds them to the main group
(``main.add_command``) once it is defined, at the end of that module. Like the rest of the
CLI they are thin: parse, build settings, call one function, map errors to exit codes
(2: configuration, 1: runtime / unhealthy). This module never imports ``commands``, so the
two cannot form an import cycle.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import click
import orjson

from dispatch_celery import constants as c
from dispatch_celery.cli.common import ConfigFail, services_or_fail, settings_or_fail
from dispatch_celery.errors import ConfigError


@click.command("metrics")
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    help="Port to listen on [env DISPATCH_METRICS_PORT; 9808].",
)
@click.option(
    "--address",
    default="0.0.0.0",  # noqa: S104 (an exporter listens for scrapes)
    show_default=True,
    help="Address to listen on (0.0.0.0: reachable by a Prometheus elsewhere).",
)
@click.option(
    "--service",
    "services",
    multiple=True,
    help="Only these services [installed backends + services found in Redis].",
)
def metrics(port: int | None, address: str, services: tuple[str, ...]) -> None:
    """Serve Prometheus metrics (cluster-wide, read from Redis at scrape time)."""
    # Imported per command, like cli.py does: `dispatch --help` stays fast.
    from dispatch_celery.ops.logs import configure_logging, known_secrets
    from dispatch_celery.ops.metrics import serve

    settings = settings_or_fail()
    chosen = services_or_fail(services)
    configure_logging(settings.log_level, settings.log_format, secrets=known_secrets(settings))
    stop = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    try:
        serve(
            settings,
            stop,
            address=address,
            port=port,
            services=chosen,
            on_ready=lambda host, p: click.echo(f"metrics on http://{host}:{p}/metrics"),
        )
    except OSError as exc:  # port taken, address not local
        raise click.ClickException(f"cannot serve metrics: {exc}") from None


@click.command("health")
@click.option(
    "--service",
    "services",
    multiple=True,
    help="Check these services [those in use: a consumer group or a live bridge].",
)
@click.option(
    "--only",
    multiple=True,
    type=click.Choice(c.HEALTH_CHECKS),
    help="Run only these checks (repeatable); Redis is always checked.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.05),
    help="Seconds to wait for worker replies [env DISPATCH_HEALTH_TIMEOUT; 2].",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def health(
    services: tuple[str, ...], only: tuple[str, ...], timeout: float | None, as_json: bool
) -> None:
    """Check Redis, its eviction policy, bridges, workers, lag, dead letters and buffer.

    Exit code 0 when healthy, 1 when a check failed, 2 on bad configuration."""
    from dispatch_celery.ops.health import check_health

    settings = settings_or_fail()
    try:
        report = check_health(
            settings, services=services_or_fail(services), only=only, timeout=timeout
        )
    except ConfigError as exc:
        raise ConfigFail(f"configuration error: {exc}") from None
    if as_json:
        click.echo(orjson.dumps(report.as_json(), option=orjson.OPT_INDENT_2).decode())
    else:
        for line in report.lines():
            click.echo(line)
    sys.exit(0 if report.healthy else 1)
