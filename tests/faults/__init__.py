"""End-to-end fault scenarios (issue 8): real redis-server, RabbitMQ, HTTP servers and
disks that fail while the real bridge and Celery workers run. ``pytest -m faults``."""
