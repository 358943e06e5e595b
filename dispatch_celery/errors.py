"""The one error tree of dispatch-celery.

::

    DispatchError
    +-- ConfigError                 bad settings: the process stops at start; names the variable
    |   +-- BackendNotFoundError    unknown backend name; the message lists the installed ones
    +-- StreamError                 the stream key holds another type, Redis unreachable, ...
    +-- MalformedEventError         an entry that cannot be decoded (dead-lettered with reason)
    +-- DeliveryError               raised by backends, classified; the core owns retry policy
        +-- TransientDeliveryError  timeouts, connection errors, 408, 429, 5xx: retried with backoff
        +-- PermanentDeliveryError  a batch the backend will never accept: dead-lettered at once
        +-- CredentialsError        the receiver refused our credentials (or the endpoint is
                                    misconfigured): the service pauses, nothing dead-letters

Backends translate their HTTP library's and vendor's exceptions into ``DeliveryError``
subclasses at one boundary; nothing else escapes a backend.
"""

from __future__ import annotations


class DispatchError(Exception):
    """Root of every error dispatch-celery raises on purpose."""


class ConfigError(DispatchError):
    """Invalid configuration; the message says which variable and what to fix."""


class BackendNotFoundError(ConfigError):
    """No installed backend has the requested name."""


class StreamError(DispatchError):
    """The event stream cannot be used (wrong key type, unreachable Redis, ...)."""


class MalformedEventError(DispatchError):
    """A stream entry that cannot be decoded into an event."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DeliveryError(DispatchError):
    """Base of the errors a backend raises for a whole delivery call."""


class TransientDeliveryError(DeliveryError):
    """Worth retrying later; ``retry_after`` (seconds) is the server's hint, if any."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentDeliveryError(DeliveryError):
    """Retrying cannot help (bad credentials, payload refused); dead-letter the batch."""


class CredentialsError(DeliveryError):
    """The receiver refused our credentials (401/403) or the endpoint is misconfigured.

    Nothing of the batch was delivered. The core pauses the service instead of
    dead-lettering: batches stay in flight, a periodic probe resumes delivery once the
    credentials work again. The message names the variable to fix and never the secret.
    """
