"""The only package that touches zmq: sockets, heartbeats, size limits; plus an in-memory twin."""

from fedlab.transport.directory import BUSY, OFFLINE, ONLINE, NodeDirectory, NodeRecord
from fedlab.transport.memory import InMemoryResearcherTransport
from fedlab.transport.zmq_node import ZmqNodeTransport
from fedlab.transport.zmq_researcher import ZmqResearcherTransport

__all__ = [
    "BUSY",
    "OFFLINE",
    "ONLINE",
    "InMemoryResearcherTransport",
    "NodeDirectory",
    "NodeRecord",
    "ZmqNodeTransport",
    "ZmqResearcherTransport",
]
