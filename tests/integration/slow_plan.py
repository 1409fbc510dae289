"""A training plan slow enough to interrupt, and the data it trains on, for the failure tests.

Every optimizer step also sleeps ``model_args["step_seconds"]``, so a round lasts a few
seconds whatever the machine's speed and a test can kill a node, a kernel or a network link
while the round runs. The sleep changes no number: a slow run and a fast one of the same
seeds end with the same parameters. Shared by ``test_failures.py``, ``test_netns.py`` and the
researcher script that ``test_netns.py`` runs in its own network namespace.
"""

from __future__ import annotations

import time  # noqa: F401 -- the plan's own module imports it too (``dependencies``)

import numpy as np
import pandas as pd
import torch.nn.functional as F
from torch import nn

from fedlab import TorchTrainingPlan

TAGS = ("cancer",)


class SlowLogReg(TorchTrainingPlan):
    dependencies = ["import time"]

    def init_model(self, model_args):
        self.step_seconds = float(model_args.get("step_seconds", 0.0))
        return nn.Linear(model_args["n_features"], 1)

    def training_data(self, dataset):
        return dataset.drop(columns="target").to_numpy("float32"), dataset["target"].to_numpy("float32")

    def training_step(self, data, target):
        time.sleep(self.step_seconds)
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)


def cancer_sites(n: int, seed: int = 0) -> list[pd.DataFrame]:
    """The breast cancer data, standardized, shuffled and cut into ``n`` sites of different sizes."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    features = [c for c in frame.columns if c != "target"]
    frame[features] = (frame[features] - frame[features].mean()) / frame[features].std()
    cuts = np.cumsum([0, *[len(frame) * w // sum(range(1, n + 1)) for w in range(1, n + 1)]])
    cuts[-1] = len(frame)
    return [frame.iloc[cuts[i]:cuts[i + 1]].reset_index(drop=True) for i in range(n)]
