"""The WIS2 validators' reference bundles (WNM schema, WCMP2 schema and codelists, WIS2 Topic
Hierarchy tables). Installed from a local directory laid out like the libraries' own user
directories, or downloaded with the libraries' online syncs."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


class BundleError(RuntimeError):
    pass


# sub-directory of a local bundle copy -> (target directory, files that must be there)
def _targets() -> dict[str, tuple[Path, list[str]]]:
    from pywcmp.util import get_userdir as pywcmp_userdir
    from pywis_pubsub.schema import USERDIR as PUBSUB_USERDIR
    from pywis_topics.util import get_userdir as topics_userdir

    return {
        "pywis-pubsub": (
            Path(PUBSUB_USERDIR),
            ["wis2-notification-message/wis2-notification-message-bundled.json"],
        ),
        "pywcmp": (
            Path(pywcmp_userdir()),
            ["wcmp-2/wcmp2-bundled.json", "wcmp-2/codelists", "wis2-topic-hierarchy/centre-id.csv"],
        ),
        "pywis-topics": (
            Path(topics_userdir()),
            ["wis2-topic-hierarchy/centre-id.csv",
             "wis2-topic-hierarchy/earth-system-discipline.csv"],
        ),
    }


def bundle_status() -> dict[str, bool]:
    """Whether each library's bundle is installed."""
    return {
        name: all((target / rel).exists() for rel in required)
        for name, (target, required) in _targets().items()
    }


def _install_from(source: Path) -> list[Path]:
    targets = _targets()
    missing = [
        f"{name}/{rel}" for name, (_, required) in targets.items() for rel in required
        if not (source / name / rel).exists()
    ]
    if missing:
        raise BundleError(
            f"{source} is not a WIS2 bundle directory: missing {', '.join(missing)} "
            "(expected the layout of shared/wis2-bundle: pywis-pubsub/, pywcmp/, pywis-topics/)"
        )
    installed = []
    for name, (target, _) in targets.items():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        shutil.copytree(source / name, staging, dirs_exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
        log.info("installed %s bundle from %s into %s", name, source / name, target)
        installed.append(target)
    return installed


def _online_syncs() -> list[tuple[str, Callable[[], None]]]:
    from pywcmp.bundle import sync as pywcmp_sync
    from pywis_pubsub.schema import sync_schema
    from pywis_topics.bundle import sync_bundle

    def pywcmp_bundle() -> None:  # pywcmp only offers its sync as a click command
        pywcmp_sync.main(args=[], standalone_mode=False)

    return [("pywis-pubsub", sync_schema), ("pywcmp", pywcmp_bundle),
            ("pywis-topics", sync_bundle)]


def install_bundles(source: Path | None = None) -> list[Path]:
    """Install the three bundles from `source`, or download them when `source` is None."""
    if source is not None:
        source = Path(source).expanduser()
        if not source.is_dir():
            raise BundleError(f"bundle directory {source} does not exist (WIS2_BUNDLE_DIR)")
        return _install_from(source)
    failures = []
    targets = _targets()
    for name, sync in _online_syncs():
        # Some syncs (pywis-topics 0.4) delete the installed bundle before downloading: keep a
        # copy and put it back when the download fails, so an offline attempt breaks nothing.
        target = targets[name][0]
        backup = Path(tempfile.mkdtemp(prefix=f"{name}-backup-"))
        try:
            if target.is_dir():
                shutil.copytree(target, backup, dirs_exist_ok=True)
            log.info("downloading the %s bundle", name)
            try:
                sync()
            except Exception as exc:  # any network or library failure
                failures.append(f"{name}: {exc}")
                if any(backup.iterdir()):
                    shutil.rmtree(target, ignore_errors=True)
                    shutil.copytree(backup, target)
                    log.warning("kept the previously installed %s bundle in %s", name, target)
        finally:
            shutil.rmtree(backup, ignore_errors=True)
    if failures:
        raise BundleError(
            "online bundle sync failed (" + "; ".join(failures) + "). Without network access, set "
            "WIS2_BUNDLE_DIR (or --from) to a local copy laid out like shared/wis2-bundle."
        )
    return [target for target, _ in targets.values()]
