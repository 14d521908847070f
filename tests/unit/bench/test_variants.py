"""bench/variants.py: `--variant NAME:VAR=VALUE,...` parsed and split into the Prefect server's,
the listener's and the chain processes' environment; the bench node builds the server from them
(nothing is started); bench/api_requests.py: the server's access log counted by route."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from bench.api_requests import AccessLog, count_routes, route, summarize
from bench.node import BenchNode
from bench.options import parse_args
from bench.variants import parse_variant, parse_variants, result_key
from localnode.node import NodeSettings
from localnode.prefect_server import NODE_SERVER_SETTINGS

# ---- parsing and splitting ------------------------------------------------------------------


def test_a_name_alone_is_the_node_as_deployed() -> None:
    base = parse_variant("base")
    assert (base.name, base.assignments, base.server_env, base.listener_settings,
            base.chain_env, base.server_defaults) == ("base", [], {}, {}, {}, False)
    assert base.describe() == "the node as deployed"
    assert result_key("postgres", base) == "postgres[base]"
    assert result_key("postgres", None) == "postgres"


def test_assignments_go_to_the_server_the_listener_or_every_chain_process() -> None:
    v = parse_variant("mix:PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED=true,"
                      "WIS2_LISTENER_API_CONCURRENCY=1,WIS2_WORKER_WAKEUP=false,"
                      "PREFECT_CLIENT_MAX_RETRIES=3")
    assert v.server_env == {"PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "true"}
    assert v.listener_settings == {"API_CONCURRENCY": "1"}
    assert v.chain_env == {"WIS2_WORKER_WAKEUP": "false", "PREFECT_CLIENT_MAX_RETRIES": "3"}
    assert v.assignments == ["PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED=true",
                             "WIS2_LISTENER_API_CONCURRENCY=1", "WIS2_WORKER_WAKEUP=false",
                             "PREFECT_CLIENT_MAX_RETRIES=3"]
    assert v.describe() == ("`PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED=true`, "
                            "`WIS2_LISTENER_API_CONCURRENCY=1`, `WIS2_WORKER_WAKEUP=false`, "
                            "`PREFECT_CLIENT_MAX_RETRIES=3`")


def test_the_node_server_settings_beyond_prefect_ones_go_to_the_server() -> None:
    v = parse_variant("glibc:MALLOC_ARENA_MAX=,MALLOC_MMAP_THRESHOLD_=")
    assert v.server_env == {"MALLOC_ARENA_MAX": None, "MALLOC_MMAP_THRESHOLD_": None}
    assert v.chain_env == {}


def test_an_empty_value_unsets_and_server_defaults_drops_the_node_settings() -> None:
    v = parse_variant("prefect:@server-defaults,PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED=,"
                      "WIS2_LISTENER_API_CONCURRENCY=,WIS2_X=a=b")
    assert v.server_defaults
    assert v.server_env == {"PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": None}
    assert v.listener_settings == {"API_CONCURRENCY": None}
    assert v.chain_env == {"WIS2_X": "a=b"}  # the first '=' splits
    assert v.assignments[0] == "@server-defaults"


@pytest.mark.parametrize(("item", "named"), [
    ("no wake", "'no wake'"),
    (":X=1", "''"),
    ("v:WIS2_WORKER_WAKEUP", "'WIS2_WORKER_WAKEUP'"),
    ("v:X=1,=2", "'=2'"),
    ("v:X=1,@defaults", "'@defaults'"),
    ("v:X=1,", "''"),
    ("v:1X=1", "'1X=1'"),
])
def test_errors_name_the_bad_item(item: str, named: str) -> None:
    with pytest.raises(ValueError, match=f"--variant {item!r}: .*{named}") as err:
        parse_variants([item])
    assert named in str(err.value)


def test_names_are_distinct() -> None:
    with pytest.raises(ValueError, match="'base' is used twice"):
        parse_variants(["base", "base:X=1"])


def test_the_variant_option(capsys: pytest.CaptureFixture[str]) -> None:
    opts = parse_args(["--variant", "base", "--variant", "nowake:WIS2_WORKER_WAKEUP=false",
                       "--count-requests"])
    assert [v.name for v in opts.variants] == ["base", "nowake"]
    assert opts.variants[1].chain_env == {"WIS2_WORKER_WAKEUP": "false"}
    assert opts.count_requests
    plain = parse_args([])
    assert (plain.variants, plain.count_requests) == ([], False)
    with pytest.raises(SystemExit):
        parse_args(["--variant", "nowake:WIS2_WORKER_WAKEUP"])
    assert "--variant 'nowake:WIS2_WORKER_WAKEUP': variant 'nowake': 'WIS2_WORKER_WAKEUP'" in (
        capsys.readouterr().err)


# ---- the node built from them (nothing started) ---------------------------------------------


def _node(tmp_path: Path, **options) -> BenchNode:
    settings = NodeSettings(_env_file=None, run_dir=tmp_path / "node", database="sqlite")
    return BenchNode(settings, **options)


def test_the_server_env_goes_over_the_node_settings(tmp_path: Path) -> None:
    late = "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED"
    triggers = "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"
    env = _node(tmp_path, server_env={late: "true", triggers: None,
                                      "PREFECT_SERVER_LOGGING_LEVEL": "INFO"}).make_server().env
    assert env[late] == "true"
    assert triggers not in env  # unset: Prefect's default
    assert env["PREFECT_SERVER_LOGGING_LEVEL"] == "INFO"
    assert all(env[k] == v for k, v in NODE_SERVER_SETTINGS.items() if k not in (late, triggers))
    as_deployed = _node(tmp_path).make_server().env
    assert all(as_deployed[k] == v for k, v in NODE_SERVER_SETTINGS.items())


def test_server_defaults_leave_the_node_settings_out(tmp_path: Path) -> None:
    env = _node(tmp_path, server_node_settings=False,
                server_env={"PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false"}).make_server().env
    assert not set(NODE_SERVER_SETTINGS) - {"PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"} & set(env)
    assert env["PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED"] == "false"
    assert env["PREFECT_SERVER_API_PORT"]  # what the node needs is still there


def test_chain_and_listener_variables_are_set_or_unset(tmp_path: Path) -> None:
    node = _node(tmp_path, extra_env={"WIS2_WORKER_WAKEUP": "false",
                                      "PREFECT_CLIENT_MAX_RETRIES": None},
                 listener_settings={"API_CONCURRENCY": None, "BATCH_MAX_SIZE": "5"})
    node.server = node.make_server()
    assert node.child_env()["WIS2_WORKER_WAKEUP"] == "false"
    worker = node.worker_env(node.child_env())
    assert worker["WIS2_WORKER_WAKEUP"] == "false"
    assert "PREFECT_CLIENT_MAX_RETRIES" not in worker  # over the worker's own setting too
    listener = node.listener_env()
    assert listener["WIS2_LISTENER_BATCH_MAX_SIZE"] == "5"
    assert "WIS2_LISTENER_API_CONCURRENCY" not in listener


# ---- the access log ---------------------------------------------------------------------------

LOG = """\
12:00:00.001 | INFO    | prefect.server - Starting services
12:00:00.100 | INFO    | uvicorn.access - 127.0.0.1:47460 - "GET /api/health HTTP/1.1" 200
12:00:00.200 | INFO    | uvicorn.access - 127.0.0.1:47461 - "POST \
/api/flow_runs/0b5a3c4e-1d2f-4a6b-9c8d-7e6f5a4b3c2d/set_state HTTP/1.1" 201
12:00:00.300 | INFO    | uvicorn.access - 127.0.0.1:47461 - "POST \
/api/flow_runs/9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a/set_state?force=false HTTP/1.1" 201
12:00:00.400 | INFO    | uvicorn.access - 127.0.0.1:47462 - "POST \
/api/flow_runs/filter HTTP/1.1" 200
12:00:00.500 | WARNING | prefect.server.services - "GET /api/health HTTP/1.1" 200 (not access)
"""


def test_routes_have_ids_replaced_and_no_query_string() -> None:
    assert route("GET", "/api/flow_runs/0B5A3C4E-1D2F-4A6B-9C8D-7E6F5A4B3C2D?x=1") == (
        "GET /api/flow_runs/{id}")
    assert count_routes(LOG) == Counter({"POST /api/flow_runs/{id}/set_state": 2,
                                         "GET /api/health": 1, "POST /api/flow_runs/filter": 1})


def test_a_phase_counts_from_its_mark_less_the_bench_own_requests(tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    access = AccessLog(log_file)
    assert access.mark() == 0 and access.since(0) == Counter()  # no log yet
    log_file.write_text("12:00:00.000 | INFO    | uvicorn.access - 127.0.0.1:1 - "
                        '"GET /api/health HTTP/1.1" 200\n')
    mark = access.mark()
    with log_file.open("a") as f:
        f.write(LOG + '12:00:01 | INFO | uvicorn.access - 127.0.0.1:2 - "GET /api/hea')
    counts = access.since(mark)  # the incomplete last line is not counted
    assert sum(counts.values()) == 4 and counts["GET /api/health"] == 1

    summary = summarize(counts, flow_runs=2, own=Counter({"POST /api/flow_runs/filter": 1}))
    assert (summary.total, summary.flow_runs, summary.per_flow_run) == (3, 2, 1.5)
    assert summary.routes == {"POST /api/flow_runs/{id}/set_state": 2, "GET /api/health": 1}
    assert summary.own_requests_subtracted == 1
    assert summarize(counts, flow_runs=None).per_flow_run is None


def test_only_the_top_routes_are_kept() -> None:
    counts = Counter({f"GET /api/r{i}": 20 - i for i in range(15)})
    routes = summarize(counts, flow_runs=10).routes
    assert len(routes) == 13 and routes["GET /api/r0"] == 20
    assert routes["other"] == 8 + 7 + 6  # r12, r13, r14
