"""Fixtures of the red-team suite: nodes holding the cohort, a raw researcher, the public API."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from redteam_harness import (  # noqa: E402
    HEARTBEAT,
    START_TIMEOUT,
    Node,
    RawResearcher,
    free_port,
    make_cohort,
)


@pytest.fixture
def address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def cohort():
    return make_cohort()


@pytest.fixture
def nodes(tmp_path, address) -> Iterator[Any]:
    """``nodes(n=1, rules={...}, seeds=(7, 8))``: create and start n nodes holding cohorts."""
    made: list[Node] = []

    def make(n: int = 1, *, rules: dict[str, Any] | None = None, seeds: tuple[int, ...] = (7, 11, 13),
             start: bool = True) -> list[Node]:
        for i in range(n):
            node = Node.create(tmp_path, f"site-{len(made)}", address, make_cohort(seeds[i]), rules=rules)
            made.append(node)
            if start:
                node.start()
        return made[-n:]

    yield make
    for node in made:
        node.stop()


@pytest.fixture
def raw(address) -> Iterator[RawResearcher]:
    researcher = RawResearcher(address)
    yield researcher
    researcher.close()


@pytest.fixture
def api(address):
    """``api(n)``: a public fedlab.Researcher once ``n`` nodes are online."""
    import fedlab

    opened: list[Any] = []

    def connect(n: int = 1) -> Any:
        researcher = fedlab.Researcher(address, heartbeat_interval=HEARTBEAT, default_timeout=120)
        opened.append(researcher)
        researcher.wait_for_nodes(n, timeout=START_TIMEOUT)
        return researcher

    yield connect
    for researcher in opened:
        researcher.close()
