"""The bundle installer, redirected to a temporary home so the real ~/.pywis-* stay untouched."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.paths import BUNDLE_DIR, REPO
from wis2 import bundles
from wis2.bundles import BundleError, bundle_status, install_bundles


@pytest.fixture
def bundle_source() -> Path:
    if not (BUNDLE_DIR / "README.md").exists():
        pytest.fail(f"WIS2 bundle copy not found at {BUNDLE_DIR} (set WIS2_SHARED_DIR)")
    return BUNDLE_DIR


def test_status_of_an_empty_home(home: Path) -> None:
    assert bundle_status() == {"pywis-pubsub": False, "pywcmp": False, "pywis-topics": False}


def test_install_from_a_local_copy(home: Path, bundle_source: Path) -> None:
    installed = install_bundles(bundle_source)
    assert installed == [home / ".pywis-pubsub", home / ".pywcmp", home / ".pywis-topics"]
    assert bundle_status() == {"pywis-pubsub": True, "pywcmp": True, "pywis-topics": True}
    assert (home / ".pywcmp" / "wcmp-2" / "wcmp2-bundled.json").read_bytes() == (
        bundle_source / "pywcmp" / "wcmp-2" / "wcmp2-bundled.json").read_bytes()

    # Installing again replaces the directories (stale files disappear).
    stale = home / ".pywis-topics" / "stale.txt"
    stale.write_text("old")
    install_bundles(bundle_source)
    assert not stale.exists()
    assert not [p for p in home.iterdir() if p.name.startswith(".pywis-topics-")]


def test_incomplete_copy_is_refused_naming_what_is_missing(
    home: Path, bundle_source: Path, tmp_path: Path
) -> None:
    partial = tmp_path / "partial"
    shutil.copytree(bundle_source, partial)
    shutil.rmtree(partial / "pywcmp" / "wcmp-2" / "codelists")
    with pytest.raises(BundleError, match=r"missing pywcmp/wcmp-2/codelists"):
        install_bundles(partial)
    assert not any(bundle_status().values())  # nothing half-installed

    with pytest.raises(BundleError, match="does not exist"):
        install_bundles(tmp_path / "nowhere")


def test_failed_online_sync_keeps_installed_bundles(
    home: Path, bundle_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_bundles(bundle_source)

    def offline_sync() -> None:  # like pywis-topics 0.4: deletes its directory, then downloads
        shutil.rmtree(home / ".pywis-topics")
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(bundles, "_online_syncs", lambda: [("pywis-topics", offline_sync)])
    with pytest.raises(BundleError) as raised:
        install_bundles(None)
    message = str(raised.value)
    assert "pywis-topics: [Errno -3]" in message
    assert "WIS2_BUNDLE_DIR" in message and "--from" in message
    assert bundle_status()["pywis-topics"]  # restored


def test_wrong_directory_names_every_missing_file(home: Path, tmp_path: Path) -> None:
    wrong = tmp_path / "not-a-bundle"
    (wrong / "pywcmp").mkdir(parents=True)
    with pytest.raises(BundleError) as raised:
        install_bundles(wrong)
    message = str(raised.value)
    assert str(wrong) in message and "is not a WIS2 bundle directory" in message
    for missing in (
        "pywis-pubsub/wis2-notification-message/wis2-notification-message-bundled.json",
        "pywcmp/wcmp-2/wcmp2-bundled.json", "pywcmp/wcmp-2/codelists",
        "pywcmp/wis2-topic-hierarchy/centre-id.csv",
        "pywis-topics/wis2-topic-hierarchy/centre-id.csv",
        "pywis-topics/wis2-topic-hierarchy/earth-system-discipline.csv",
    ):
        assert missing in message
    assert not any(home.iterdir())  # nothing written

    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(BundleError, match="does not exist"):
        install_bundles(a_file)


def test_install_in_a_subprocess_with_its_own_home(tmp_path: Path, bundle_source: Path) -> None:
    """The library itself (no monkeypatching), in a process whose HOME is a temporary dir."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WIS2_")} | {
        "HOME": str(tmp_path)}
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from wis2.bundles import install_bundles, bundle_status\n"
        "print(json.dumps([str(p) for p in install_bundles(Path(sys.argv[1]))]))\n"
        "print(json.dumps(bundle_status()))\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(bundle_source)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    installed, status = (json.loads(line) for line in done.stdout.splitlines())
    assert installed == [str(tmp_path / d) for d in (".pywis-pubsub", ".pywcmp", ".pywis-topics")]
    assert status == {"pywis-pubsub": True, "pywcmp": True, "pywis-topics": True}
    assert (tmp_path / ".pywis-pubsub" / "wis2-notification-message" /
            "wis2-notification-message-bundled.json").is_file()
