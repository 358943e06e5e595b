"""``dispatch health``: healthy with a live bridge and worker; each failure is named."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import orjson
import redis
from click.testing import CliRunner

from dispatch_celery import constants as c
from dispatch_celery.cli.ops import health
from dispatch_celery.ops.health import check_health
from tests.conftest import free_port
from tests.harness import bridge, event, jsonl, make, pipeline_env, wait_for, worker, xadd_all

STREAM = "llm-proxy-events"


def run(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any]]:
    result = CliRunner().invoke(health, ["--json", "--timeout", "1", *args], env=env)
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, orjson.loads(result.output)


def by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {ch["name"]: ch for ch in report["checks"]}


@contextmanager
def eviction_policy(r: redis.Redis, policy: str, maxmemory: str) -> Iterator[None]:
    """The session's Redis with another policy for one test, restored afterwards."""
    saved = (
        str(r.config_get("maxmemory-policy")["maxmemory-policy"]),
        str(r.config_get("maxmemory")["maxmemory"]),
    )
    r.config_set("maxmemory-policy", policy)
    r.config_set("maxmemory", maxmemory)
    try:
        yield
    finally:
        r.config_set("maxmemory-policy", saved[0])
        r.config_set("maxmemory", saved[1])


def test_cli_registers_the_operations_commands() -> None:
    from dispatch_celery.cli.commands import main

    ctx = click.Context(main)
    assert main.get_command(ctx, "health") is health, "cli.py: main.add_command(health)"
    from dispatch_celery.cli.ops import metrics

    assert main.get_command(ctx, "metrics") is metrics, "cli.py: main.add_command(metrics)"


def test_healthy_with_a_live_bridge_and_worker(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    settings, app, env = make(redis_url, tmp_path)
    xadd_all(r, STREAM, [event(i) for i in range(5)])
    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 5, what="delivery")
        wait_for(lambda: bool(r.keys(c.heartbeat_pattern("file"))), what="heartbeat")
        code, report = run(env)  # no --service: the services in use (a group exists)
        direct = check_health(settings, services=["file"], app=app, timeout=1)
    assert code == 0 and report["healthy"] is True, report
    checks = by_name(report)
    assert set(checks) == set(c.HEALTH_CHECKS)
    assert all(ch["status"] == "ok" for ch in report["checks"]), report
    assert checks["workers"]["service"] == "file"
    assert "1 answering" in checks["workers"]["detail"]
    assert checks["bridges"]["detail"].startswith("1 alive")
    assert direct.healthy and [ch.status for ch in direct.checks] == ["ok"] * len(c.HEALTH_CHECKS)
    assert checks["buffer"]["detail"].startswith("0 % full")
    # text output: one line per check, then the verdict
    text = CliRunner().invoke(health, ["--timeout", "1", "--service", "file"], env=env)
    assert text.exit_code == 1  # the bridge and worker are gone now
    assert text.output.splitlines()[-1] == "UNHEALTHY"


def test_unhealthy_without_bridge_or_worker_and_over_thresholds(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    env = pipeline_env(
        redis_url, tmp_path, DISPATCH_HEALTH_MAX_LAG="10", DISPATCH_HEALTH_MAX_DEAD_LETTERS="2"
    )
    r.xgroup_create(STREAM, "dispatch-file", id="$", mkstream=True)
    xadd_all(r, STREAM, [event(i) for i in range(25)])  # nobody reads them: lag 25
    for i in range(3):
        r.xadd(c.deadletter_key("file"), {"reason": "test", "data": f"{i}"})
    code, report = run(env, "--service", "file")
    assert code == 1 and report["healthy"] is False
    checks = by_name(report)
    assert checks["redis"]["status"] == "ok" and checks["eviction"]["status"] == "ok"
    assert (
        checks["bridges"]["status"] == "fail" and "no bridge alive" in checks["bridges"]["detail"]
    )
    assert checks["workers"]["status"] == "fail" and "'file'" in checks["workers"]["detail"]
    assert checks["lag"]["status"] == "fail" and checks["lag"]["detail"].startswith("25 ")
    assert checks["dead-letters"]["status"] == "fail"
    # per-service thresholds win over the global ones; --only narrows the checks
    env["DISPATCH_FILE_HEALTH_MAX_LAG"] = "100"
    env["DISPATCH_FILE_HEALTH_MAX_DEAD_LETTERS"] = "5"
    code, report = run(env, "--service", "file", "--only", "lag", "--only", "dead-letters")
    assert code == 0, report
    assert [(ch["name"], ch["status"]) for ch in report["checks"]] == [
        ("redis", "ok"),
        ("lag", "ok"),
        ("dead-letters", "warn"),
    ]


def test_an_evicting_redis_fails_the_check(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    env = pipeline_env(redis_url, tmp_path)
    with eviction_policy(r, "allkeys-lru", "1gb"):
        code, report = run(env, "--only", "eviction")
        assert code == 1
        assert "allkeys-lru" in by_name(report)["eviction"]["detail"]
    with eviction_policy(r, "volatile-lru", "0"):  # no limit yet: a warning
        code, report = run(env, "--only", "eviction")
        assert code == 0 and by_name(report)["eviction"]["status"] == "warn"


def test_unreachable_redis_and_bad_settings(redis_url: str, tmp_path: Path) -> None:
    env = pipeline_env(f"redis://127.0.0.1:{free_port()}/0", tmp_path)
    code, report = run(env)
    assert code == 1
    assert [ch["name"] for ch in report["checks"]] == ["redis"]
    assert "unreachable" in report["checks"][0]["detail"]
    env = pipeline_env(redis_url, tmp_path, DISPATCH_HEALTH_MAX_LAG="lots")
    result = CliRunner().invoke(health, ["--service", "file"], env=env)
    assert result.exit_code == 2 and "DISPATCH_HEALTH_MAX_LAG" in result.output


def test_no_service_in_use_is_a_warning(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    code, report = run(pipeline_env(redis_url, tmp_path))
    assert code == 0
    assert by_name(report)["services"]["status"] == "warn"
