"""dispatch-celery: deliver llm-proxy's Redis Stream events to LLM observability backends.

``celery -A dispatch_celery worker -Q <service>`` finds the Celery app in
``dispatch_celery.celery`` (built from the environment there, not at this import).
"""

__version__ = "0.1.0"
