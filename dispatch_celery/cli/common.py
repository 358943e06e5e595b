"""What every ``dispatch`` command shares: settings from the environment, service names,
the state directory, and the mapping of a configuration error to exit code 2 with a
message that names the variable (``DispatchGroup`` applies it to every command, so no
``ConfigError`` ever reaches the user as a traceback)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import click

from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings, load_settings, validate_service

# Local state of the commands run from a directory: pidfiles, logs, `dispatch up`'s Redis.
STATE_DIR = Path(".dispatch")


class ConfigFail(click.ClickException):
    """Bad configuration: exit code 2, message names the variable."""

    exit_code = 2


class DispatchGroup(click.Group):
    """The main group: a ``ConfigError`` from any command (sub-groups' included, they run
    inside this ``invoke``) exits with code 2 and the message, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            raise ConfigFail(f"configuration error: {exc}") from None


def settings_or_fail() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise ConfigFail(f"configuration error: {exc}") from None


def services_or_fail(names: Iterable[str]) -> list[str]:
    """Valid service names, else exit 2."""
    try:
        return [validate_service(n) for n in names]
    except ConfigError as exc:
        raise ConfigFail(str(exc)) from None


def backend_or_fail(service: str, settings: Settings) -> str:
    """A valid service name with an installed backend, else exit 2 (the message lists the
    installed ones)."""
    from dispatch_celery.registry import backend_class

    try:
        validate_service(service)
        backend_class(service, settings)
    except ConfigError as exc:
        raise ConfigFail(str(exc)) from None
    return service
