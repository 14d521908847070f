"""The `wis2-broker` command (`broker/launcher.py`) refusing bad settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CENTRE = "fr-ifremer-argo"


def test_bad_settings_stop_the_command_with_a_clear_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIS2_BROKER_")}
    env["WIS2_BROKER_CENTRE_ID"] = "Not A Centre"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("wis2-broker")), "--run-dir", str(tmp_path)],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2
    assert "centre_id" in result.stderr
    assert "Traceback" not in result.stderr
