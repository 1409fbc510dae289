from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from federation import NodeProcess, breast_cancer_splits, free_port  # noqa: E402


@pytest.fixture
def address() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.fixture
def make_nodes(tmp_path, address):
    """Create (not start) n nodes holding uneven splits of the breast cancer data."""
    created: list[NodeProcess] = []

    def make(n: int = 3, **kw) -> list[NodeProcess]:
        for i, frame in enumerate(breast_cancer_splits(n)):
            created.append(NodeProcess.create(tmp_path, f"hospital-{chr(97 + i)}", address, frame=frame, **kw))
        return created[-n:]

    yield make
    for node in created:
        node.stop()
