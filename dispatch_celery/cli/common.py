"""What every ``dispatch`` command shares: settings from the environment, mapped to the
exit code of a configuration error (2) with a message that names the variable."""

from __future__ import annotations

import click

from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import Settings, load_settings


class ConfigFail(click.ClickException):
    """Bad configuration: exit code 2, message names the variable."""

    exit_code = 2


def settings_or_fail() -> Settings:
    try:
        return load_settings()
    except ConfigError as exc:
        raise ConfigFail(f"configuration error: {exc}") from None
