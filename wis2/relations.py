"""Operations on a file and the link relations that announce them (WNM `links[].rel`).

An event says what happened to a file (`Operation`: create, update, delete); a notification
announces it with exactly one link of relation `canonical`, `update` or `deletion`. Which one is
decided by `relation_for`, from the operation and what this node published last for the same
`data_id` (the publication ledger's entry, any object with `rel` and `checksum`).
"""

from __future__ import annotations

from typing import Literal, Protocol, get_args

Operation = Literal["create", "update", "delete"]
LinkRel = Literal["canonical", "update", "deletion"]

LINK_RELATIONS: tuple[str, ...] = get_args(LinkRel)  # exactly one per notification
DATA_RELATIONS = ("canonical", "update")  # their href is the data to download
RELATION_OF_OPERATION: dict[str, LinkRel] = {
    "create": "canonical", "update": "update", "delete": "deletion",
}


class Published(Protocol):
    """What was last published for a `data_id` (e.g. a `chain.ledger.LedgerEntry`)."""

    rel: str
    checksum: str | None


def relation_for(
    operation: Operation,
    previous: Published | None,
    checksum: str | None = None,
    *,
    republication: bool = False,
) -> LinkRel:
    """The link relation of a new publication.

    - a delete is a ``deletion``;
    - nothing published before (or the last publication was a deletion): ``canonical``;
    - published before with another checksum, or any new publication of it when `republication`
      (a discovery metadata record is announced as ``update`` every time it is published again):
      ``update``;
    - published before with the same checksum: the previous relation (the same announcement
      delivered again).
    """
    if operation == "delete":
        return "deletion"
    if previous is None or previous.rel == "deletion":
        return "canonical"
    if republication or previous.checksum != checksum:
        return "update"
    return previous.rel  # type: ignore[return-value]
