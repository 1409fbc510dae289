"""Server optimizers and robust aggregation through real `fedlab node start` processes.

FedAdam learns on label-skewed nodes and a run resumed from its breakpoint (its moments and step
count in the breakpoint, a new Experiment and a new Researcher) ends where an uninterrupted run
does; under secure aggregation it ends where the plain run does. The median holds against a node
whose labels are flipped and whose replies are scaled up, where FedAvg is dragged off; robust
aggregators are refused under secure aggregation before any node is asked.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
from federation import HEARTBEAT

torch = pytest.importorskip("torch")

from test_training import (  # noqa: E402
    ARGS,
    CancerLogReg,
    accuracy,
    cancer_data,
    cleanup,  # noqa: F401 - a fixture, used by name
    one_thread_per_node,  # noqa: F401 - an autouse fixture
    start,
)

from fedlab import Experiment, Researcher  # noqa: E402
from fedlab.errors import FedlabSecaggError  # noqa: E402
from fedlab.researcher.aggregators import Aggregator, FedAvg  # noqa: E402
from fedlab.researcher.robust_aggregation import Median  # noqa: E402

pytestmark = pytest.mark.integration

MODEL_ARGS = {"n_features": 30}
TRAINING = {**ARGS, "optimizer_args": {"lr": 0.05}}


def test_fedadam_learns_and_resumes_from_its_breakpoint_exactly(tmp_path, address, cleanup):  # noqa: F811
    sites, _, test = cancer_data()
    researcher, nodes = start(tmp_path, address, sites[:2])  # the two most label-skewed sites
    cleanup += nodes
    args = {**TRAINING, "test_ratio": 0.2, "test_on_global_updates": True}
    options = {"model_args": MODEL_ARGS, "training_args": args, "rounds": 4, "aggregator": "fedadam",
               "aggregator_args": {"server_lr": 0.1}, "round_timeout": 60, "disconnect_grace": 30}
    with researcher:
        full = Experiment(researcher, ["cancer"], CancerLogReg, **options)
        start_accuracy = accuracy(full.model(), test)
        full.run()
        interrupted = Experiment(researcher, ["cancer"], CancerLogReg, breakpoint_dir=tmp_path / "bp", **options)
        interrupted.run(rounds=2)
        saved_m = {k: v.copy() for k, v in interrupted.aggregator.state_arrays["m"].items()}
    del interrupted  # the notebook is gone; only the breakpoint and the nodes remain
    with Researcher(address, heartbeat_interval=HEARTBEAT) as again:
        again.wait_for_nodes(2, timeout=30)
        resumed = Experiment.load_breakpoint(tmp_path / "bp", again)
        assert resumed.aggregator.name == "fedadam" and resumed.aggregator.args() == full.aggregator.args()
        assert resumed.aggregator.step == 2
        for name, value in saved_m.items():
            np.testing.assert_array_equal(resumed.aggregator.state_arrays["m"][name], value)
        resumed.run()
    assert (resumed.history["status"] == "ok").all() and resumed.aggregator.step == 4
    for name, value in full.params.items():
        np.testing.assert_allclose(resumed.params[name], value, rtol=0, atol=1e-6)
    history = full.history
    first, last = history[history["round"] == 1], history[history["kind"] == "validation"]
    losses = [np.average(h["global_loss"], weights=h["n_test_samples"]) for h in (first, last)]
    final = accuracy(full.model(), test)
    print(f"\nFedAdam: validation loss {losses[0]:.4f} -> {losses[1]:.4f}, held-out accuracy "
          f"{start_accuracy:.4f} -> {final:.4f} in 4 rounds")
    assert losses[1] < 0.5 * losses[0], losses
    assert final >= max(start_accuracy, 0.9), (start_accuracy, final)


def scaled_reply(base: type[Aggregator], node_id: str, factor: float) -> Aggregator:
    """``base`` seeing ``node_id``'s update ``factor`` times as large (a model-poisoning node)."""

    class Poisoned(base):  # type: ignore[misc, valid-type]
        def add(self, nid: str, params: Mapping[str, np.ndarray], n_samples: int, aux_vars=None) -> None:
            if nid == node_id:
                params = {k: (self._global[k] + factor * (v - self._global[k])).astype(v.dtype)
                          if np.issubdtype(v.dtype, np.floating) else v for k, v in params.items()}
            super().add(nid, params, n_samples, aux_vars)

    return Poisoned()


def test_the_median_holds_against_a_poisoned_node_where_fedavg_is_dragged_off(tmp_path, address, cleanup):  # noqa: F811
    sites, _, test = cancer_data()
    poisoned = sites[2].copy()
    poisoned["target"] = 1 - poisoned["target"]  # every label flipped
    researcher, nodes = start(tmp_path, address, [sites[0], sites[1], poisoned])
    cleanup += [researcher, *nodes]
    bad = nodes[2].node_id
    found = {}
    for base in (FedAvg, Median):
        exp = Experiment(researcher, ["cancer"], CancerLogReg, model_args=MODEL_ARGS, training_args=TRAINING,
                         rounds=5, aggregator=scaled_reply(base, bad, 10.0), round_timeout=60,
                         disconnect_grace=30)
        history = exp.run()
        assert (history["status"] == "ok").all()
        found[base.name] = accuracy(exp.model(), test)
    print(f"\naccuracy with one poisoned node of 3: {found}")
    assert found["median"] > 0.9, found
    assert found["fedavg"] < found["median"] - 0.1, found


def test_secure_fedadam_equals_plain_and_robust_rules_are_refused_before_any_round(tmp_path, address, cleanup):  # noqa: F811
    sites, _, _ = cancer_data()
    researcher, nodes = start(tmp_path, address, sites)
    cleanup += [researcher, *nodes]
    options = {"model_args": MODEL_ARGS, "training_args": TRAINING, "rounds": 2, "aggregator": "fedadam",
               "aggregator_args": {"server_lr": 0.05}, "round_timeout": 120, "disconnect_grace": 30}
    plain = Experiment(researcher, ["cancer"], CancerLogReg, **options)
    plain.run()
    secure = Experiment(researcher, ["cancer"], CancerLogReg, secagg=True, **options)
    history = secure.run()
    assert (history["status"] == "ok").all() and history["n_samples"].isna().all()
    for name, value in plain.params.items():
        np.testing.assert_allclose(secure.params[name], value, rtol=1e-5, atol=1e-6)
    for name in ("median", "krum"):
        with pytest.raises(FedlabSecaggError, match=f"the {name} aggregator needs each node's own parameters, "
                                                    "and secure aggregation gives the researcher only their sum"):
            Experiment(researcher, ["cancer"], CancerLogReg, **{**options, "aggregator": name,
                                                                "aggregator_args": None}, secagg=True)
    late = Experiment(researcher, ["cancer"], CancerLogReg, **{**options, "aggregator": "median",
                                                                "aggregator_args": None})
    late.secagg = True  # switched on after construction: the round refuses before its set-up
    with pytest.raises(FedlabSecaggError, match="only their sum"):
        late.run_once()
    assert late.round_current == 0 and late.secagg_rounds == [] and len(late.history) == 0
