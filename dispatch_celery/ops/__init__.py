"""Operations: status, health, metrics, logs, Sentry."""
