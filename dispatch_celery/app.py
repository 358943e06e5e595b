"""create_app(settings): the Celery app, configured for at-least-once delivery.

Why each setting (DESIGN.md invariant 1 and the field notes):

* ``task_acks_late`` + ``task_reject_on_worker_lost``: a task message is acknowledged only
  when its batch is delivered or dead-lettered; a killed pool child's task is requeued at
  once.
* ``worker_prefetch_multiplier=1``: a worker holds at most one unstarted task per process,
  so a worker that dies outright strands little, and queues balance across workers.
* ``visibility_timeout``: Redis redelivers a task whose worker died (host gone) after this
  (plus at most a tenth of it: the restore sweep runs every ``visibility_timeout / 10``).
  Nothing waits in the broker any more (retries are due times in Redis, see
  ``batches.state``), so only a running attempt holds a message: ``task_time_limit`` plus
  the lease margin must stay below it (``delivery.retry.check_timing``). A redelivered copy
  would find the batch busy, stale or gone and do nothing.
* ``task_soft_time_limit`` below ``task_time_limit``: an attempt that overruns raises inside
  the task, which then retries its pending runs; a hard kill leaves the batch's lease to
  expire, and a bridge re-publishes it when it comes due.
* At worker start, a paused service (bad credentials) is probed at once: the operator
  fixed the key and restarted the worker.

Riding out Redis restarts (the broker of the default setup), measured on kombu 5.7 /
Celery 5.7 with tests/test_resilience.py and tests/faults/test_redis_restart.py:

* the worker's own Redis client retries through a restart (``delivery.attempt``);
* a soft time limit that fires late, after the worker's main process was blocked
  reconnecting, is ignored outside an attempt (``delivery.task``; it used to kill the pool
  child or corrupt the result pipe: "Unrecoverable error: UnpicklingError");
* ``delivery.broker`` patches kombu's Redis transport (a worker exited with "'NoneType'
  object has no attribute 'hostname'" when it closed or acked on a collected connection;
  a message read by BRPOP whose ``unacked`` record failed was lost; a failed ack became a
  duplicate) and adds the ``RetryPending`` consumer bootstep;
* ``broker_connection_max_retries=None``: the consumer reconnects for as long as the
  broker is away (Celery's default gives up after 100 tries and the worker exits).
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from dispatch_celery.settings import Settings


def celery_config(settings: Settings) -> dict[str, Any]:
    vt = settings.visibility_timeout
    transport_options: dict[str, Any] = {
        "visibility_timeout": vt,
        # kombu sweeps for abandoned tasks every interval * throttle seconds (100 s by
        # default); sweep every tenth of the visibility timeout instead, so a task of a
        # worker that died outright is redelivered within ~1.1x the visibility timeout.
        "unacked_restore_interval": max(1, vt // 10),
        "unacked_restore_throttle": 1,
        "unacked_mutex_expire": min(300, vt),
    }
    if settings.broker_url.startswith(("amqp", "pyamqp")):
        transport_options = {"confirm_publish": True}
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # ride out any outage; see the docstring
        "result_backend": None,
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": settings.soft_time_limit,
        "task_create_missing_queues": True,
        "task_default_queue": "dispatch",
        "worker_send_task_events": True,
        # No "task-sent" events: they double the cost of every publish in the bridge, and
        # Flower learns of each task from the worker's received/started/succeeded events.
        "task_send_sent_event": False,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "enable_utc": True,
    }


def create_app(settings: Settings) -> Celery:
    # imported here: the task module needs the app
    from dispatch_celery.delivery import broker, task

    broker.patch_kombu_redis()
    app = Celery("dispatch_celery", set_as_current=False)
    app.conf.update(celery_config(settings))
    app.steps["consumer"].add(broker.RetryPending)
    task.register(app, settings)
    _connect_logging(settings)
    _connect_backend_check(app, settings)
    _connect_probe_on_start(app, settings)
    return app


def _connect_probe_on_start(app: Celery, settings: Settings) -> None:
    """A worker that starts lets the next attempt of a paused service probe at once."""
    import logging

    import redis
    from celery.signals import worker_ready

    from dispatch_celery.batches.state import BatchStore

    def probe(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        log = logging.getLogger("dispatch_celery.app")
        try:
            client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
            try:
                for queue in sorted(app.amqp.queues.consume_from or {}):
                    if BatchStore(client, queue).probe_now():
                        log.warning("%s is paused (bad credentials): probing it now", queue)
            finally:
                client.close()
        except redis.RedisError as exc:  # Redis is away: the periodic probe does it later
            log.warning("could not check for paused services at start: %s", exc)

    worker_ready.connect(probe, weak=False)


def _connect_backend_check(app: Celery, settings: Settings) -> None:
    """A worker for ``-Q helicone`` without ``DISPATCH_HELICONE_API_KEY`` must not start
    and fail every batch: check the backend of every queue it consumes, at start."""
    import logging
    import sys

    from celery.signals import worker_init

    from dispatch_celery.errors import ConfigError
    from dispatch_celery.registry import create_backend, installed

    def check(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        names = set(installed(settings))
        for queue in sorted(app.amqp.queues.consume_from or {}):
            if queue not in names:
                logging.getLogger("dispatch_celery.app").warning(
                    "queue %r is not an installed backend (installed: %s); bridges publish "
                    "to the queue named after the service",
                    queue,
                    ", ".join(sorted(names)),
                )
                continue
            try:
                create_backend(queue, settings).close()
            except ConfigError as exc:
                print(f"dispatch-celery: configuration error: {exc}", file=sys.stderr)
                raise SystemExit(2) from None

    worker_init.connect(check, weak=False)


def _connect_logging(settings: Settings) -> None:
    from celery.signals import setup_logging

    from dispatch_celery.ops.logs import configure_logging, known_secrets

    def setup(loglevel: Any = None, **_: Any) -> None:
        # Connecting this signal stops Celery from installing its own handlers: the worker
        # logs in our format (text or JSON) like every other dispatch process.
        configure_logging(settings.log_level, settings.log_format, secrets=known_secrets(settings))

    setup_logging.connect(setup, weak=False)
