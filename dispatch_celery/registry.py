"""Backend discovery through the entry-point group ``dispatch_celery.backends``.

Backends are imported only when selected, so a broken or heavy plugin never slows down or
breaks the others; an unknown name lists the installed ones.

During development a backend can also be named without packaging it:
``DISPATCH_BACKEND_<NAME>=package.module:Class`` (the test suite uses this for its doubles).
"""

from __future__ import annotations

from functools import cache
from importlib import import_module
from importlib.metadata import EntryPoint, entry_points

from dispatch_celery.backend import Backend
from dispatch_celery.errors import BackendNotFoundError, ConfigError
from dispatch_celery.settings import Settings, env_name, validate_service

ENTRY_POINT_GROUP = "dispatch_celery.backends"


@cache
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _extra(settings: Settings | None) -> dict[str, str]:
    if settings is None:
        return {}
    prefix = "DISPATCH_BACKEND_"
    return {
        k[len(prefix) :].lower().replace("_", "-"): v.strip()
        for k, v in settings.env.items()
        if k.startswith(prefix) and v.strip()
    }


def installed(settings: Settings | None = None) -> list[str]:
    """Names of the installed backends, sorted."""
    return sorted(set(_entry_points()) | set(_extra(settings)))


def _load_path(service: str, path: str) -> object:
    module, _, attr = path.partition(":")
    name = env_name("BACKEND", service)
    if not module or not attr:
        raise ConfigError(f"{name} must look like 'package.module:Class', got {path!r}")
    try:
        return getattr(import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{name}={path!r} cannot be loaded: {exc}") from exc


def backend_class(service: str, settings: Settings | None = None) -> type[Backend]:
    validate_service(service)
    extra = _extra(settings)
    if service in extra:
        cls: object = _load_path(service, extra[service])
        if not isinstance(cls, type) or not hasattr(cls, "from_settings"):
            raise ConfigError(f"backend {service!r} ({extra[service]}) is not a Backend class")
        return cls
    eps = _entry_points()
    if service not in eps:
        names = ", ".join(installed(settings)) or "none"
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
    return cls


def create_backend(service: str, settings: Settings) -> Backend:
    """Load and configure the backend for a service; ``ConfigError`` says what is missing."""
    return backend_class(service, settings).from_settings(service, settings)
