"""Description of one dataset published by this node: what the mapping needs beyond the event.

Stored as JSON files (``data/datasets/<name>.json``) and as `Wis2Dataset` Prefect blocks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field, field_validator, model_validator

from wis2.access import security_problems
from wis2.notification import ContentEncoding
from wis2.topics import CENTRE_ID_PATTERN

DEFAULT_DATASETS_DIR = Path(__file__).resolve().parents[1] / "data" / "datasets"


class DatasetDescription(BaseModel):
    """How events of one dataset become notifications.

    `data_id_template` placeholders: ``{centre_id}``, ``{data_policy}``, ``{topic_path}`` (the topic
    after ``origin/a/wis2/<centre-id>/``), ``{href_path}`` (the asset URL path, without leading
    ``/`` and without any of `href_strip_prefixes`), ``{href_name}`` (last path segment),
    ``{asset_key}`` and ``{item_id}``.
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="Short name, for routing")
    centre_id: str = Field(pattern=CENTRE_ID_PATTERN, description="WIS2 centre-id")
    data_policy: Literal["core", "recommended"] = Field(
        default="core", description="WIS2 data policy: core, or recommended (may be "
        "access-controlled, see security)")
    topic: str = Field(description="Full WIS2 topic the notifications are published on")
    metadata_id: str = Field(pattern=r"^urn:wmo:md:", description="WCMP2 record identifier")
    data_id_template: str = Field(
        default="wis2/{centre_id}/data/{data_policy}/{href_path}",
        description="Template of properties.data_id (placeholders: centre_id, data_policy, "
        "topic_path, href_path, href_name, asset_key, item_id)",
    )
    href_strip_prefixes: list[str] = Field(
        default_factory=list,
        description="Leading parts of the file URL path left out of {href_path}",
    )
    data_roles: list[str] = Field(
        default_factory=lambda: ["data"],
        description="Asset roles that make an asset a data file (an item whose assets have no "
        "roles at all publishes every asset)",
    )
    media_types: dict[str, str] = Field(
        default_factory=dict,
        description="File suffix -> media type, used when an asset has no `type`",
    )
    default_media_type: str = Field(
        default="application/octet-stream",
        description="Media type of a file with no asset `type` and no `media_types` suffix",
    )
    inline_content: bool = Field(
        default=False,
        description="Embed the data in the message (properties.content) when its encoded value "
        "is at most 4096 characters; never for recommended data",
    )
    content_encoding: ContentEncoding | None = Field(
        default=None,
        description="Encoding of inline content: utf-8 (text), base64, or gzip (compressed, then "
        "base64); unset: utf-8 when the file is UTF-8 text, else base64. The 4096-character "
        "limit applies to the encoded value",
    )
    cache: bool = Field(
        default=True,
        description="false: Global Caches do not cache the files, they republish the "
        "notification only (properties.cache: false; omitted when true). An event overrides it "
        "with its `cache` extension attribute or its STAC item's `cache` property",
    )
    wigos_station_property: str = Field(
        default="wigos_station_identifier", min_length=1,
        description="STAC item property holding the WIGOS station identifier of the data; when "
        "present it becomes properties.wigos_station_identifier and a rel=via link to the "
        "station's OSCAR/Surface page",
    )
    security: dict[str, Any] | None = Field(
        default=None,
        description="Recommended data only: the WNM link `security` object put on the canonical "
        "and update links (named OpenAPI security schemes, e.g. {\"bearer\": {\"type\": "
        "\"http\", \"scheme\": \"bearer\", \"description\": \"token from ...\"}})",
    )
    credential_block: str | None = Field(
        default=None,
        description="Name of the Prefect Secret block holding the credential the verification "
        "step downloads access-controlled data with (presented as the first usable scheme of "
        "`security`); never logged nor put in an artifact",
    )
    allowed_href_prefixes: list[str] = Field(
        default_factory=list,
        description="URL prefixes (http(s)://host/path/) an announced file may start with; "
        "empty: any http(s)/ftp URL",
    )

    @field_validator("allowed_href_prefixes")
    @classmethod
    def _prefixes_are_url_directories(cls, prefixes: list[str]) -> list[str]:
        for prefix in prefixes:
            parts = urlsplit(prefix)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"allowed_href_prefixes: {prefix!r} is not an http(s) URL")
            if not parts.path.endswith("/") or parts.query or parts.fragment:
                raise ValueError(
                    f"allowed_href_prefixes: {prefix!r} must end with '/' (a directory: "
                    "'https://host/data' would also allow 'https://host/database')"
                )
        return prefixes

    def href_refusal(self, href: str) -> str | None:
        """Why `href` may not be announced for this dataset, or None when it may."""
        if not self.allowed_href_prefixes:
            return None
        segments = unquote(urlsplit(href).path).split("/")
        if any(segment in (".", "..") for segment in segments):
            return f"{href!r} has '.' or '..' path segments"
        if any(href.startswith(prefix) for prefix in self.allowed_href_prefixes):
            return None
        allowed = ", ".join(self.allowed_href_prefixes)
        return f"{href!r} is outside the dataset's allowed_href_prefixes ({allowed})"

    @field_validator("security")
    @classmethod
    def _security_object(cls, security: dict[str, Any] | None) -> dict[str, Any] | None:
        if security is not None and (problems := security_problems(security)):
            raise ValueError("; ".join(problems))
        return security

    @model_validator(mode="after")
    def _access_control_is_for_recommended_data(self) -> DatasetDescription:
        if self.data_policy != "recommended":
            for name in ("security", "credential_block"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}: only a dataset with data_policy 'recommended' "
                                     "may be access-controlled (core data is free and open)")
        elif self.inline_content:
            raise ValueError("inline_content: recommended data is never inlined in a "
                             "notification")
        return self

    @model_validator(mode="after")
    def _topic_belongs_to_dataset(self) -> DatasetDescription:
        prefix = f"origin/a/wis2/{self.centre_id}/data/{self.data_policy}/"
        if not self.topic.startswith(prefix):
            raise ValueError(f"topic {self.topic!r} must start with {prefix!r}")
        if re.search(r"[#+]", self.topic):
            raise ValueError("topic must not contain MQTT wildcards")
        return self

    @property
    def topic_path(self) -> str:
        return self.topic.removeprefix(f"origin/a/wis2/{self.centre_id}/")


def load_dataset(name_or_path: str | Path, datasets_dir: Path | None = None) -> DatasetDescription:
    """Load a dataset description by name (from `datasets_dir`) or from a JSON file path."""
    path = Path(name_or_path)
    if path.suffix != ".json":
        path = (datasets_dir or DEFAULT_DATASETS_DIR) / f"{name_or_path}.json"
    return DatasetDescription.model_validate_json(path.read_text(encoding="utf-8"))


def list_datasets(datasets_dir: Path | None = None) -> list[DatasetDescription]:
    directory = datasets_dir or DEFAULT_DATASETS_DIR
    return [
        DatasetDescription.model_validate(json.loads(p.read_text(encoding="utf-8")))
        for p in sorted(directory.glob("*.json"))
    ]


def dataset_names(datasets_dir: Path | None = None) -> dict[str, str]:
    """{metadata_id: dataset name} of the dataset descriptions: the `dataset` label of what is
    published about a WCMP2 record (its metadata notifications, their delivery)."""
    return {d.metadata_id: d.name for d in list_datasets(datasets_dir)}
