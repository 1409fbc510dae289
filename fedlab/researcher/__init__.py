"""The researcher's API: Researcher, Requests and policies, FederatedDataset, training."""

from fedlab.researcher.aggregators import Aggregator, FedAvg, FedProx, Scaffold
from fedlab.researcher.experiment import Experiment
from fedlab.researcher.federated_dataset import DataQualityWarning, FederatedDataset, check_data_quality
from fedlab.researcher.local_job import LocalJob
from fedlab.researcher.policies import (
    DiscardOnDisconnect,
    DiscardOnTimeout,
    RequestPolicy,
    StopOnDisconnect,
    StopOnError,
    StopOnTimeout,
)
from fedlab.researcher.requests import FederatedRequest, MessagesByNode, MissingNode, Requests
from fedlab.researcher.researcher import Researcher
from fedlab.researcher.training_jobs import TrainingJob, TrainingPlanApproveJob, TrainingPlanCheckJob

__all__ = [
    "Aggregator",
    "DataQualityWarning",
    "DiscardOnDisconnect",
    "DiscardOnTimeout",
    "Experiment",
    "FedAvg",
    "FedProx",
    "FederatedDataset",
    "FederatedRequest",
    "LocalJob",
    "MessagesByNode",
    "MissingNode",
    "RequestPolicy",
    "Requests",
    "Researcher",
    "Scaffold",
    "StopOnDisconnect",
    "StopOnError",
    "StopOnTimeout",
    "TrainingJob",
    "TrainingPlanApproveJob",
    "TrainingPlanCheckJob",
    "check_data_quality",
]
