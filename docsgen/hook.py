"""MkDocs hook (`hooks:` in mkdocs.yml): adds the generated reference pages to the site's files
at every build, so `mkdocs build` and `mkdocs serve` always show the code as it is."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # mkdocs loads this file by path: make the project importable
    sys.path.insert(0, str(REPO))

from docsgen.render import PAGES  # noqa: E402


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for path, render in PAGES.items():
        files.append(File.generated(config, path, content=render()))
    # bench/RESULTS.md is shown as benchmarks/results.md (a snippet): the plots it links beside it
    for plot in sorted((REPO / "bench").glob("*.png")):
        files.append(File.generated(config, f"benchmarks/{plot.name}", content=plot.read_bytes()))
    return files
