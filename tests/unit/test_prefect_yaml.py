"""prefect.yaml: the deployments it declares load their flows (no Prefect server needed).

Deploying it for real (`prefect deploy --all`, a worker running a run):
tests/integration/test_deployment.py.
"""

from __future__ import annotations

from tests.fixtures.paths import REPO


def test_prefect_yaml_declares_the_metadata_deployments() -> None:
    """publish-metadata/default on demand; republish-metadata/daily at 03:00 UTC."""
    import yaml
    from prefect.flows import load_flow_from_entrypoint

    project = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))
    by_flow = {}
    for deployment in project["deployments"]:
        flow_obj = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
        by_flow[f"{flow_obj.name}/{deployment['name']}"] = deployment
    assert "publish-metadata/default" in by_flow
    daily = by_flow["republish-metadata/daily"]
    assert daily["schedules"] == [{"cron": "0 3 * * *", "timezone": "UTC", "active": True}]
    assert daily["work_pool"]["name"] == by_flow["publish-metadata/default"]["work_pool"]["name"]
