"""The protocol version, defined once.

Peers agree when their MAJOR numbers are equal; a minor bump only adds optional fields or
message types, which an older peer answers with an ``unknown_type`` error reply.
"""

from __future__ import annotations

PROTOCOL_VERSION = "1.1"


def major(version: str) -> int | None:
    """The major number of ``version``, or None when it is not of the form ``MAJOR.MINOR``."""
    head, _, _ = version.partition(".")
    return int(head) if head.isdigit() else None


def compatible(version: str) -> bool:
    """True when a peer speaking ``version`` can talk to this one."""
    return major(version) == major(PROTOCOL_VERSION)
