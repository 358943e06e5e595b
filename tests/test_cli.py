"""The ``dispatch`` command as a user runs it (real processes, real Redis)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis
from click.testing import CliRunner

from dispatch_celery import constants as c
from dispatch_celery.cli.commands import main
from dispatch_celery.errors import ConfigError
from dispatch_celery.settings import load_settings
from tests.harness import (
    REPO,
    dispatch,
    event,
    jsonl,
    make,
    pipeline_env,
    subprocess_env,
    wait_for,
    worker,
    xadd_all,
    xrange,
)

STREAM = "llm-proxy-events"


def test_bad_configuration_stops_at_start_naming_the_variable(redis_url: str) -> None:
    res = dispatch(
        "bridge",
        "--service",
        "file",
        env={"DISPATCH_REDIS_URL": redis_url, "DISPATCH_BATCH_SIZE": "lots"},
    )
    assert res.returncode == 2
    assert "DISPATCH_BATCH_SIZE" in res.stderr and "'lots'" in res.stderr
    res = dispatch("bridge", "--service", "nosuch", env={"DISPATCH_REDIS_URL": redis_url})
    assert res.returncode == 2 and "no backend named 'nosuch'" in res.stderr
    assert "installed: file, helicone" in res.stderr
    res = dispatch("status", env={"DISPATCH_REDIS_URL": "http://localhost"})
    assert res.returncode == 2 and "DISPATCH_REDIS_URL" in res.stderr
    worker = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "dispatch_celery", "worker", "-Q", "file"],
        env=subprocess_env({"DISPATCH_MAX_ATTEMPTS": "0"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert worker.returncode != 0 and "DISPATCH_MAX_ATTEMPTS" in worker.stderr
    unconfigured = subprocess.run(  # a worker for a backend without its API key
        [sys.executable, "-m", "celery", "-A", "dispatch_celery", "worker", "-Q", "helicone"],
        env=subprocess_env({"DISPATCH_REDIS_URL": redis_url}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unconfigured.returncode == 2, unconfigured.stderr
    assert "DISPATCH_HELICONE_API_KEY" in unconfigured.stderr


def test_a_configuration_error_exits_2_with_its_message_at_every_entry(redis_url: str) -> None:
    """No ConfigError reaches the user as a traceback (issue 10): bad service names, an
    unknown backend, a bad threshold, a stream pattern with nothing to publish to."""
    env = {"DISPATCH_REDIS_URL": redis_url}
    runner = CliRunner()
    cases = [
        (["dlq", "list", "--service", "Bad!"], "service name 'Bad!' is invalid"),
        (["dlq", "show", "--service", "Bad!", "1-0"], "service name 'Bad!' is invalid"),
        (["dlq", "purge", "--service", "Bad!", "--yes"], "service name 'Bad!' is invalid"),
        (["dlq", "replay", "--service", "nosuch"], "no backend named 'nosuch'"),
        (["status", "--service", "Bad!"], "service name 'Bad!' is invalid"),
        (["bridge", "--service", "nosuch"], "no backend named 'nosuch'"),
        (["up", "--service", "nosuch"], "no backend named 'nosuch'"),
        (["health", "--service", "Bad!"], "service name 'Bad!' is invalid"),
        (["metrics", "--service", "Bad!"], "service name 'Bad!' is invalid"),
    ]
    for args, message in cases:
        res = runner.invoke(main, args, env=env)
        assert res.exit_code == 2, (args, res.output, res.exception)
        assert message in res.output and "Traceback" not in res.output, (args, res.output)
    res = runner.invoke(
        main, ["publish", "--sample", "1"], env={**env, "DISPATCH_STREAM": "nothing-yet-*"}
    )
    assert res.exit_code == 2 and "matches no stream yet" in res.output, res.output


def test_precedence_flag_over_env_over_default_and_llm_proxy_names() -> None:
    s = load_settings({"DISPATCH_BATCH_SIZE": "7"})
    assert s.batch_size == 7 and s.flush_interval == 1.0 and s.stream == "llm-proxy-events"
    assert s.with_overrides(batch_size=9, flush_interval=None).batch_size == 9
    s = load_settings({"REDIS_ADDR": "cache:6380", "REDIS_DB": "3", "REDIS_STREAM_KEY": "ev"})
    assert s.redis_url == "redis://cache:6380/3" == s.broker_url and s.stream == "ev"
    s = load_settings({"DISPATCH_REDIS_URL": "redis://a:1/0", "REDIS_ADDR": "b:2"})
    assert s.redis_url == "redis://a:1/0"
    with pytest.raises(ConfigError, match="DISPATCH_VISIBILITY_TIMEOUT"):
        # an attempt (and its lease margin) must end before the broker redelivers it
        load_settings({"DISPATCH_VISIBILITY_TIMEOUT": "60", "DISPATCH_TASK_TIME_LIMIT": "55"})


def test_backends_lists_plugins_and_their_configuration(redis_url: str) -> None:
    res = dispatch("backends", env={"DISPATCH_REDIS_URL": redis_url})
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "file" in out and "configured" in out
    assert "helicone" in out and "DISPATCH_HELICONE_API_KEY" in out
    res = dispatch("backends", env={"DISPATCH_HELICONE_API_KEY": "sk-helicone-secret-1234"})
    assert "sk-helicone-secret-1234" not in res.stdout + res.stderr


def test_detached_bridge_runs_and_stops_gracefully(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    env = pipeline_env(redis_url, tmp_path)
    pidfile, logfile = tmp_path / "bridge.pid", tmp_path / "bridge.log"
    res = dispatch(
        "bridge",
        "--service",
        "file",
        "--detach",
        "--pidfile",
        str(pidfile),
        "--logfile",
        str(logfile),
        "--consumer",
        "d1",
        env=env,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip().isdigit(), what="pidfile")
    pid = int(pidfile.read_text())
    try:
        wait_for(lambda: r.exists(c.heartbeat_key("file", "d1")) == 1, what="heartbeat")
        xadd_all(r, STREAM, [event(i) for i in range(30)])
        wait_for(lambda: r.llen("file") >= 1, what="task enqueued by the detached bridge")
        again = dispatch(
            "bridge",
            "--service",
            "file",
            "--detach",
            "--pidfile",
            str(pidfile),
            env=env,
            cwd=tmp_path,
        )
        assert again.returncode != 0 and f"pid {pid}" in again.stderr
        res = dispatch("stop", "--pidfile", str(pidfile), env=env)
        assert res.returncode == 0 and "stopped" in res.stdout, res.stderr
    finally:  # never leave a daemon behind to disturb the other tests
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not pidfile.exists()
    assert "bridge file stopped" in logfile.read_text()
    assert r.xpending(STREAM, "dispatch-file")["pending"] == 0


def test_publish_sample_status_and_archive_replay(
    redis_url: str, r: redis.Redis, tmp_path: Path
) -> None:
    env = pipeline_env(redis_url, tmp_path, DISPATCH_FILE_FORMAT="raw")
    res = dispatch("publish", "--sample", "40", env=env)
    assert res.returncode == 0 and "published 40" in res.stdout, res.stderr
    assert r.xlen(STREAM) == 40
    settings, app, _ = make(
        redis_url, tmp_path, DISPATCH_FILE_FORMAT="raw", DISPATCH_FILE_METHODS="*"
    )
    from tests.harness import bridge

    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: len(jsonl(tmp_path / "events.jsonl")) == 40, what="raw archive")
    status = dispatch("status", "--json", "--service", "file", env=env)
    row = orjson.loads(status.stdout)[0]
    assert row["stream_length"] == 40 and row["pending"] == 0 and row["lag"] == 0
    assert row["counters"]["delivered"] == 40 and row["dead_letters"] == 0
    assert "queue_depth" in row and "batches_in_flight" in row and "trimmed_unread" in row
    human = dispatch("status", env=env)
    assert "file" in human.stdout and "delivered" in human.stdout

    originals = [(i.decode(), f[b"data"]) for i, f in xrange(r, STREAM)]
    r.delete(STREAM)
    res = dispatch("publish", "--from", str(tmp_path / "events.jsonl"), env=env)
    assert res.returncode == 0 and "40 with their original ids" in res.stdout, res.stdout
    assert [(i.decode(), f[b"data"]) for i, f in xrange(r, STREAM)] == originals
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"nope": 1}\n')
    res = dispatch("publish", "--from", str(bad), env=env)
    assert res.returncode != 0 and "bad.jsonl:1" in res.stderr


def test_dlq_show_and_purge_asks_first(redis_url: str, r: redis.Redis, tmp_path: Path) -> None:
    env = pipeline_env(redis_url, tmp_path)
    settings, app, _ = make(redis_url, tmp_path)
    r.xadd(STREAM, {"data": b"not json at all"})
    from tests.harness import bridge

    with bridge(settings, app, "file"), worker(app, "file"):
        wait_for(lambda: r.xlen(c.deadletter_key("file")) == 1, what="dead letter")
    dlq_id = xrange(r, c.deadletter_key("file"))[0][0].decode()
    runner = CliRunner()
    shown = runner.invoke(main, ["dlq", "show", "--service", "file", dlq_id], env=env)
    assert shown.exit_code == 0 and "not json at all" in shown.output
    listed = runner.invoke(main, ["dlq", "list", "--service", "file"], env=env)
    assert dlq_id in listed.output and "malformed" in listed.output
    declined = runner.invoke(main, ["dlq", "purge", "--service", "file"], env=env, input="n\n")
    assert declined.exit_code != 0 and r.xlen(c.deadletter_key("file")) == 1
    purged = runner.invoke(main, ["dlq", "purge", "--service", "file", "--yes"], env=env)
    assert purged.exit_code == 0 and "purged 1" in purged.output
    assert r.xlen(c.deadletter_key("file")) == 0


def test_up_runs_everything_on_the_embedded_default(tmp_path: Path) -> None:
    """`dispatch up` with no configuration: embedded Redis, bridge, worker; Ctrl-C stops."""
    out = tmp_path / "up.log"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "REDIS_", "FLOWER_"))
    }
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatch_celery", "up", "--sample", "200", "--no-flower"],
        cwd=tmp_path,
        env=env,
        stdout=out.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        target = tmp_path / "dispatch-events.jsonl"
        from dispatch_celery.cli.sample import sample_events

        # the default filter delivers POST requests only
        posts = sum(1 for d in sample_events(200) if b'"Method":"POST"' in d)
        assert posts > 100
        wait_for(lambda: len(jsonl(target)) == posts, timeout=90, what="sample delivered")
        log = out.read_text()
        assert "embedded Redis" in log and str(target) in log
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(40)
    assert code == 0, out.read_text()
    assert "stopped." in out.read_text()
    assert (tmp_path / ".dispatch" / "redis").is_dir()


def test_up_runs_on_valkey_and_counts_entries_trimmed_before_they_were_read(
    tmp_path: Path,
) -> None:
    """Issue 8 case 6 under `dispatch up`: its embedded server is Valkey (Redis 7.2
    protocol), so entries the producer trims while the bridge is paused at the high-water
    mark are counted exactly; everything still in the stream is delivered afterwards."""
    out = tmp_path / "up.log"
    delivered_path = tmp_path / "flaky.jsonl"
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "REDIS_", "FLOWER_"))
    }
    env.update(
        {
            "PYTHONPATH": str(REPO),
            "DISPATCH_BACKEND_FLAKY": "tests.doubles:FlakyBackend",
            "DISPATCH_FLAKY_PATH": str(delivered_path),
            "DISPATCH_BATCH_SIZE": "10",
            "DISPATCH_FLUSH_INTERVAL": "0.1",
            "DISPATCH_HIGH_WATER_BATCHES": "2",
            "DISPATCH_RETRY_BASE_DELAY": "0.1",
            "DISPATCH_RETRY_MAX_DELAY": "1",
        }
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatch_celery", "up", "--service", "flaky", "--no-flower"],
        cwd=tmp_path,
        env=env,
        stdout=out.open("wb"),
        stderr=subprocess.STDOUT,
    )
    sock = tmp_path / ".dispatch" / "redis" / "redis.sock"
    try:
        wait_for(sock.exists, timeout=30, what="embedded server socket")
        r = redis.Redis(unix_socket_path=str(sock))
        assert str(r.info("server").get("server_name", "")).lower() == "valkey"
        wait_for(lambda: bool(r.keys(c.heartbeat_pattern("flaky"))), timeout=60, what="bridge")
        r.hset("test:flaky:flaky", "transient", 1_000_000)  # the vendor is down
        xadd_all(r, STREAM, [event(i) for i in range(20)])
        wait_for(lambda: r.hlen(c.inflight_key("flaky")) == 2, what="2 batches: high water")
        # the producer keeps writing and trims (exact MAXLEN 50) while the bridge is paused
        xadd_all(r, STREAM, [event(i) for i in range(20, 320)], maxlen=50)
        wait_for(
            lambda: int(r.hget(c.stats_key("flaky"), "trimmed_unread") or 0) == 250,
            timeout=30,
            what="250 trimmed entries counted",
        )
        r.hset("test:flaky:flaky", "transient", 0)  # the vendor is back
        wait_for(lambda: len(jsonl(delivered_path)) >= 70, timeout=90, what="70 delivered")
        wait_for(lambda: "before they were read 250" in out.read_text(), what="progress line")
        status = dispatch(
            "status", "--json", "--service", "flaky",
            env={"DISPATCH_REDIS_URL": f"unix://{sock}", **{
                k: v for k, v in env.items() if k.startswith("DISPATCH_")}},
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        row = orjson.loads(status.stdout)[0]
        assert row["trimmed_unread"] == 250 and row["lag"] == 0
        got = {rec["stream_id"] for rec in jsonl(delivered_path)}
        assert len(got) == 70  # 20 + the 50 the producer kept: 320 = 70 delivered + 250 trimmed
        r.close()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(60)
    assert code == 0, out.read_text()


def test_a_list_under_the_stream_key_is_a_clear_error(redis_url: str, r: redis.Redis) -> None:
    r.lpush(STREAM, "left over by an old llm-proxy")
    res = dispatch("bridge", "--service", "file", env={"DISPATCH_REDIS_URL": redis_url})
    assert res.returncode == 1
    assert "holds a list, not a stream" in res.stderr and "DISPATCH_STREAM" in res.stderr
    assert r.type(STREAM) == b"list"  # nothing of ours touched it
