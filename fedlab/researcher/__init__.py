"""The researcher's API: Researcher, Requests and policies, FederatedDataset."""

from fedlab.researcher.federated_dataset import DataQualityWarning, FederatedDataset, check_data_quality
from fedlab.researcher.policies import (
    DiscardOnTimeout,
    RequestPolicy,
    StopOnDisconnect,
    StopOnError,
    StopOnTimeout,
)
from fedlab.researcher.requests import FederatedRequest, MessagesByNode, MissingNode, Requests
from fedlab.researcher.researcher import Researcher

__all__ = [
    "DataQualityWarning",
    "DiscardOnTimeout",
    "FederatedDataset",
    "FederatedRequest",
    "MessagesByNode",
    "MissingNode",
    "RequestPolicy",
    "Requests",
    "Researcher",
    "StopOnDisconnect",
    "StopOnError",
    "StopOnTimeout",
    "check_data_quality",
]
