"""DP training: the accountant against Opacus' own, central clipping and noise, dp_args checks, DP-SGD and the
noised update in the training loop, the node's budget check before a round and its spend after, and what
the researcher's history shows."""

from __future__ import annotations

import json
import math
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from fedlab.errors import FedlabBudgetError, FedlabTrainingError
from fedlab.privacy import dp_training as dpt
from fedlab.privacy.dp_training import DPRound, central_round, clip_and_noise, epsilon, local_round, round_cost
from fedlab.training.args import TrainingArgs

opacus = pytest.importorskip("opacus")
torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from opacus.accountants import RDPAccountant  # noqa: E402
from torch import nn  # noqa: E402

from fedlab.training import TorchTrainingPlan, run_round  # noqa: E402
from fedlab.training.loop import initial_params  # noqa: E402

DELTA = 1e-5


def opacus_epsilon(steps: list[tuple[float, float, int]], delta: float) -> float:
    """ε the way Opacus' PrivacyEngine gets it: one accountant.step() per optimizer step."""
    accountant = RDPAccountant()
    for noise_multiplier, q, n in steps:
        for _ in range(n):
            accountant.step(noise_multiplier=noise_multiplier, sample_rate=q)
    with warnings.catch_warnings():  # Opacus warns when the best RDP order is the largest one
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=delta))


# -- the accountant ------------------------------------------------------------------------------
def test_the_orders_are_opacus_defaults() -> None:
    assert dpt.ALPHAS == RDPAccountant.DEFAULT_ALPHAS


@pytest.mark.parametrize("sigma, q, steps", [(1.0, 0.01, 1000), (1.1, 256 / 60000, 14_000), (0.7, 0.2, 50),
                                             (2.0, 1.0, 10), (4.0, 0.05, 3)])
def test_epsilon_of_known_sigma_q_and_steps_is_opacus_own(sigma: float, q: float, steps: int) -> None:
    ours = epsilon([local_round(sigma, q, steps)], DELTA)
    assert ours == pytest.approx(opacus_epsilon([(sigma, q, steps)], DELTA), rel=1e-9)
    assert ours > 0


def test_more_steps_or_less_noise_cost_more() -> None:
    base = epsilon([local_round(1.0, 0.05, 100)], DELTA)
    assert epsilon([local_round(1.0, 0.05, 200)], DELTA) > base
    assert epsilon([local_round(0.8, 0.05, 100)], DELTA) > base
    assert epsilon([local_round(1.0, 0.1, 100)], DELTA) > base
    assert epsilon([local_round(1.0, 0.05, 100)], 1e-7) > base  # a smaller delta: a larger epsilon


def test_round_increments_add_up_to_the_composed_total_and_beat_adding_rounds_up() -> None:
    rounds = [local_round(1.0, 0.1, 30), local_round(1.0, 0.1, 30), central_round(3.0), local_round(1.5, 0.2, 10)]
    history: list[DPRound] = []
    increments = []
    for new in rounds:
        cost = round_cost(history, new, DELTA)
        assert cost.epsilon > 0 and cost.total_before == pytest.approx(epsilon(history, DELTA))
        increments.append(cost.epsilon)
        history.append(new)
    total = opacus_epsilon([(r.noise_multiplier, r.sample_rate, r.steps) for r in rounds], DELTA)
    assert sum(increments) == pytest.approx(total, rel=1e-9)
    alone = sum(epsilon([r], DELTA) for r in rounds)
    assert sum(increments) < 0.8 * alone  # RDP composition: much less than basic composition
    assert increments[1] < increments[0]  # the same round costs less once composed with the first


def test_central_dp_is_accounted_with_sensitivity_twice_the_clip() -> None:
    r = central_round(2.0)
    assert (r.noise_multiplier, r.sample_rate, r.steps) == (1.0, 1.0, 1)
    assert epsilon([r], DELTA) == pytest.approx(opacus_epsilon([(1.0, 1.0, 1)], DELTA), rel=1e-9)
    assert epsilon([r], DELTA) > epsilon([DPRound(2.0, 1.0, 1)], DELTA)  # sigma itself would claim too little


def test_an_empty_history_costs_nothing_and_a_hopeless_round_is_refused() -> None:
    assert epsilon([], DELTA) == 0.0
    with pytest.raises(FedlabTrainingError, match="delta"):
        epsilon([local_round(1.0, 0.1, 1)], 0.0)


def test_planned_steps_and_sample_rate() -> None:
    assert dpt.sample_rate(32, 200) == pytest.approx(0.16) and dpt.sample_rate(64, 10) == 1.0
    assert dpt.planned_steps(200, 32, 2, None) == 14 and dpt.planned_steps(200, 32, 2, 5) == 5
    with pytest.raises(FedlabTrainingError, match="at least one training row"):
        dpt.sample_rate(32, 0)


# -- central clipping and noise ------------------------------------------------------------------
def test_clipping_bounds_the_norm_over_all_arrays_together() -> None:
    rng = np.random.default_rng(0)
    big = {"w": rng.normal(size=(20, 5)) * 10, "b": rng.normal(size=5) * 10}
    small = {"w": np.full((2, 2), 0.01), "b": np.zeros(2)}
    for update, clip in ((big, 1.0), (small, 1.0), (big, 0.3)):
        noise_rng = np.random.default_rng(1)
        noisy, norm = clip_and_noise(update, sigma=0.5, clip=clip, rng=np.random.default_rng(1))
        noise = {k: noise_rng.normal(0.0, 0.5 * clip, size=np.shape(v)) for k, v in update.items()}
        clipped = {k: noisy[k] - noise[k] for k in update}
        clipped_norm = math.sqrt(sum(float(np.sum(v ** 2)) for v in clipped.values()))
        assert norm == pytest.approx(math.sqrt(sum(float(np.sum(v ** 2)) for v in update.values())))
        assert clipped_norm == pytest.approx(min(norm, clip), rel=1e-9)
        factor = min(1.0, clip / norm)
        for k in update:  # the direction is kept: a scaled copy
            np.testing.assert_allclose(clipped[k], update[k] * factor, atol=1e-9)


def test_central_noise_is_gaussian_with_std_sigma_times_clip() -> None:
    sigma, clip = 0.8, 1.5
    zeros = {"w": np.zeros((100, 100)), "b": np.zeros(1000)}
    noisy, norm = clip_and_noise(zeros, sigma=sigma, clip=clip, rng=np.random.default_rng(12345))
    values = np.concatenate([v.ravel() for v in noisy.values()])
    assert norm == 0.0 and values.size == 11_000
    assert stats.kstest(values, "norm", args=(0.0, sigma * clip)).pvalue > 0.01
    # the test can tell: 10% more or less noise is rejected at this sample size
    assert stats.kstest(values, "norm", args=(0.0, 1.1 * sigma * clip)).pvalue < 1e-4
    assert stats.kstest(values, "norm", args=(0.0, 0.9 * sigma * clip)).pvalue < 1e-4


def test_clip_and_noise_keeps_dtypes_and_refuses_integers() -> None:
    noisy, _ = clip_and_noise({"w": np.ones(3, np.float32)}, sigma=1.0, clip=1.0, rng=np.random.default_rng(0))
    assert noisy["w"].dtype == np.float32
    with pytest.raises(FedlabTrainingError, match="floating-point"):
        clip_and_noise({"n": np.ones(3, np.int64)}, sigma=1.0, clip=1.0, rng=np.random.default_rng(0))


# -- dp_args -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dp_args, message", [
    ({"type": "gaussian", "sigma": 1.0, "clip": 1.0}, "type must be 'local' .* or 'central'"),
    ({"type": "local", "sigma": 0, "clip": 1.0}, "sigma must be a finite number > 0"),
    ({"type": "local", "sigma": 1.0, "clip": -1}, "clip must be a finite number > 0"),
    ({"type": "local", "sigma": "1", "clip": 1.0}, "sigma must be a number > 0"),
    ({"type": "local", "sigma": 1.0}, "dp_args needs 'clip'"),
    ({"type": "local", "sigma": 1.0, "clip": 1.0, "noise": 2}, "unknown dp_args key 'noise'; valid keys are type, "
                                                                "sigma, clip, delta"),
    ({"type": "local", "sigma": 1.0, "clip": 1.0, "delta": 1.0}, "delta must be above 0 and below 1"),
    ([1, 2], "dp_args must be a dict"),
])
def test_dp_args_errors_name_the_key_and_the_valid_values(dp_args: object, message: str) -> None:
    with pytest.raises(FedlabTrainingError, match=message):
        TrainingArgs.from_dict({"dp_args": dp_args})


def test_dp_args_are_normalised_and_exclude_exact_validation() -> None:
    args = TrainingArgs.from_dict({"dp_args": {"type": "central", "sigma": np.float32(2), "clip": 1}})
    assert args.dp_args == {"type": "central", "sigma": 2.0, "clip": 1.0}
    parsed = dpt.parse_dp_args(args.dp_args)
    assert parsed is not None and parsed.noise_std == 2.0 and dpt.mechanism(parsed) == "gaussian-update"
    assert dpt.default_delta(parsed, 1e-6) == pytest.approx(1e-7)
    with pytest.raises(FedlabTrainingError, match="test_on_global_updates cannot be used with dp_args"):
        TrainingArgs.from_dict({"dp_args": {"type": "local", "sigma": 1, "clip": 1}, "test_on_global_updates": True})


# -- the training loop ---------------------------------------------------------------------------
class Plan(TorchTrainingPlan):
    steps = 0

    def init_model(self, model_args):
        layers: list[nn.Module] = [nn.Linear(4, 1)]
        if model_args.get("batchnorm"):
            layers.insert(0, nn.BatchNorm1d(4))
        return nn.Sequential(*layers)

    def training_data(self, dataset):
        return dataset[list("abcd")].to_numpy("float32"), dataset["target"].to_numpy("float32")

    def training_step(self, data, target):
        type(self).steps += 1
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)


@pytest.fixture
def data() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 4)) * 3
    return pd.DataFrame(x, columns=list("abcd")).assign(target=(x[:, 0] > 0).astype(int))


def dp_round(data: pd.DataFrame, dp_args: dict, params: dict | None = None, **args: object):
    gates: list[int] = []
    events: list = []
    result = run_round(Plan, data, round=1, model_args=dict(args.pop("model_args", {})),  # type: ignore[arg-type]
                       training_args={"batch_size": 16, "optimizer_args": {"lr": 1.0}, "dp_args": dp_args, **args},
                       params=params, dp_gate=gates.append, progress=events.append)
    return result, gates, events


def norm_of(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))


def test_local_dp_asks_the_gate_first_and_takes_the_planned_steps_without_a_loss(data: pd.DataFrame) -> None:
    result, gates, events = dp_round(data, {"type": "local", "sigma": 1.0, "clip": 1.0}, epochs=2,
                                     progress_interval=0.0)
    assert gates == [120] and result.n_updates == 2 * math.ceil(120 / 16) and result.train_loss is None
    assert events and all(e.loss is None for e in events) and events[-1].iteration == result.n_updates


def test_a_refusing_gate_stops_the_round_before_any_row_is_used(data: pd.DataFrame) -> None:
    def refuse(n_train: int) -> None:
        raise FedlabBudgetError("epsilon_budget: no")

    for kind in ("local", "central"):
        Plan.steps = 0
        with pytest.raises(FedlabBudgetError, match="epsilon_budget"):
            run_round(Plan, data, round=1, model_args={}, params=None, dp_gate=refuse,
                      training_args={"dp_args": {"type": kind, "sigma": 1.0, "clip": 1.0}})
        assert Plan.steps == 0


def test_per_sample_clipping_bounds_a_full_batch_step(data: pd.DataFrame) -> None:
    params = initial_params(Plan, {})
    clip = 1e-3
    plain = run_round(Plan, data, round=1, model_args={}, params=params,
                      training_args={"batch_size": 120, "num_updates": 1, "optimizer_args": {"lr": 1.0}})
    private, _, _ = dp_round(data, {"type": "local", "sigma": 1e-9, "clip": clip}, params, batch_size=120,
                             num_updates=1)
    assert norm_of(plain.params, params) > 100 * clip  # without DP the step is large
    # q = 1: every row; each row's logistic-regression gradient (p - y) [x, 1], clipped to clip, averaged
    x = data[list("abcd")].to_numpy(np.float64)
    y = data["target"].to_numpy(np.float64)
    w, b = params["0.weight"].astype(np.float64)[0], float(params["0.bias"][0])
    residual = 1 / (1 + np.exp(-(x @ w + b))) - y
    grads = np.column_stack([residual[:, None] * x, residual])
    grads *= np.minimum(1.0, clip / (np.linalg.norm(grads, axis=1) + 1e-6))[:, None]
    step = -grads.mean(axis=0)
    np.testing.assert_allclose(private.params["0.weight"][0] - params["0.weight"][0], step[:4], atol=1e-7)
    np.testing.assert_allclose(private.params["0.bias"] - params["0.bias"], step[4:], atol=1e-7)
    assert norm_of(private.params, params) <= clip * (1 + 1e-4)


def test_local_dp_noise_is_not_drawn_from_the_researchers_seed(data: pd.DataFrame) -> None:
    params = initial_params(Plan, {})
    first, _, _ = dp_round(data, {"type": "local", "sigma": 1.0, "clip": 1.0}, params, seed=5)
    again, _, _ = dp_round(data, {"type": "local", "sigma": 1.0, "clip": 1.0}, params, seed=5)
    assert norm_of(first.params, again.params) > 1e-3


def test_small_batches_make_empty_poisson_samples_and_still_take_every_step(data: pd.DataFrame) -> None:
    small = data.iloc[:12]
    result, gates, _ = dp_round(small, {"type": "local", "sigma": 1.0, "clip": 1.0}, batch_size=1, epochs=3)
    assert gates == [12] and result.n_updates == 36  # q = 1/12: about a third of the batches are empty


def test_central_dp_clips_the_update_and_adds_noise_of_sigma_clip(data: pd.DataFrame) -> None:
    params = initial_params(Plan, {})
    plain = run_round(Plan, data, round=1, model_args={}, params=params,
                      training_args={"batch_size": 16, "optimizer_args": {"lr": 1.0}})
    clipped, gates, _ = dp_round(data, {"type": "central", "sigma": 1e-9, "clip": 0.01}, params)
    assert gates == [120] and norm_of(plain.params, params) > 1.0
    assert norm_of(clipped.params, params) == pytest.approx(0.01, rel=1e-4)
    noisy = [dp_round(data, {"type": "central", "sigma": 50.0, "clip": 0.01}, params)[0] for _ in range(40)]
    deltas = np.concatenate([np.concatenate([(r.params[k] - params[k]).ravel() for k in params]) for r in noisy])
    assert np.std(deltas) == pytest.approx(0.5, rel=0.15)  # std sigma * clip; the clipped part is tiny


def test_local_dp_refuses_batchnorm_and_central_dp_refuses_scaffold(data: pd.DataFrame) -> None:
    with pytest.raises(FedlabTrainingError, match="GroupNorm"):
        dp_round(data, {"type": "local", "sigma": 1.0, "clip": 1.0}, model_args={"batchnorm": True})
    with pytest.raises(FedlabTrainingError, match="Scaffold"):
        run_round(Plan, data, round=1, model_args={}, params=None, aggregator_args={"name": "scaffold"},
                  training_args={"dp_args": {"type": "central", "sigma": 1.0, "clip": 1.0}})


def test_local_dp_with_scaffold_returns_control_variates(data: pd.DataFrame) -> None:
    result = run_round(Plan, data, round=1, model_args={}, params=None, aggregator_args={"name": "scaffold"},
                       training_args={"optimizer_args": {"lr": 0.1}, "fedprox_mu": 0.1,
                                      "dp_args": {"type": "local", "sigma": 1.0, "clip": 1.0}})
    assert set(result.aux_vars["scaffold"]) == {"0.weight", "0.bias"}


# -- the node: require_dp, the check before a round, the spend after ------------------------------
LOGREG = '''
import torch.nn.functional as F
from torch import nn
from fedlab.training import TorchTrainingPlan


class LogReg(TorchTrainingPlan):
    def init_model(self, model_args):
        return nn.Linear(4, 1)

    def training_data(self, dataset):
        return dataset[list("abcd")].to_numpy("float32"), dataset["target"].to_numpy("float32")

    def training_step(self, data, target):
        return F.binary_cross_entropy_with_logits(self.model(data).squeeze(1), target)
'''


class Node:
    def __init__(self, tmp_path: Path, data: pd.DataFrame, *, require_dp: bool, budget: float = 10.0) -> None:
        from fedlab.node.config import init_node_dir
        from fedlab.node.dispatch import Dispatcher
        from fedlab.node.registry import DatasetRegistry
        from fedlab.privacy.dp_rules import DPRules

        self.config = init_node_dir(tmp_path / "node", "hospital")
        registry = DatasetRegistry(self.config.db_path)
        data.to_csv(tmp_path / "d.csv", index=False)
        self.dataset = registry.add("d", ["d"], "csv", tmp_path / "d.csv")
        self.rules = DPRules(require_dp=require_dp, epsilon_budget=budget, delta=1e-5)
        self.dispatcher = Dispatcher(self.config.node_id, "hospital", registry, node_dir=self.config.directory,
                                     require_approval=False, privacy=self.rules)

    def train(self, dp_args: dict | None, round_: int = 1, **kw: object):
        from fedlab.protocol import make_envelope
        from fedlab.training.messages import TrainRequest
        from fedlab.training.tensors import pack_named

        specs, buffers = pack_named({})  # no parameters: the node initialises the model
        args = {"batch_size": 16, "epochs": 1, **({"dp_args": dp_args} if dp_args else {})}
        request = TrainRequest(experiment_id="exp-1", round=round_, dataset_id=self.dataset.dataset_id,
                               plan_source=LOGREG, plan_class="LogReg", params=specs, training_args=args, **kw)
        return self.dispatcher.handle(make_envelope(request, "researcher", buffers=tuple(buffers))).content

    def spends(self) -> list[tuple[float, float, dict]]:
        with sqlite3.connect(self.config.db_path) as conn:
            rows = conn.execute("SELECT epsilon, delta, detail FROM dp_spends ORDER BY id").fetchall()
        return [(e, d, json.loads(detail)) for e, d, detail in rows]


@pytest.fixture
def nodes():
    made: list[Node] = []
    yield made
    for node in made:
        node.dispatcher.training.close()


def test_a_require_dp_node_refuses_plain_rounds_and_spends_what_dp_rounds_say(tmp_path: Path, data: pd.DataFrame,
                                                                            nodes: list[Node]) -> None:
    from fedlab.protocol import ErrorReply
    from fedlab.training.messages import TrainReply

    node = Node(tmp_path, data, require_dp=True)
    nodes.append(node)
    refused = node.train(None)
    assert isinstance(refused, ErrorReply) and refused.code == "disclosure_refused"
    assert refused.message.startswith("require_dp:") and "dp_args" in refused.message
    validation = node.train({"type": "local", "sigma": 1.0, "clip": 1.0}, do_training=False)
    assert isinstance(validation, ErrorReply) and validation.message.startswith("require_dp:")
    assert node.spends() == []

    replies = [node.train({"type": "local", "sigma": 1.0, "clip": 1.0}, round_=r) for r in (1, 2)]
    assert all(isinstance(r, TrainReply) and r.dp is not None for r in replies)
    first, second = (r.dp for r in replies)  # type: ignore[union-attr]
    assert first.mechanism == "dp-sgd" and first.noise == {"gradient": 1.0} and replies[0].train_loss is None
    assert first.delta == pytest.approx(1e-6) and second.delta == 0.0  # δ: a tenth of the budget, once
    spent = node.spends()
    assert [e for e, _, _ in spent] == pytest.approx([first.epsilon, second.epsilon])
    assert [d for _, d, _ in spent] == pytest.approx([1e-6, 0.0])
    q, steps = 16 / 120, math.ceil(120 / 16)
    assert spent[0][2]["sample_rate"] == pytest.approx(q) and spent[0][2]["steps"] == steps
    composed = opacus_epsilon([(1.0, q, steps), (1.0, q, steps)], 1e-6)
    assert first.epsilon + second.epsilon == pytest.approx(composed, rel=1e-9)
    assert second.epsilon < first.epsilon
    assert second.balance.epsilon_spent == pytest.approx(composed)
    assert second.balance.epsilon_remaining == pytest.approx(10.0 - composed)


def test_a_round_over_the_budget_is_refused_before_it_trains_and_spends_nothing(
        tmp_path: Path, data: pd.DataFrame, nodes: list[Node]) -> None:
    from fedlab.protocol import ErrorReply
    from fedlab.training.messages import TrainReply

    node = Node(tmp_path, data, require_dp=False, budget=1.0)
    nodes.append(node)
    central = node.train({"type": "central", "sigma": 20.0, "clip": 1.0})
    assert isinstance(central, TrainReply) and central.dp is not None and central.dp.mechanism == "gaussian-update"
    assert central.dp.noise == {"update": 20.0} and 0 < central.dp.epsilon < 1.0
    too_much = node.train({"type": "local", "sigma": 0.5, "clip": 1.0}, round_=2)
    assert isinstance(too_much, ErrorReply) and too_much.code == "budget_exhausted"
    assert too_much.message.startswith("epsilon_budget:") and "round 2 of experiment exp-1" in too_much.message
    assert len(node.spends()) == 1
    changed = node.train({"type": "local", "sigma": 5.0, "clip": 1.0, "delta": 1e-7}, round_=3)
    assert isinstance(changed, ErrorReply) and "accounted together at delta=1e-06" in changed.message


# -- the researcher's history --------------------------------------------------------------------
def test_history_shows_the_epsilon_of_each_round_and_refusals_with_the_nodes_reason() -> None:
    from fedlab.researcher.training_jobs import NodeRound
    from fedlab.researcher.training_tables import DP_COLUMNS, history_frame, history_row

    ok = NodeRound("a", "ok", n_samples=10, epsilon=0.5, delta=1e-6, epsilon_spent=1.5, epsilon_remaining=8.5)
    refused = NodeRound("b", "refused", reason="[budget_exhausted] epsilon_budget: only 0.1 remain",
                        code="budget_exhausted")
    frame = history_frame([history_row(1, "training", "a", "A", ok), history_row(1, "training", "b", "B", refused)])
    assert set(DP_COLUMNS) <= set(frame)
    assert frame.loc[0, ["epsilon", "epsilon_remaining"]].tolist() == [0.5, 8.5]
    assert frame.loc[1, "status"] == "refused" and "budget_exhausted" in frame.loc[1, "reason"]
    plain = history_frame([history_row(1, "training", "a", "A", NodeRound("a", "ok", n_samples=3))])
    assert not set(DP_COLUMNS) & set(plain)


def test_an_experiment_whose_every_node_refuses_ends_with_the_nodes_reasons() -> None:
    from fedlab import Experiment, FedlabNodeError, Researcher
    from fedlab.protocol import DatasetInfo, DatasetSearchReply, ErrorReply, make_envelope
    from fedlab.transport import InMemoryResearcherTransport

    def node(node_id: str, code: str, message: str):
        def answer(env):
            if env.msg_type == "dataset_search_request":
                info = DatasetInfo(dataset_id=f"ds-{node_id}", name="d", tags=["t"], data_type="csv", shape=[10, 5],
                                   columns=[*"abcd", "target"], dtypes={})
                return make_envelope(DatasetSearchReply(datasets=[info]), node_id, parent_id=env.msg_id)
            return make_envelope(ErrorReply(code=code, message=message, node=node_id), node_id, parent_id=env.msg_id)
        return answer

    transport = InMemoryResearcherTransport()
    transport.add_node("a", "site-a", node("a", "budget_exhausted", "epsilon_budget: only epsilon=0.01 remain"))
    transport.add_node("b", "site-b", node("b", "disclosure_refused", "require_dp: this node trains only with DP"))
    with Researcher(transport=transport, default_timeout=10) as researcher:
        exp = Experiment(researcher, ["t"], Plan, rounds=2, round_timeout=10,
                         training_args={"dp_args": {"type": "local", "sigma": 1.0, "clip": 1.0}})
        with pytest.raises(FedlabNodeError, match="every node refused round 1 under its privacy rules") as info:
            exp.run()
    assert info.value.errors["a"][0] == "budget_exhausted" and info.value.errors["b"][0] == "disclosure_refused"
    assert "site-a: refused ([budget_exhausted] epsilon_budget" in str(info.value)
    history = exp.history
    assert history["status"].tolist() == ["refused", "refused"] and exp.round_current == 0
    assert "require_dp:" in history.set_index("node_id").loc["b", "reason"]


def test_the_budget_check_messages_cross_the_worker_socket() -> None:
    import socket

    from fedlab.training.worker_wire import DPGo, DPPlanned, recv_message, send_message

    a, b = socket.socketpair()
    with a, b:
        for message in (DPPlanned(job_id="j", n_train=120), DPGo(job_id="j", go=True), DPGo(job_id="j")):
            send_message(a, message)
            assert recv_message(b) == (message, [])
