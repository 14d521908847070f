"""Checks against the WIS2 Topic Hierarchy (pywis-topics tables from the installed bundle)."""

from __future__ import annotations

import logging
from functools import lru_cache

from pywis_topics.topics import TopicHierarchy

log = logging.getLogger(__name__)

ORIGIN_PREFIX = "origin/a/wis2/"
# A centre-id (level 4 of the topic hierarchy): lower-case letters and digits in two or more
# dash-separated parts (``fr-ifremer-argo``, ``de-dwd``), as in the WIS2 centre-id table.
CENTRE_ID = r"[a-z0-9]+(?:-[a-z0-9]+)+"
CENTRE_ID_PATTERN = rf"^{CENTRE_ID}$"


@lru_cache
def _hierarchy() -> TopicHierarchy:
    return TopicHierarchy()


def metadata_topic(centre_id: str) -> str:
    return f"{ORIGIN_PREFIX}{centre_id}/metadata"


def centre_id_of_topic(topic: str) -> str | None:
    """The centre-id of an `origin/a/wis2/<centre-id>/...` topic, else None."""
    if not topic.startswith(ORIGIN_PREFIX):
        return None
    centre = topic.removeprefix(ORIGIN_PREFIX).split("/", 1)[0]
    return centre or None


def is_centre_topic(topic: str, centre_id: str) -> bool:
    return centre_id_of_topic(topic) == centre_id


def publication_topic_problem(topic: str) -> str | None:
    """Why `topic` cannot be published on in the WIS2 Topic Hierarchy, or None when it can."""
    if not topic:
        return "topic is empty"
    if any(c in topic for c in "#+"):
        return f"topic {topic!r} contains MQTT wildcards"
    if "." in topic:
        return f"topic {topic!r} contains dots"
    if topic != topic.lower():
        return f"topic {topic!r} must be lowercase"
    tokens = topic.split("/")
    if tokens[:3] != ["origin", "a", "wis2"]:
        return f"topic {topic!r} does not start with {ORIGIN_PREFIX!r}"
    if len(tokens) < 5:
        return f"topic {topic!r} has no notification type (data or metadata)"
    if tokens[4] not in ("data", "metadata"):
        return f"topic {topic!r}: level 5 is {tokens[4]!r}, must be 'data' or 'metadata'"
    if tokens[4] == "data" and len(tokens) >= 6 and tokens[5] in ("data", "metadata"):
        return f"topic {topic!r} repeats the notification type"
    if tokens[4] == "data" and (len(tokens) < 7):
        return f"topic {topic!r}: a data topic needs a data policy and an earth-system discipline"
    hierarchy = _hierarchy()
    centre = tokens[3]
    if not centre.endswith("-test") and centre not in hierarchy.topics[3]:
        return f"centre-id {centre!r} is not in the WIS2 centre-id table"
    if tokens[4] == "data" and tokens[5] not in hierarchy.topics[5]:
        return f"data policy {tokens[5]!r} is not core or recommended"
    try:
        valid = hierarchy.validate(topic, strict=True, publication=True)
    except ValueError as exc:
        return f"topic {topic!r}: {exc}"
    if not valid:
        return f"topic {topic!r} is not in the WIS2 Topic Hierarchy"
    return None
