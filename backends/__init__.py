"""Built-in backends of dispatch-celery, each registered by entry point."""
