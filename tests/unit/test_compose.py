"""compose.yml cannot be started here (no Docker engine): check it with `docker-compose config`
and check that everything it names exists in the repository or is a pinned public image."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures.paths import REPO

COMPOSE = REPO / "compose.yml"
PINNED = re.compile(r"^[a-z0-9./-]+:(?!latest$)[A-Za-z0-9._-]+$")


@pytest.fixture(scope="module")
def resolved() -> dict:
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.fail("docker-compose is not installed (make test installs Debian's docker-compose)")
    done = subprocess.run(
        [docker_compose, "--env-file", str(REPO / ".env.example"), "-f", str(COMPOSE), "config"],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def test_expected_services(resolved: dict) -> None:
    assert {
        "mosquitto", "postgres", "prefect-server", "prefect-worker", "listener",
        "argo-event-diffusion", "wis2-global-broker", "broker-config",
    } <= set(resolved["services"])
    assert resolved["services"]["argo-event-diffusion"]["profiles"] == ["demo"]


def test_images_are_pinned_or_built_here(resolved: dict) -> None:
    for name, service in resolved["services"].items():
        if "build" in service:
            context = Path(service["build"]["context"])
            assert context == REPO, f"{name} builds outside the repository"
            assert (context / service["build"].get("dockerfile", "Dockerfile")).is_file()
        else:
            image = service["image"]
            assert PINNED.match(image), f"{name}: image {image!r} is not pinned to a version"


def test_chain_settings_match_the_benchmarked_ones(resolved: dict) -> None:
    """The speed settings bench/RESULTS.md measured (postgres profile) are the deployed ones."""
    from bench.run import PROFILE_LISTENER_SETTINGS
    from localnode.node import LocalNode

    services = resolved["services"]
    worker_env = services["prefect-worker"]["environment"]
    assert "--type wis2-warm --limit 8" in " ".join(services["prefect-worker"]["command"])
    assert worker_env["PREFECT_WORKER_QUERY_SECONDS"] == LocalNode.WORKER_QUERY_SECONDS
    listener_env = services["listener"]["environment"]
    for name, value in PROFILE_LISTENER_SETTINGS["postgres"].items():
        assert listener_env[f"WIS2_LISTENER_{name}"] == value
    assert listener_env["WIS2_LISTENER_BATCH_MAX_SIZE"] == "50"


def test_volumes_and_files_exist(resolved: dict) -> None:
    declared = set(resolved.get("volumes", {}))
    for name, service in resolved["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith(("/", ".")):
                assert Path(source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"


def test_commands_name_files_of_the_repo(resolved: dict) -> None:
    text = COMPOSE.read_text()
    for path in ("broker/global-broker-sim.yml", "data/demo-event.json"):
        assert path in text and (REPO / path).is_file()
    ports = [p for s in resolved["services"].values() for p in s.get("ports", [])]
    published = {int(p["published"]) if isinstance(p, dict) else int(str(p).split(":")[0])
                 for p in ports}
    assert {1883, 8081, 4200} <= published


def test_secrets_come_from_env_file() -> None:
    text = COMPOSE.read_text()
    assert "change-me" not in text
    env_example = (REPO / ".env.example").read_text()
    for variable in re.findall(r"\$\{(\w+):\?", text):
        assert variable in env_example, f"{variable} required by compose.yml, not in .env.example"
