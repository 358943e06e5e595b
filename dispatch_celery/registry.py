"""Backend discovery through the entry-point group ``dispatch_celery.backends``.

Backends are imported only when selected, so a broken or heavy plugin never slows down or
breaks the others; an unknown name lists the installed ones.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import EntryPoint, entry_points

from dispatch_celery.backend import Backend
from dispatch_celery.errors import BackendNotFoundError, ConfigError
from dispatch_celery.settings import Settings, validate_service

ENTRY_POINT_GROUP = "dispatch_celery.backends"


@cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def installed() -> list[str]:
    """Names of the installed backends, sorted."""
    return sorted(_entry_points())


def backend_class(service: str) -> type[Backend]:
    validate_service(service)
    eps = _entry_points()
    if service not in eps:
        names = ", ".join(installed()) or "none"
        raise BackendNotFoundError(
            f"no backend named {service!r} is installed (installed: {names}); "
            f"backends register under the entry-point group {ENTRY_POINT_GROUP!r}"
        )
    try:
        cls = eps[service].load()
    except Exception as exc:  # a broken plugin must not take the others down
        raise ConfigError(f"backend {service!r} failed to load: {exc}") from exc
    if not isinstance(cls, type) or not hasattr(cls, "from_settings"):
        raise ConfigError(f"backend {service!r} ({eps[service].value}) is not a Backend class")
    return cls  # type: ignore[no-any-return]


def create_backend(service: str, settings: Settings) -> Backend:
    """Load and configure the backend for a service; ``ConfigError`` says what is missing."""
    return backend_class(service).from_settings(service, settings)
