"""The small training plan the node-side tests send as source text, and its variants.

A logistic regression on the breast cancer table that standardizes its own features. Each
optimizer step first sleeps ``delay`` seconds (0 here), so a test can make a round slow,
stuck or failing by editing one line of the source, the way a researcher's edit would change
the text a node's operator approved.
"""

from __future__ import annotations

LOGREG_PLAN = '''import time
import numpy as np
import torch
from torch import nn
import torch.nn.functional as F
from fedlab.training import TorchTrainingPlan


class LogReg(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(model_args["n_features"], 1)

    def training_data(self, dataset):
        x = dataset.drop(columns="target").to_numpy(dtype="float32")
        x = (x - x.mean(0)) / (x.std(0) + 1e-6)
        return x, dataset["target"].to_numpy(dtype="float32")

    def training_step(self, data, target):
        time.sleep(self.delay)
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)

    delay = 0.0
'''


def with_delay(seconds: float) -> str:
    """The plan with every optimizer step taking at least ``seconds``."""
    return LOGREG_PLAN.replace("delay = 0.0", f"delay = {seconds!r}")


def failing(message: str = "labels must be 0 or 1, got 7") -> str:
    """The plan whose every optimizer step raises ValueError(``message``)."""
    return LOGREG_PLAN.replace("time.sleep(self.delay)", f"raise ValueError({message!r})")
