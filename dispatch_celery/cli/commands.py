"""The ``dispatch`` command: a thin leaf. Parse, build settings, call one function, map
errors to exit codes (2: configuration, 1: runtime). Logging is configured here."""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import click
import orjson
import redis

from dispatch_celery.cli.common import (
    STATE_DIR,
    ConfigFail,
    DispatchGroup,
    backend_or_fail,
    services_or_fail,
    settings_or_fail,
)
from dispatch_celery.errors import ConfigError, DispatchError
from dispatch_celery.settings import Settings, redact_url


def _client(settings: Settings) -> redis.Redis:
    client = redis.Redis.from_url(settings.redis_url)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise click.ClickException(
            f"cannot reach Redis at {redact_url(settings.redis_url)} ({exc}); "
            "set DISPATCH_REDIS_URL, or run `dispatch up` for an embedded Redis"
        ) from None
    return client


def _one(service: str) -> str:
    return services_or_fail([service])[0]


@click.group(cls=DispatchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="dispatch-celery")
def main() -> None:
    """Deliver llm-proxy events from a Redis Stream to LLM observability backends."""


@main.command()
@click.option("--service", required=True, help="Backend to feed, e.g. file, helicone, lunary.")
@click.option(
    "--stream",
    help="Stream key, or several: comma-separated keys and/or glob patterns resolved with "
    "SCAN (re-resolved every DISPATCH_STREAM_RESCAN s) [env DISPATCH_STREAM; llm-proxy-events].",
)
@click.option("--group", help="Consumer group [dispatch-<service>].")
@click.option("--consumer", help="Consumer name, stable across restarts [hostname].")
@click.option("--batch-size", type=click.IntRange(min=1), help="Events per batch [500].")
@click.option("--flush-interval", type=click.FloatRange(min=0.001), help="Seconds [1].")
@click.option("--detach", is_flag=True, help="Run in the background (daemon).")
@click.option("--pidfile", type=click.Path(path_type=Path), help="[.dispatch/bridge-<service>.pid]")
@click.option("--logfile", type=click.Path(path_type=Path), help="[.dispatch/bridge-<service>.log]")
def bridge(
    service: str,
    stream: str | None,
    group: str | None,
    consumer: str | None,
    batch_size: int | None,
    flush_interval: float | None,
    detach: bool,
    pidfile: Path | None,
    logfile: Path | None,
) -> None:
    """Read the stream with a consumer group and enqueue delivery tasks."""
    from dispatch_celery.app import create_app
    from dispatch_celery.cli.daemonize import check_pidfile
    from dispatch_celery.cli.daemonize import detach as enter_daemon
    from dispatch_celery.ingest.bridge import Bridge
    from dispatch_celery.ingest.enqueue import Enqueuer
    from dispatch_celery.ops.logs import configure_logging

    try:
        settings = settings_or_fail().with_overrides(
            stream=stream, batch_size=batch_size, flush_interval=flush_interval
        )
    except ConfigError as exc:
        raise ConfigFail(f"configuration error: {exc}") from None
    backend_or_fail(service, settings)
    _client(settings).close()  # fail in the foreground when Redis is unreachable
    stop = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        stop.set()

    pidfile = pidfile or STATE_DIR / f"bridge-{service}.pid"
    if detach:
        logfile = logfile or STATE_DIR / f"bridge-{service}.log"
        try:
            check_pidfile(pidfile)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"bridge {service} detaching; pidfile {pidfile}, log {logfile}")
        ctx = enter_daemon(pidfile, logfile, on_term)
    else:
        ctx = None
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)
    from dispatch_celery.ops.logs import known_secrets
    from dispatch_celery.ops.sentry import init_sentry

    configure_logging(settings.log_level, settings.log_format, secrets=known_secrets(settings))
    init_sentry(settings, "bridge")
    try:
        app = create_app(settings)
        Bridge(settings, service, Enqueuer(app, service), group=group, consumer=consumer).run(stop)
    except DispatchError as exc:
        click.echo(f"dispatch bridge: {exc}", err=True)
        sys.exit(1)
    finally:
        if ctx is not None:
            ctx.close()


@main.command()
@click.option("--pidfile", type=click.Path(path_type=Path), required=True)
@click.option("--timeout", type=float, default=30.0, show_default=True)
def stop(pidfile: Path, timeout: float) -> None:
    """Stop a detached bridge gracefully (SIGTERM, then wait)."""
    from dispatch_celery.cli.daemonize import stop as stop_pid

    try:
        click.echo(stop_pid(pidfile, timeout))
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
def backends() -> None:
    """List installed backends and whether each is configured."""
    from dispatch_celery.registry import backend_class, installed

    settings = settings_or_fail()
    for name in installed(settings):
        try:
            backend = backend_class(name, settings).from_settings(name, settings)
            backend.close()
            click.echo(f"{name:<12} configured")
        except ConfigError as exc:
            click.echo(f"{name:<12} not configured: {exc}")


@main.command()
@click.option("--service", "services", multiple=True, help="Only these services.")
@click.option("--json", "as_json", is_flag=True)
def status(services: tuple[str, ...], as_json: bool) -> None:
    """Per service: streams (length, lag, pending), the in-flight buffer (batches,
    compressed and raw bytes, high-water marks, intake rate, how long it lasts), queue,
    dead letters, trimmed entries."""
    from dispatch_celery.app import create_app
    from dispatch_celery.ops.status import format_status, known_services, service_status
    from dispatch_celery.registry import installed

    settings = settings_or_fail()
    client = _client(settings)
    app = create_app(settings)
    names = services_or_fail(services) or known_services(
        client, settings.stream, installed(settings)
    )
    rows = [service_status(client, settings.stream, s, app=app, settings=settings) for s in names]
    if as_json:
        click.echo(orjson.dumps([r.as_json() for r in rows], option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"stream {settings.stream} on {redact_url(settings.redis_url)}")
    for line in format_status(rows):
        click.echo(line)


@main.group()
def dlq() -> None:
    """Inspect and act on dead letters."""


@dlq.command("list")
@click.option("--service", required=True)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def dlq_list(service: str, limit: int, as_json: bool) -> None:
    from dispatch_celery.delivery.deadletters import DeadLetters

    client = _client(settings_or_fail())
    letters = list(DeadLetters(client, _one(service)).iter(limit))
    if as_json:
        click.echo(
            orjson.dumps([d.as_json() for d in letters], option=orjson.OPT_INDENT_2).decode()
        )
        return
    for d in letters:
        click.echo(f"{d.dlq_id}  {d.stream_id:<18}  {d.reason}")
    click.echo(f"{len(letters)} shown")


@dlq.command("show")
@click.option("--service", required=True)
@click.argument("dlq_id")
def dlq_show(service: str, dlq_id: str) -> None:
    from dispatch_celery.delivery.deadletters import DeadLetters

    client = _client(settings_or_fail())
    d = DeadLetters(client, _one(service)).get(dlq_id)
    if d is None:
        raise click.ClickException(f"no dead letter {dlq_id} for {service}")
    click.echo(orjson.dumps(d.as_json(), option=orjson.OPT_INDENT_2).decode())


@dlq.command("replay")
@click.option("--service", required=True)
@click.argument("ids", nargs=-1)
def dlq_replay(service: str, ids: tuple[str, ...]) -> None:
    """Put dead letters (all, or the given ids) back through delivery."""
    from dispatch_celery.app import create_app
    from dispatch_celery.delivery.deadletters import DeadLetters
    from dispatch_celery.ingest.enqueue import Enqueuer

    settings = settings_or_fail()
    client = _client(settings)
    app = create_app(settings)
    n = DeadLetters(client, backend_or_fail(service, settings)).replay(
        Enqueuer(app, service), ids=list(ids) or None, batch_size=settings.batch_size
    )
    click.echo(f"replayed {n} dead letters of {service}")


@dlq.command("purge")
@click.option("--service", required=True)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.argument("ids", nargs=-1)
def dlq_purge(service: str, yes: bool, ids: tuple[str, ...]) -> None:
    """Delete dead letters (all, or the given ids) for good."""
    from dispatch_celery.delivery.deadletters import DeadLetters

    client = _client(settings_or_fail())
    dl = DeadLetters(client, _one(service))
    what = f"{len(ids)} dead letters" if ids else f"all {dl.count()} dead letters"
    if not yes and not click.confirm(f"Delete {what} of {service}?", default=False):
        raise click.ClickException("aborted; nothing deleted")
    click.echo(f"purged {dl.purge(list(ids) or None)} dead letters of {service}")


@main.command()
@click.option("--sample", type=click.IntRange(min=1), help="Publish N realistic sample events.")
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Replay a raw JSONL archive (DISPATCH_FILE_FORMAT=raw) into the stream.",
)
@click.option("--maxlen", type=click.IntRange(min=1), help="Trim like llm-proxy (MAXLEN ~N).")
def publish(sample: int | None, source: Path | None, maxlen: int | None) -> None:
    """Write events into the stream, like llm-proxy does."""
    from dispatch_celery.cli.publish import publish_archive, publish_events, publish_targets

    if (sample is None) == (source is None):
        raise click.UsageError("give exactly one of --sample N or --from FILE")
    settings = settings_or_fail()
    client = _client(settings)
    keys = publish_targets(client, settings.stream)
    if sample is not None:
        from dispatch_celery.cli.sample import sample_events

        n = publish_events(client, keys, sample_events(sample), maxlen=maxlen)
        click.echo(f"published {n} sample events to {', '.join(keys)}")
    elif source is not None:
        try:  # an archive keeps its entry ids: into one stream (the first key)
            kept, fresh = publish_archive(client, keys[0], source)
        except ConfigError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(
            f"published {kept + fresh} events to {keys[0]} "
            f"({kept} with their original ids, {fresh} with new ids)"
        )


@main.command()
@click.option("--service", default="file", show_default=True)
@click.option("--sample", type=click.IntRange(min=0), default=0, help="Publish N sample events.")
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
def up(service: str, sample: int, no_flower: bool) -> None:
    """Run everything locally: embedded Redis (unless DISPATCH_REDIS_URL), bridge, worker,
    Flower. Ctrl-C stops it all."""
    from dispatch_celery.cli.embedded import run_up

    settings = settings_or_fail()
    backend_or_fail(service, settings)
    try:
        code = run_up(
            settings,
            service,
            sample,
            flower=not no_flower,
            echo=click.echo,
            environ=dict(os.environ),
        )
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


def _register_operations() -> None:
    from dispatch_celery.cli.ops import health, metrics

    main.add_command(metrics)
    main.add_command(health)


_register_operations()
