"""The documentation site builds with `mkdocs build --strict`: no broken link or anchor, no page
left out of the nav, the generated references included; the README stays short."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.fixtures.paths import REPO


def test_the_site_builds_strict(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    done = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
        capture_output=True, text=True, timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    for page in ("reference/settings", "reference/cli", "reference/dataset", "reference/metrics",
                 "development/layout", "benchmarks/results"):
        html = (site / page / "index.html").read_text(encoding="utf-8")
        assert "<table>" in html, page
    layout = (site / "development/layout/index.html").read_text(encoding="utf-8")
    assert "<code>docsgen/</code>" in layout  # README's table, included


def test_the_readme_is_short_and_keeps_the_two_commands() -> None:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text
