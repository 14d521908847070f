"""The bundle installer, redirected to a temporary home so the real ~/.pywis-* stay untouched."""

from __future__ import annotations

import shutil
from importlib import import_module
from pathlib import Path

import pytest

from flows.wis2 import bundles
from flows.wis2.bundles import BundleError, bundle_status, install_bundles
from tests.fixtures.paths import BUNDLE_DIR


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the three libraries' user directories into tmp_path/home."""
    # (the packages shadow some module names with click groups: go through import_module)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setattr(import_module("pywis_pubsub.schema"), "USERDIR", home / ".pywis-pubsub")
    monkeypatch.setattr(import_module("pywcmp.util"), "get_userdir", lambda: home / ".pywcmp")
    monkeypatch.setattr(import_module("pywis_topics.util"), "get_userdir",
                        lambda: home / ".pywis-topics")
    return home


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
