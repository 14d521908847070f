"""The deployments prefect.yaml declares are the ones the code names (chain.deployments)."""

from __future__ import annotations

import yaml

from chain import deployments
from tests.fixtures.paths import REPO


def test_prefect_yaml_declares_every_named_deployment() -> None:
    declared = yaml.safe_load((REPO / "prefect.yaml").read_text(encoding="utf-8"))["deployments"]
    names = {f"{d['entrypoint'].rsplit(':', 1)[1].replace('_', '-')}/{d['name']}"
             for d in declared}
    assert set(deployments.ALL) <= names
