"""The `wis2-chain` command line: what an operator sees on stdout/stderr and the exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.fixtures.paths import (
    ARGO_METADATA,
    BUFR_EVENT,
    BUNDLE_DIR,
    NETCDF_EVENT,
    ORIGINAL_NOTIFICATIONS,
    REPO,
    WNM_EXAMPLES,
)
from wis2.validation import validate_notification

ORIGINAL_DATA = ORIGINAL_NOTIFICATIONS / "IOPX01_LFVX_251403-msg-notification.json"
ARGO_TOPIC = (
    "origin/a/wis2/fr-ifremer-argo/data/core/ocean/surface-based-observations/"
    "drifting-ocean-profilers"
)
runner = CliRunner()


def _write(tmp_path: Path, name: str, document: Any) -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(document) if not isinstance(document, str) else document)
    return path


@pytest.mark.parametrize("event", [BUFR_EVENT, NETCDF_EVENT], ids=lambda p: p.stem)
def test_build_prints_a_valid_notification(event: Path) -> None:
    result = runner.invoke(app, ["build", str(event)])
    assert result.exit_code == 0, result.output
    message = json.loads(result.stdout)
    report = validate_notification(message, topic=ARGO_TOPIC)
    assert report.ok, report.summary()
    assert f"# topic: {ARGO_TOPIC}" in result.stderr


def test_build_reports_each_field_error_on_stderr(tmp_path: Path) -> None:
    event = json.loads(BUFR_EVENT.read_text())
    del event["specversion"]
    asset = next(iter(event["data"]["assets"].values()))
    asset["href"] = "not a url"
    path = _write(tmp_path, "bad.json", event)
    result = runner.invoke(app, ["build", str(path)])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert "$.specversion" in result.stderr
    assert "invalid" in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("  $")]
    assert lines and all(": " in line for line in lines)


def test_build_on_non_json_and_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["build", str(_write(tmp_path, "x.json", "{oops"))])
    assert result.exit_code == 1
    assert "$" in result.stderr

    result = runner.invoke(app, ["build", str(tmp_path / "missing.json")])
    assert result.exit_code == 2
    assert "cannot read" in result.stderr


def test_build_with_unknown_dataset(tmp_path: Path) -> None:
    result = runner.invoke(app, ["build", str(BUFR_EVENT), "--dataset", "no-such-dataset"])
    assert result.exit_code == 2
    assert "dataset 'no-such-dataset' not found" in result.stderr


def test_validate_a_good_notification_exits_0(tmp_path: Path) -> None:
    built = runner.invoke(app, ["build", str(BUFR_EVENT)])
    assert built.exit_code == 0, built.output
    path = _write(tmp_path, "notification.json", built.stdout)
    result = runner.invoke(app, ["validate", str(path), "--topic", ARGO_TOPIC])
    assert result.exit_code == 0, result.stdout
    assert "FAILED" not in result.stdout
    assert "PASSED" in result.stdout and "integrity-encoding" in result.stdout
    assert ": valid (" in result.stdout.splitlines()[-1]


def test_build_for_the_second_dataset(tmp_path: Path) -> None:
    event = json.loads(BUFR_EVENT.read_text())
    (asset,) = event["data"]["assets"].values()
    asset.pop("type")
    asset["href"] = "https://data.meteofrance.example/synop/A_ISMD01LFPW281200.bufr4"
    event["data"]["assets"] = {"bufr": asset}
    path = _write(tmp_path, "synop-event.json", event)
    result = runner.invoke(app, ["build", str(path), "--dataset", "synop"])
    assert result.exit_code == 0, result.output
    message = json.loads(result.stdout)
    assert message["properties"]["data_id"] == (
        "wis2/fr-meteofrance/data/core/weather/surface-based-observations/synop/"
        "A_ISMD01LFPW281200.bufr4")
    assert message["links"][0]["type"] == "application/bufr"
    topic = "origin/a/wis2/fr-meteofrance/data/core/weather/surface-based-observations/synop"
    assert f"# topic: {topic}" in result.stderr
    assert validate_notification(message, topic=topic).ok


def test_validate_original_notification_publish_vs_spec() -> None:
    result = runner.invoke(app, ["validate", str(ORIGINAL_DATA)])
    assert result.exit_code == 1
    assert "FAILED" in result.stdout and "integrity-encoding" in result.stdout
    assert "looks like hex" in result.stdout and "'core/data' order" in result.stdout

    result = runner.invoke(app, ["validate", str(ORIGINAL_DATA), "--profile", "spec"])
    assert result.exit_code == 0, result.stdout
    assert "WARNING" in result.stdout and "valid" in result.stdout


def test_validate_spec_example_and_topic(tmp_path: Path) -> None:
    example = WNM_EXAMPLES / "example3.json"
    result = runner.invoke(app, ["validate", str(example), "--profile", "spec"])
    assert result.exit_code == 0, result.stdout

    result = runner.invoke(app, ["validate", str(example), "--profile", "spec",
                                 "--topic", "origin/a/wis2/fr-ifremer-argo/core/data"])
    assert result.exit_code == 1
    assert "topic" in result.stdout and "FAILED" in result.stdout

    result = runner.invoke(app, ["validate", str(example), "--profile", "strict"])
    assert result.exit_code == 2


def test_validate_detects_wcmp2() -> None:
    result = runner.invoke(app, ["validate", str(ARGO_METADATA)])
    assert result.exit_code == 0, result.stdout
    assert "wcmp2 urn:wmo:md:fr-ifremer-argo:cor:msg:argo" in result.stdout
    assert "channels" in result.stdout


def test_validate_bad_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["validate", str(_write(tmp_path, "x.json", "not json"))])
    assert result.exit_code == 1
    assert "not JSON" in result.stdout


def test_bundles_status_and_install(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["bundles", "status"])
    assert result.exit_code == 1
    assert "pywcmp: MISSING" in result.stdout

    monkeypatch.setenv("WIS2_BUNDLE_DIR", str(BUNDLE_DIR))  # the default for --from
    result = runner.invoke(app, ["bundles", "install"])
    assert result.exit_code == 0, result.output
    assert str(BUNDLE_DIR) in result.stdout

    result = runner.invoke(app, ["bundles", "status"])
    assert result.exit_code == 0
    assert result.stdout.count("installed") == 3


def test_bundles_install_from_a_wrong_directory(home: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["bundles", "install", "--from", str(tmp_path)])
    assert result.exit_code == 1
    assert "missing pywis-pubsub/" in result.stderr


def test_real_subprocess_installs_bundles_into_home(tmp_path: Path) -> None:
    """What `make bundles` runs, as a real process with its own HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIS2_")}
    env["HOME"] = str(tmp_path)
    command = [str(Path(sys.executable).with_name("wis2-chain")), "bundles"]
    done = subprocess.run([*command, "install", "--from", str(BUNDLE_DIR)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / ".pywis-topics" / "wis2-topic-hierarchy" / "centre-id.csv").exists()
    done = subprocess.run([*command, "status"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pywis-pubsub: installed" in done.stdout


def test_real_subprocess_build_then_validate(tmp_path: Path) -> None:
    """The installed console script, as an operator runs it (reads the real bundles only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIS2_")}
    command = str(REPO / ".venv" / "bin" / "wis2-chain")
    done = subprocess.run([command, "build", str(BUFR_EVENT)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    message = json.loads(done.stdout)
    assert message["properties"]["integrity"]["value"] == (
        "8roCSwmGq459PsJ1UFxZBw1FP0dk5IrZ6q2VWb92uQY=")
    path = _write(tmp_path, "built.json", done.stdout)
    done = subprocess.run([command, "validate", str(path), "--topic", ARGO_TOPIC], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    bad = json.loads(BUFR_EVENT.read_text()) | {"specversion": "0.3"}
    done = subprocess.run([command, "build", str(_write(tmp_path, "bad.json", bad))], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stdout == ""
    assert "  $.specversion: " in done.stderr
    assert "Traceback" not in done.stderr


def test_validate_an_update_against_the_pubtime_it_updates(tmp_path: Path) -> None:
    event = json.loads(BUFR_EVENT.read_text())
    event["operation"] = "update"
    built = runner.invoke(app, ["build", str(_write(tmp_path, "update.json", event))])
    assert built.exit_code == 0, built.output
    path = _write(tmp_path, "notification.json", built.stdout)
    later = runner.invoke(app, ["validate", str(path), "--previous-pubtime",
                                "2099-01-01T00:00:00Z"])
    assert later.exit_code == 1 and "FAILED   update-pubtime" in later.stdout
    earlier = runner.invoke(app, ["validate", str(path), "--previous-pubtime",
                                  "2020-01-01T00:00:00Z"])
    assert earlier.exit_code == 0 and "PASSED   update-pubtime" in earlier.stdout
