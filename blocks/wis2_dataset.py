"""`Wis2Dataset` block: one dataset's description (topic, data_id template, media types...)."""

from __future__ import annotations

import re

from prefect.blocks.core import Block
from pydantic import Field

from wis2.dataset import DatasetDescription


def block_name(dataset_name: str) -> str:
    """Block document names allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]", "-", dataset_name.lower())


class Wis2Dataset(Block):
    """A dataset published by this WIS2 node: how its events become notifications."""

    _block_type_name = "WIS2 Dataset"
    _block_type_slug = "wis2-dataset"
    _description = (
        "Description of one dataset published by the WIS2 node (centre-id, topic, metadata_id, "
        "data_id template, data asset roles, media types, allowed href prefixes, cache control, "
        "station identifier property, access control, inline content encoding)."
    )

    dataset: DatasetDescription = Field(description="The dataset description")

    def description(self) -> DatasetDescription:
        return self.dataset
