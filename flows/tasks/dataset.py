"""Task: load a dataset description (Wis2Dataset block, else data/datasets/<name>.json)."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger

from blocks.loading import load_block
from blocks.wis2_dataset import Wis2Dataset, block_name
from wis2.dataset import DatasetDescription, load_dataset


class DatasetNotFound(LookupError):
    """Neither a Wis2Dataset block nor a dataset file of that name exists."""


def find_dataset(name: str, datasets_dir: Path | None = None,
                 block_cache_seconds: float = 0.0) -> tuple[DatasetDescription, str]:
    """The dataset and where it came from (``block wis2-dataset/<name>`` or the JSON file); the
    block as read less than `block_cache_seconds` ago in this process (blocks/loading.py)."""
    slug = block_name(name)
    try:
        block = load_block(Wis2Dataset, slug, block_cache_seconds)
    except ValueError as exc:
        if "Unable to find block document" not in str(exc):
            raise
    else:
        return block.description(), f"block wis2-dataset/{slug}"
    try:
        return load_dataset(name, datasets_dir), "dataset file"
    except FileNotFoundError as exc:
        raise DatasetNotFound(
            f"dataset {name!r}: no Wis2Dataset block {slug!r} and no file {exc.filename}"
        ) from exc


@task(name="load-dataset", cache_policy=NO_CACHE, retries=0)
def load_dataset_task(name: str, datasets_dir: Path | None = None,
                      block_cache_seconds: float = 0.0) -> DatasetDescription:
    dataset, origin = find_dataset(name, datasets_dir, block_cache_seconds)
    get_run_logger().info("dataset %s from %s: topic %s", dataset.name, origin, dataset.topic)
    return dataset
