"""The ``dispatch`` command line: a thin leaf over the stages."""

from dispatch_celery.cli.commands import main

__all__ = ["main"]
