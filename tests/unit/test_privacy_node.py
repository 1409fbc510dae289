"""The node's privacy rules end to end on one node's handlers and a real SQLite file.

Each test plays an adversarial researcher with hand-made requests (the messages a real
researcher never sends), across several requests and derived datasets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from fedlab.analytics.disclosure_rules import DisclosureRules
from fedlab.analytics.messages import FAReply, FARequest
from fedlab.errors import FedlabDisclosureError
from fedlab.node.analytics_handler import AnalyticsHandler
from fedlab.node.config import init_node_dir
from fedlab.node.preproc_handler import PreprocHandler
from fedlab.node.registry import DatasetRegistry
from fedlab.preprocessing.messages import PreprocReply, PreprocRequest

N = 40


def cohort() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    return pd.DataFrame({
        "patient_id": [f"P{1000 + i}" for i in range(N)],
        "age": rng.integers(20, 80, N),
        "income": rng.normal(50_000, 10_000, N).round(2),
        "sex": [1, 1] + [0] * (N - 2),
        "dx": ["A"] * 15 + ["B"] * 12 + ["C"] * 9 + ["RARE"] + ["D"] * 3,
        "smoker": (["yes", "no"] * 20),
        "chol": list(rng.normal(200, 20, 9)) + [np.nan] * (N - 9),
    })


class Node:
    def __init__(self, root: Path, rules: DisclosureRules) -> None:
        self.root = root
        self.rules = rules
        config = init_node_dir(root / "node", "n")
        self.db = config.db_path
        cohort().to_csv(root / "cohort.csv", index=False)
        self.registry = DatasetRegistry(self.db)
        self.dataset = self.registry.add("cohort", ["c"], "csv", str(root / "cohort.csv")).dataset_id
        self.restart()

    def restart(self) -> None:
        """New handlers over the same node.db, as after a node restart."""
        self.analytics = AnalyticsHandler(self.registry, self.rules, node_id="n1")
        self.preproc = PreprocHandler(self.registry, self.rules, node_id="n1", node_dir=self.root / "node",
                                      analytics=self.analytics)

    def fa(self, dataset: str | None = None, **kw: Any) -> FAReply:
        return self.analytics(FARequest(dataset_id=dataset or self.dataset, **kw))

    def step(self, step: str, kind: str, args: dict[str, Any], state: str | None = None,
             dataset: str | None = None) -> PreprocReply:
        return self.preproc(PreprocRequest(dataset_id=dataset or self.dataset, preproc_type=kind, preproc_step=step,
                                           preproc_id="p", preproc_args=args, state_id=state))

    def derive(self, spec: dict[str, Any], name: str, dataset: str | None = None) -> str:
        state = self.step("set", spec["type"], {"transform": spec}, dataset=dataset).state_id
        reply = self.step("apply", spec["type"], {"name": name, "tags": ["d"]}, state, dataset=dataset)
        assert reply.derived is not None
        return reply.derived.dataset_id


@pytest.fixture
def node(tmp_path: Path) -> Node:
    return Node(tmp_path, DisclosureRules(excluded_columns=("patient_id",)))


def test_quantile_levels_are_bounded_by_the_count(node: Node) -> None:
    levels = [k / 39 for k in range(40)]
    reply = node.fa(stats=["quantiles"], columns=["age"], stats_args={"age": {"quantiles": {"levels": levels}}},
                    thresholds={"age": [50.0]})
    assert "age.quantiles" in reply.refused and "disclosure.min_count" in reply.refused["age.quantiles"]
    assert reply.numeric["age"].below is None


def test_threshold_state_survives_a_restart(node: Node) -> None:
    first = node.fa(stats=["quantiles"], columns=["income"], thresholds={"income": [50_000.0]})
    left = first.allowance["income"]
    assert left == node.rules.threshold_allowance - 1
    node.restart()
    again = node.fa(stats=["quantiles"], columns=["income"], thresholds={"income": [50_000.0, 60_000.0]})
    assert again.allowance["income"] == left - 1  # the first point was remembered, the second is new
    assert again.numeric["income"].below is not None and again.numeric["income"].below[0] is not None


def test_bisection_towards_one_income_runs_into_the_rules(node: Node) -> None:
    incomes = np.sort(cohort()["income"].to_numpy())
    answered: dict[float, int] = {}
    lo, hi = float(incomes[0]) - 1, float(incomes[-1]) + 1
    for _ in range(120):  # bisect towards the 21st value, as an attacker would, both sides
        mid = (lo + hi) / 2
        below = node.fa(stats=["quantiles"], columns=["income"], thresholds={"income": [mid]}).numeric["income"].below
        assert below is not None
        if below[0] is None:
            hi = mid  # a withheld answer: the attacker tries the other half next time
            lo = (lo + mid) / 2
            continue
        answered[mid] = below[0]
        lo, hi = (mid, hi) if below[0] <= 20 else (lo, mid)
    ranks = sorted(set(answered.values()))
    assert all(b - a >= node.rules.cell_threshold for a, b in zip(ranks, ranks[1:], strict=False))
    # nothing pins a value more finely than the grid
    resolution = node.fa(stats=["quantiles"], columns=["income"], thresholds={"income": [0.0]}).numeric[
        "income"].resolution
    assert resolution is not None and resolution >= 10.0


def test_value_counts_never_name_a_suppressed_level(node: Node) -> None:
    reply = node.fa(stats=["value_counts"], columns=["dx", "income", "patient_id"])
    assert reply.categorical["dx"].value_counts == {"A": 15, "B": 12, "C": 9}
    assert reply.categorical["dx"].suppressed_levels == 2
    assert "levels_density" in reply.refused["income.value_counts"]
    assert "patient_id" in reply.refused and "patient_id" not in reply.categorical


def test_crosstabs_hide_the_levels_the_value_counts_hide(node: Node) -> None:
    reply = node.fa(stats=["crosstab"], crosstab=["dx", "smoker"])
    assert reply.crosstab is not None
    assert set(reply.crosstab.cells) == {"A", "B", "C"}


@pytest.mark.parametrize("spec", [
    {"type": "onehot", "columns": ["patient_id"], "categories": {"patient_id": ["P1000"]},
     "other": {"patient_id": True}},
    {"type": "standardize", "columns": ["patient_id"], "mean": {"patient_id": 0}, "scale": {"patient_id": 1}},
    {"type": "impute", "columns": ["patient_id"], "values": {"patient_id": "x"}},
    {"type": "combat", "columns": ["patient_id", "age"], "alpha": {"patient_id": 0, "age": 0},
     "sigma": {"patient_id": 1, "age": 1}},
])
def test_specs_over_an_excluded_column_are_refused(node: Node, spec: dict[str, Any]) -> None:
    with pytest.raises(FedlabDisclosureError, match="excluded_columns"):
        node.step("set", spec["type"], {"transform": spec})


def test_onehot_folds_rare_levels_and_groups_refuse_the_covariance(node: Node) -> None:
    spec = {"type": "onehot", "columns": ["dx"], "categories": {"dx": ["A", "B", "C", "RARE", "D"]},
            "other": {"dx": False}}
    derived = node.derive(spec, "hot")
    reply = node.fa(derived, stats=["sum"], columns=["dx=RARE", "dx=D", "dx=<other>"])
    assert reply.numeric["dx=RARE"].sum == 0 and reply.numeric["dx=D"].sum == 0
    assert reply.numeric["dx=<other>"].sum == 4  # RARE and D together: what the value counts imply
    cov = node.fa(derived, stats=["cov"], columns=["dx=C", "age"])
    assert cov.covariance is None and "group_levels" in cov.refused["cov"]
    # and the names carry their source: the derived dataset's dx columns are dx for every rule
    assert node.fa(derived, stats=["value_counts"], columns=["dx=A"]).categorical["dx=A"].value_counts


def test_moments_of_a_binary_column_with_a_rare_level_are_refused(node: Node) -> None:
    assert "group_levels" in node.fa(stats=["mean"], columns=["sex"]).refused["sex"]


def test_imputed_values_do_not_count_for_min_count(node: Node) -> None:
    derived = node.derive({"type": "impute", "columns": ["chol"], "values": {"chol": -999.0}}, "imp")
    reply = node.fa(derived, stats=["count", "mean"], columns=["chol"], thresholds={"chol": [0.0]})
    assert "min_count" in reply.refused["chol"] and "chol" not in reply.numeric


def test_noisy_min_max_is_fixed_across_requests_and_derived_copies(tmp_path: Path) -> None:
    node = Node(tmp_path, DisclosureRules(min_max="noisy", excluded_columns=("patient_id",)))
    first = node.fa(stats=["min", "max"], columns=["age"]).numeric["age"]
    assert node.fa(stats=["min", "max", "mean"], columns=["age", "income"]).numeric["age"].min == first.min
    assert first.min is not None and first.min < cohort()["age"].min()
    for i, (mean, scale) in enumerate([(50.0, 10.0), (0.0, 2.5), (-3.0, 0.1)]):
        derived = node.derive({"type": "standardize", "columns": ["age"], "mean": {"age": mean},
                               "scale": {"age": scale}}, f"std{i}")
        copy = node.fa(derived, stats=["min"], columns=["age"]).numeric["age"]
        assert copy.min is not None
        assert copy.min * scale + mean == pytest.approx(first.min, rel=1e-12)


def test_negative_scales_are_refused(node: Node) -> None:
    with pytest.raises(FedlabDisclosureError, match="scale >= 0"):
        node.step("set", "standardize", {"transform": {"type": "standardize", "columns": ["age"],
                                                       "mean": {"age": 0}, "scale": {"age": -1}}})


def test_caps(node: Node) -> None:
    with pytest.raises(FedlabDisclosureError, match="max_thresholds"):
        node.fa(stats=["quantiles"], columns=["age"], thresholds={"age": [float(i) for i in range(2049)]})
    many = [f"x{i}" for i in range(101)]
    with pytest.raises(FedlabDisclosureError, match="max_onehot_categories"):
        node.step("set", "onehot", {"transform": {"type": "onehot", "columns": ["dx"], "categories": {"dx": many},
                                                  "other": {"dx": True}}})
    with pytest.raises(FedlabDisclosureError, match="levels_density"):
        node.step("set", "onehot", {"transform": {"type": "onehot", "columns": ["income"],
                                                  "categories": {"income": ["1"]}, "other": {"income": True}}})


def test_a_subset_singled_out_by_missingness_refuses_the_covariance(tmp_path: Path) -> None:
    node = Node(tmp_path, DisclosureRules(excluded_columns=("patient_id",)))
    frame = cohort()
    frame.loc[3, "income"] = np.nan  # one row without income: cov(age, income) would leave it out
    frame.to_csv(tmp_path / "cohort.csv", index=False)
    reply = node.fa(stats=["cov"], columns=["age", "income"])
    assert reply.covariance is None and "single out" in reply.refused["cov"]


def test_a_few_imputed_rows_cannot_be_singled_out_by_changing_the_imputed_value(tmp_path: Path) -> None:
    node = Node(tmp_path, DisclosureRules(excluded_columns=("patient_id",)))
    frame = cohort()
    frame.loc[3, "income"] = np.nan
    frame.to_csv(tmp_path / "cohort.csv", index=False)
    for value in (0.0, 1e6):  # two copies differing only in the imputed value
        derived = node.derive({"type": "impute", "columns": ["income"], "values": {"income": value}}, f"i{value}")
        reply = node.fa(derived, stats=["cov"], columns=["age", "income"])
        assert reply.covariance is None and "imputed rows" in reply.refused["cov"]


def test_shifted_copies_share_one_grid_and_one_set_of_cuts(node: Node) -> None:
    """A copy standardized with mean m moves its own grid point 0 to source value m: points are
    rounded in the source's units, so no copy can refine beyond the source's grid."""
    first = node.fa(stats=["quantiles"], columns=["income"], thresholds={"income": [50_000.0]}).numeric["income"]
    assert first.below is not None and first.resolution is not None
    step = first.resolution
    seen: set[int | None] = set()
    for k in range(8):
        shift = 50_000.0 + k * step / 8  # sub-grid shifts of the source point 50000
        derived = node.derive({"type": "standardize", "columns": ["income"], "mean": {"income": shift},
                               "scale": {"income": 1.0}}, f"shift{k}")
        reply = node.fa(derived, stats=["quantiles"], columns=["income"], thresholds={"income": [0.0]})
        below = reply.numeric["income"].below
        assert below is not None
        seen.add(below[0])
    assert seen <= {first.below[0]}  # each copy's point 0 is the source's grid point 50000


def test_a_copy_says_where_it_counted(node: Node) -> None:
    """On a derived copy the grid is the source's, mapped: the reply gives the points it counted at,
    so the researcher's bookkeeping is exact (the count is the copy's count at that point)."""
    derived = node.derive({"type": "standardize", "columns": ["income"], "mean": {"income": 50_000.37},
                           "scale": {"income": 9_999.3}}, "odd")
    part = node.fa(derived, stats=["quantiles"], columns=["income"], thresholds={"income": [0.0123]}).numeric["income"]
    assert part.below is not None and part.below_at is not None and part.below[0] is not None
    copy = (cohort()["income"] - 50_000.37) / 9_999.3
    assert part.below_at[0] != 0.0123
    assert part.below[0] == int((copy <= part.below_at[0] + 1e-12).sum())
