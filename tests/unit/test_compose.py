"""compose.yml as docker-compose reads it (`docker-compose config`, no engine needed): everything
it names exists in the repository or is a pinned public image with a stand-in here, the layout of
several hosts, the settings. tests/integration/test_compose_node.py brings it up for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from listener.settings import ListenerSettings
from tests.fixtures.paths import REPO

COMPOSE = REPO / "compose.yml"
PINNED = re.compile(r"^[a-z0-9./-]+:(?!latest$)[A-Za-z0-9._-]+$")


SPLIT_SERVER = REPO / "deploy" / "compose.split-server.yml"


def compose_config(*files: Path, env: dict[str, str] | None = None) -> dict:
    """The resolved configuration, with .env.example (and `env`, which takes precedence, as a
    shell's environment does) and no other variable of this process."""
    docker_compose = shutil.which("docker-compose")
    if docker_compose is None:
        pytest.fail("docker-compose is not installed (make test installs Debian's docker-compose)")
    argv = [docker_compose, "--env-file", str(REPO / ".env.example")]
    for file in files:
        argv += ["-f", str(file)]
    done = subprocess.run([*argv, "config"], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=False,
                          env={"PATH": os.environ["PATH"], **(env or {})})
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


@pytest.fixture(scope="module")
def resolved() -> dict:
    return compose_config(COMPOSE)


def test_expected_services(resolved: dict) -> None:
    assert {
        "mosquitto", "postgres", "prefect-server", "prefect-worker", "listener",
        "argo-event-diffusion", "wis2-global-broker", "broker-config", "redis",
        "prefect-worker-2", "listener-2", "delivery-monitor",
    } <= set(resolved["services"])
    assert resolved["services"]["argo-event-diffusion"]["profiles"] == ["demo"]
    assert resolved["services"]["demo-files"]["profiles"] == ["demo"]


def test_every_public_image_has_a_stand_in() -> None:
    """The images Docker Hub would serve are built here from Debian by deploy/standins/build.sh
    (the compose tests run those): one Dockerfile each, tagged with the name compose uses."""
    script = (REPO / "deploy" / "standins" / "build.sh").read_text()
    listed = dict(re.findall(r"^(\S+:\S+) (\S+\.Dockerfile)$", script, re.MULTILINE))
    images = {service["image"] for service in [
        *compose_config(COMPOSE)["services"].values(),
        *compose_config(COMPOSE, SPLIT_SERVER)["services"].values()] if "build" not in service}
    assert images <= set(listed), images - set(listed)
    assert (REPO / "Dockerfile").read_text().count("FROM python:3.11.11-slim-bookworm") == 1
    assert "python:3.11.11-slim-bookworm" in listed
    for dockerfile in listed.values():
        assert (REPO / "deploy" / "standins" / dockerfile).is_file(), dockerfile


def test_host_ports_and_the_bundle_directory_come_from_the_environment() -> None:
    env = {"WIS2_PUBLISHED_MQTTS_PORT": "18883", "WIS2_PUBLISHED_WSS_PORT": "18084",
           "WIS2_PUBLISHED_UI_PORT": "14200", "WIS2_PUBLISHED_METRICS_PORT": "19464",
           "WIS2_PUBLISHED_METRICS_PORT_2": "19465",
           "WIS2_PUBLISHED_DELIVERY_METRICS_PORT": "19466",
           "WIS2_BUNDLE_DIR": "/srv/wis2-bundle"}
    services = compose_config(COMPOSE, env=env)["services"]
    assert {p[1:] for p in published_ports(services["mosquitto"])} == {(18883, 8883),
                                                                        (18084, 8084)}
    assert published_ports(services["prefect-ui-tls"])[0][1:] == (14200, 4443)
    assert published_ports(services["listener"]) == [("127.0.0.1", 19464, 9464)]
    assert published_ports(services["listener-2"]) == [("127.0.0.1", 19465, 9464)]
    assert published_ports(services["delivery-monitor"]) == [("127.0.0.1", 19466, 9466)]
    for name in ("prefect-worker", "prefect-worker-2", "wis2-global-broker"):
        assert _mounts(services[name])["/bundles"] == "/srv/wis2-bundle", name
        assert "bundles install --from-if-present /bundles" in " ".join(
            services[name]["command"]), name
    # unset: an empty volume, and the bundles are downloaded
    services = compose_config(COMPOSE)["services"]
    assert _mounts(services["prefect-worker"])["/bundles"] == "no-bundles"


def test_the_demo_serves_its_file_inside_compose(resolved: dict) -> None:
    services = resolved["services"]
    command = " ".join(services["argo-event-diffusion"]["command"])
    # the metadata record first (as make demo), then the event, its file on demo-files
    assert command.index("publish-metadata/default") < command.index("send-event")
    assert "--files-url http://demo-files:8765/files" in command
    assert "http://demo-files:8765/demo-metadata.json" in command
    assert "http.server 8765 --directory data" in " ".join(
        services["demo-files"]["command"])
    assert services["argo-event-diffusion"]["depends_on"]["prefect-worker"] == {
        "condition": "service_healthy"}


def _mounts(service: dict) -> dict[str, str]:
    """target -> source of the service's volumes."""
    return {(v["target"] if isinstance(v, dict) else v.split(":")[1]):
            (v["source"] if isinstance(v, dict) else v.split(":")[0])
            for v in service.get("volumes", [])}


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
    from bench.node import PROFILE_LISTENER_SETTINGS
    from localnode.node import LocalNode

    services = resolved["services"]
    worker_env = services["prefect-worker"]["environment"]
    assert "--type wis2-warm --limit 8" in " ".join(services["prefect-worker"]["command"])
    assert worker_env["PREFECT_WORKER_QUERY_SECONDS"] == LocalNode.WORKER_QUERY_SECONDS
    assert worker_env["PREFECT_CLIENT_MAX_RETRIES"] == LocalNode.WORKER_CLIENT_MAX_RETRIES
    assert worker_env["PREFECT_CLIENT_RETRY_EXTRA_CODES"] == LocalNode.WORKER_CLIENT_RETRY_CODES
    for name, value in LocalNode.WORKER_MALLOC_ENV.items():
        assert worker_env[name] == value, name
    assert worker_env["WIS2_BLOCK_CACHE_SECONDS"] == LocalNode.WORKER_BLOCK_CACHE_SECONDS
    listener_env = services["listener"]["environment"]
    for env in (worker_env, listener_env):
        assert env["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] == LocalNode.CLIENT_CSRF_SUPPORT
    for name, value in PROFILE_LISTENER_SETTINGS["postgres"].items():
        assert listener_env[f"WIS2_LISTENER_{name}"] == value
    assert listener_env["WIS2_LISTENER_BATCH_MAX_SIZE"] == str(
        ListenerSettings.model_fields["batch_max_size"].default)


def test_server_settings_are_the_local_nodes(resolved: dict) -> None:
    """The Prefect server's services and batching are those make demo and the bench run."""
    from localnode.prefect_server import NODE_SERVER_SETTINGS

    server_env = resolved["services"]["prefect-server"]["environment"]
    for name, value in NODE_SERVER_SETTINGS.items():
        assert server_env[name] == value, name


def test_volumes_and_files_exist(resolved: dict) -> None:
    declared = set(resolved.get("volumes", {}))
    operator_dirs = {env_example()["WIS2_TLS_DIR"]}  # the certificates are the operator's
    for name, service in resolved["services"].items():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source in operator_dirs:
                continue
            if source.startswith(("/", ".")):
                assert Path(source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in declared, f"{name}: volume {source} not declared"


def test_commands_name_files_of_the_repo(resolved: dict) -> None:
    text = COMPOSE.read_text()
    for path in ("broker/global-broker-sim.yml", "data/demo-event.json",
                 "deploy/prefect-ui-tls.conf"):
        assert path in text and (REPO / path).is_file()


def test_secrets_come_from_env_file() -> None:
    text = COMPOSE.read_text()
    assert "change-me" not in text
    env_example = (REPO / ".env.example").read_text()
    for variable in re.findall(r"\$\{(\w+):\?", text):
        assert variable in env_example, f"{variable} required by compose.yml, not in .env.example"


def env_example() -> dict[str, str]:
    lines = (REPO / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def published_ports(service: dict) -> list[tuple[str, int, int]]:
    """(host address, host port, container port) of each published port."""
    ports = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            ports.append((port.get("host_ip", "0.0.0.0"), int(port["published"]),
                          int(port["target"])))
        else:  # "[host_ip:]published:target[/proto]"
            parts = str(port).split("/")[0].split(":")
            host = parts[0] if len(parts) == 3 else "0.0.0.0"
            ports.append((host, int(parts[-2]), int(parts[-1])))
    return ports


def test_only_tls_listeners_and_the_authenticated_ui_are_published(resolved: dict) -> None:
    services = resolved["services"]
    public = {(name, published, target)
              for name, service in services.items()
              for host, published, target in published_ports(service)
              if not host.startswith("127.")}
    assert public == {("mosquitto", 8883, 8883), ("mosquitto", 8084, 8084),
                      ("prefect-ui-tls", 4200, 4443)}
    # plain MQTT and the Prefect server: the compose network only
    assert {"1883", "8081"} <= {str(p) for p in services["mosquitto"].get("expose", [])}
    assert "ports" not in services["prefect-server"]
    # the broker really has the TLS listeners on those ports
    broker = services["broker-config"]["environment"]
    assert (broker["WIS2_BROKER_TLS_PORT"], broker["WIS2_BROKER_WSS_PORT"]) == ("8883", "8084")
    assert broker["WIS2_BROKER_CERTFILE"] and broker["WIS2_BROKER_KEYFILE"]
    # the UI proxy speaks TLS on its published port and forwards to the server
    conf = (REPO / "deploy" / "prefect-ui-tls.conf").read_text()
    assert re.search(r"listen\s+4443\s+ssl;", conf)
    assert "proxy_pass http://prefect-server:4200;" in conf
    assert env_example()["PREFECT_UI_API_URL"].startswith("https://")


def test_the_prefect_api_asks_every_client_for_the_auth_string(resolved: dict) -> None:
    services = resolved["services"]
    secret = services["prefect-server"]["environment"]["PREFECT_SERVER_API_AUTH_STRING"]
    assert secret == env_example()["PREFECT_AUTH_STRING"]
    for client in ("prefect-worker", "prefect-worker-2", "listener", "listener-2"):
        env = services[client]["environment"]
        assert env["PREFECT_API_AUTH_STRING"] == secret, client
    text = COMPOSE.read_text()
    assert "${PREFECT_AUTH_STRING:?" in text  # from .env, never written in the file
    assert secret not in text


# ---- the multi-host layout ---------------------------------------------------------------------
def _volume_sources(service: dict) -> set[str]:
    return {v["source"] if isinstance(v, dict) else v.split(":")[0]
            for v in service.get("volumes", [])}


def test_worker_hosts_share_only_the_ledger_and_the_results_services(resolved: dict) -> None:
    services = resolved["services"]
    env = env_example()
    workers = [name for name in services if name.startswith("prefect-worker")]
    assert len(workers) >= 2
    results_volumes = [{source for target, source in _mounts(services[w]).items()
                        if target != "/bundles"} for w in workers]
    assert all(len(v) == 1 for v in results_volumes)
    assert len(set().union(*results_volumes)) == len(workers), "each worker its own volume"
    for worker in workers:
        worker_env = services[worker]["environment"]
        # the password in libpq's PGPASSWORD, never in the URL (flows hand it to their tasks)
        assert worker_env["WIS2_LEDGER_URL"] == "postgresql://prefect@postgres:5432/ledger", worker
        assert worker_env["PGPASSWORD"] == env["POSTGRES_PASSWORD"], worker
        assert worker_env["WIS2_RESULTS_URL"] == (
            f"redis://:{env['REDIS_PASSWORD']}@redis:6379/1"), worker
        assert worker_env["WIS2_RESULTS_DIR"].startswith("/var/lib/wis2-chain/")
        command = " ".join(services[worker]["command"])
        assert "prefect worker start --pool wis2-pool" in command
        assert '--name "wis2-worker-$$(hostname)"' in command  # one name per container
        assert {"redis", "prefect-server"} <= set(services[worker]["depends_on"])
    # the ledger database exists: created by the postgres image's init directory
    postgres = services["postgres"]
    init = next(v for v in postgres["volumes"]
                if (v["target"] if isinstance(v, dict) else v.split(":")[1])
                == "/docker-entrypoint-initdb.d")
    source = Path(init["source"] if isinstance(init, dict) else init.split(":")[0])
    sql = "\n".join(f.read_text() for f in sorted(source.glob("*.sql")))
    assert re.search(r"CREATE DATABASE ledger;", sql)


def test_listener_replicas_share_one_subscription(resolved: dict) -> None:
    from listener.settings import ListenerSettings

    services = resolved["services"]
    replicas = [name for name in services if name.split("-")[0] == "listener"]
    assert len(replicas) >= 2
    settings = []
    for name in replicas:
        env = {k: v.replace("$$", "$") for k, v in services[name]["environment"].items()
               if k.startswith("WIS2_LISTENER_")}
        fields = {k.removeprefix("WIS2_LISTENER_").lower(): v for k, v in env.items()}
        fields["subscriptions"] = json.loads(fields["subscriptions"])
        settings.append(ListenerSettings(_env_file=None, **fields))
    assert {tuple(s.subscriptions) for s in settings} == {("$share/wis2/diffusion/files/#",)}
    assert len({s.client_id for s in settings}) == len(replicas)  # a session each
    assert len({frozenset(_volume_sources(services[n])) for n in replicas}) == len(replicas)
    ports = [published for n in replicas for _, published, _ in published_ports(services[n])]
    assert len(set(ports)) == len(replicas)


def test_redis_stays_on_the_compose_network_with_a_password(resolved: dict) -> None:
    redis = resolved["services"]["redis"]
    assert "ports" not in redis
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == env_example()["REDIS_PASSWORD"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "redis-data" in _volume_sources(redis)


def test_split_server_override_runs_api_and_services_apart_on_redis() -> None:
    from localnode.prefect_server import redis_env

    services = compose_config(COMPOSE, SPLIT_SERVER)["services"]
    api, background = services["prefect-server"], services["prefect-services"]
    assert "--no-services" in " ".join(api["command"])
    assert "prefect server services start" in " ".join(background["command"])
    url = f"redis://:{env_example()['REDIS_PASSWORD']}@redis:6379/0"
    for service in (api, background):
        env = service["environment"]
        assert {k: env[k] for k in redis_env(url)} == redis_env(url)
        assert env["PREFECT_API_DATABASE_CONNECTION_URL"] == (
            api["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert PINNED.match(background["image"])


def test_retention_is_on_in_every_prefect_server_process(resolved: dict) -> None:
    """The database vacuum deletes old flow runs (not only events) wherever it runs: in the
    one server process, and in the services process of the split server."""
    from localnode.prefect_server import NODE_SERVER_SETTINGS

    retention = {k: v for k, v in NODE_SERVER_SETTINGS.items()
                 if "VACUUM" in k or "RETENTION" in k}
    assert "flow_runs" in retention["PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED"].split(",")
    services = compose_config(COMPOSE, SPLIT_SERVER)["services"]
    for env in (resolved["services"]["prefect-server"]["environment"],
                services["prefect-services"]["environment"]):
        assert {k: env[k] for k in retention} == retention
    for name, service in resolved["services"].items():
        assert service.get("logging", {}).get("options", {}).get("max-size"), name


def test_postgres_autovacuum_is_the_local_nodes(resolved: dict) -> None:
    """compose's PostgreSQL vacuums the Prefect tables as often as make demo's (the soak's)."""
    from localnode.postgres import AUTOVACUUM_ARGS

    command = resolved["services"]["postgres"]["command"]
    assert command[0] == "postgres"
    assert tuple(command[1:]) == AUTOVACUUM_ARGS
