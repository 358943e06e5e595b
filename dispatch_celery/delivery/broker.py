"""Riding out Redis restarts in kombu's Redis transport (the Celery broker of the default
setup). Measured on kombu 5.7 / Celery 5.7 / redis-py 8.1 (tests/test_resilience.py,
tests/faults/test_redis_restart.py; research in the issue-8 notes).

Four defects made a worker exit, strand a task or lose one when Redis restarts or
refuses writes:

1. **Exit.** After a lost connection the consumer collects the old connection, and kombu
   sets ``transport.client = None``; closing a channel then restores unacknowledged
   messages through a client built from ``transport.client.hostname``, and a late ack of a
   running task does the same: ``AttributeError: 'NoneType' object has no attribute
   'hostname'``, which Celery treats as unrecoverable. ``_connparams`` now remembers the
   last good parameters of the channel and raises a connection error (which kombu ignores
   on close) when it never had any.
2. **Lost.** BRPOP took a message from the queue and writing its ``unacked`` record failed
   (Redis went away in between): the message was in neither place. It is now put back on
   its queue once Redis answers again.
3. **Duplicate.** An ack that failed while Redis was away left the message in ``unacked``;
   the visibility-timeout sweep redelivered a finished task. The ack is now retried once
   Redis answers again (and is done locally at once, so a close does not requeue it).
4. **Exit on a refusal.** Redis refusing a write (OOM under ``maxmemory`` with
   ``noeviction``; READONLY, MISCONF, ... while it is degraded) raised a ``ResponseError``
   out of the ack of a finished task; it is not a connection error, so Celery treated it
   as unrecoverable and the worker exited: delivery never resumed once Redis had room
   again. A refused ack now waits like one made while Redis was away; a refused
   ``unacked`` record lets the task run without it (were it lost, the batch's due index
   re-publishes it).

Failed writes wait in ``_pending`` and are retried after every (re)connect of the consumer
and every 5 s (the ``RetryPending`` bootstep). Any copy that still slips through is
harmless: a batch's ticket, lease and due index (``batches.state``) make a duplicate task do
nothing. These patches rely on kombu internals: the restart tests must pass before kombu
is upgraded past the tested range (pyproject pins it).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import redis
from celery import bootsteps

log = logging.getLogger("dispatch_celery.delivery.broker")

RETRY_EVERY_S = 5.0

# Error replies of a Redis that refuses writes for now (out of memory, a replica after a
# failover, a failed RDB save, a cluster in transition): waited out, like a lost connection.
_REFUSED_TYPES = (
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
    redis.exceptions.TryAgainError,
    redis.exceptions.ClusterDownError,
    redis.exceptions.MasterDownError,
)
_REFUSED_PREFIXES = ("OOM", "READONLY", "MISCONF", "NOREPLICAS", "TRYAGAIN", "CLUSTERDOWN")


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis refusing a write for now (OOM, READONLY, MISCONF, ...)."""
    if isinstance(exc, _REFUSED_TYPES):
        return True
    # in a pipeline redis-py prefixes "Command # 1 (...) of pipeline caused error: "
    reply = str(exc).rsplit("caused error: ", 1)[-1]
    return isinstance(exc, redis.ResponseError) and reply.startswith(_REFUSED_PREFIXES)


# (qos, delivery tag, (raw message, exchange, routing key) to requeue, or None to ack)
_pending: deque[tuple[Any, str, tuple[Any, str, str] | None]] = deque()
_lock = threading.Lock()


def retry_pending() -> int:
    """Redo the acks and requeues that failed while Redis was away; returns how many are
    still waiting (Redis still away)."""
    with _lock:
        while _pending:
            qos, tag, requeue = _pending[0]
            try:
                if requeue is None:
                    qos._remove_from_indices(tag).execute()
                else:
                    with qos.channel.conn_or_acquire() as client, client.pipeline() as pipe:
                        qos.channel._do_restore_message(*requeue, pipe, leftmost=True)
                        pipe.execute()
                    log.warning("put back on its queue a task read while Redis went away")
            except qos.channel.connection_errors:
                return len(_pending)
            except redis.ResponseError as exc:
                if not refused(exc):
                    raise
                return len(_pending)
            _pending.popleft()
        return 0


def _defer(qos: Any, tag: str, requeue: tuple[Any, str, str] | None) -> None:
    with _lock:
        _pending.append((qos, tag, requeue))


def patch_kombu_redis() -> None:
    """Apply the three fixes to kombu's Redis transport (idempotent)."""
    from kombu.transport import redis as kredis
    from kombu.transport import virtual

    if getattr(kredis.Channel, "_dispatch_patched", False):
        return

    base_qos: Any = kredis.QoS
    base_channel: Any = kredis.Channel
    connparams = base_channel._connparams

    class QoS(base_qos):  # type: ignore[misc]
        def append(self, message: Any, delivery_tag: str) -> None:
            try:
                super().append(message, delivery_tag)
            except self.channel.connection_errors:
                info = message.delivery_info
                _defer(self, delivery_tag, (message._raw, info["exchange"], info["routing_key"]))
                raise
            except redis.ResponseError as exc:
                if not refused(exc):
                    raise
                # Redis answers but refuses the write: run the task without its record
                virtual.QoS.append(self, message, delivery_tag)
                log.warning(
                    "Redis refused to record a task as unacknowledged (%s); running it anyway "
                    "(if this worker dies, the batch's due index re-publishes it)",
                    exc,
                )

        def ack(self, delivery_tag: str) -> None:
            try:
                self._remove_from_indices(delivery_tag).execute()
            except self.channel.connection_errors:
                _defer(self, delivery_tag, None)
            except redis.ResponseError as exc:
                if not refused(exc):
                    raise
                _defer(self, delivery_tag, None)  # done once Redis has room again
            virtual.QoS.ack(self, delivery_tag)  # done locally: a close must not requeue it
            retry_pending()

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        saved = self.__dict__.setdefault("_dispatch_connparams", {})
        transport = self.connection
        if transport is not None and transport.client is not None:
            saved[asynchronous] = connparams(self, asynchronous=asynchronous)
        elif asynchronous not in saved:  # the consumer collected the connection
            raise redis.ConnectionError("the broker connection was closed")
        return dict(saved[asynchronous])

    base_channel.QoS = QoS
    base_channel._connparams = _connparams
    base_channel._dispatch_patched = True


class RetryPending(bootsteps.StartStopStep):
    """Consumer bootstep: after every (re)connect, and every few seconds, redo the acks and
    requeues that failed while Redis was away."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.timer: Any = None

    def start(self, parent: Any) -> None:
        retry_pending()
        if getattr(parent, "hub", None) is not None and self.timer is None:
            self.timer = parent.hub.call_repeatedly(RETRY_EVERY_S, retry_pending)

    def stop(self, parent: Any) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
