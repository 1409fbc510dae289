"""A column a site never measured: the node's "no values" answer, decided from its own root source,
and the researcher's sorting of the replies (who contributes to a fit, who does not, and the error
when nobody has values). Columns with 1..min_count-1 values stay refused exactly as before."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedlab.analytics.disclosure import DisclosureRules
from fedlab.analytics.messages import CategoricalPartial, FAReply, NumericPartial
from fedlab.errors import FedlabDisclosureError, FedlabError
from fedlab.node.config import init_node_dir
from fedlab.node.preproc_handler import PreprocHandler
from fedlab.node.preproc_state import PreprocStateStore
from fedlab.node.registry import DatasetRegistry
from fedlab.preprocessing.contributions import (
    NotContributing,
    categorical_partials,
    no_values_by_column,
    numeric_partials,
)
from fedlab.preprocessing.messages import PreprocReply, PreprocRequest
from fedlab.preprocessing.transforms import describe_spec
from fedlab.privacy.provenance import initial, no_measured_values, track

N = 30


def frame(n_chol: int = 0) -> pd.DataFrame:
    """30 patients; ``chol`` holds ``n_chol`` values (0: the site never measured it)."""
    chol = np.full(N, np.nan)
    chol[:n_chol] = 180.0 + np.arange(n_chol)
    return pd.DataFrame({"age": 30.0 + np.arange(N), "chol": chol, "ward": ["a", "b", "c"] * (N // 3),
                         "secret": np.full(N, np.nan)})


@pytest.fixture
def node(tmp_path):
    config = init_node_dir(tmp_path / "node", "node")
    registry = DatasetRegistry(config.db_path)

    def add(name, data):
        path = tmp_path / f"{name}.csv"
        data.to_csv(path, index=False)
        return registry.add(name, ["t"], "csv", path).dataset_id

    def handler(**rules):
        return PreprocHandler(registry, DisclosureRules(**{"excluded_columns": ["secret"], **rules}),
                              node_id=config.node_id, node_dir=config.directory)

    return config, add, handler


def request(dataset_id, step, args, *, state_id=None, preproc_type="standardize"):
    return PreprocRequest(dataset_id=dataset_id, preproc_type=preproc_type, preproc_step=step, preproc_id="p",
                          preproc_args=args, state_id=state_id)


def fit(h, ds, columns, stats=("count", "mean", "var"), state_id=None, **extra):
    return h(request(ds, "fit", {"columns": list(columns), "stats": list(stats), **extra}, state_id=state_id))


# --- the node ---------------------------------------------------------------------------------


def test_a_column_without_any_value_is_answered_no_values_and_the_others_as_usual(node):
    _, add, handler = node
    ds = add("d", frame(0))
    reply = fit(handler(), ds, ["age", "chol"])
    assert reply.no_values == ["chol"]
    assert reply.partials is not None
    assert "chol" not in reply.partials.numeric and "chol" not in reply.partials.refused
    assert reply.partials.numeric["age"].count == N and reply.partials.numeric["age"].mean == pytest.approx(44.5)


def test_a_request_for_the_empty_column_alone_answers_nothing_else(node):
    """An FARequest without columns means "every column": stripping the empty one must not turn the
    fit into one of every column."""
    _, add, handler = node
    ds = add("d", frame(0))
    for args in ({"columns": ["chol"], "stats": ["count", "mean"]},
                 {"columns": [], "stats": [], "stats_args": {"chol": {"count": {}, "quantiles": {"levels": [0.5]}}},
                  "thresholds": {"chol": [200.0]}}):
        reply = handler()(request(ds, "fit", args))
        assert reply.no_values == ["chol"]
        assert reply.partials == FAReply(dataset_id=ds, n_rows=N)


@pytest.mark.parametrize("n_chol", [1, 5, 9])
def test_a_column_with_fewer_than_min_count_values_is_still_refused(node, n_chol):
    _, add, handler = node
    ds = add("d", frame(n_chol))
    reply = fit(handler(), ds, ["age", "chol"])
    assert reply.no_values is None
    assert reply.partials is not None and "chol" not in reply.partials.numeric
    assert reply.partials.refused["chol"].startswith("min_count: ")
    assert reply.partials.numeric["age"].count == N


def test_excluded_columns_and_too_small_datasets_never_say_no_values(node):
    _, add, handler = node
    ds = add("d", frame(0))
    reply = fit(handler(), ds, ["secret", "chol"])
    assert reply.no_values == ["chol"]
    assert reply.partials is not None and "excluded" in reply.partials.refused["secret"]
    with pytest.raises(FedlabDisclosureError, match="min_count"):
        fit(handler(min_count=N + 1), ds, ["chol"])


def test_no_values_is_judged_on_the_roots_measured_values_not_on_imputed_ones(node):
    """A column the site never measured, imputed by the researcher: still "no values" (the imputed
    values are the researcher's own), and no statistic of the imputed values leaves the node."""
    _, add, handler = node
    ds = add("d", frame(0))
    h = handler()
    spec = {"type": "impute", "columns": ["chol"], "values": {"chol": -999.0}}
    state = h(request(ds, "set", {"transform": spec}, preproc_type="impute")).state_id
    reply = fit(h, ds, ["chol", "age"], state_id=state)
    assert reply.no_values == ["chol"]
    assert reply.partials is not None and "chol" not in reply.partials.numeric


def test_a_column_the_researchers_steps_made_empty_is_not_no_values(node, tmp_path):
    """Extreme scales overflow: a standardize by 1e-307 sends the values far from 35 to infinity and
    a min-max over +-1e308 then makes them NaN, so the rest would count the ages in an interval.
    The node refuses such a step when it is set; and a chain that makes a column empty anyway (here
    written straight into the state store) never makes the node say "no values": the column has
    measured values at the root, so it is refused by min_count."""
    config, add, handler = node
    ds = add("d", frame(0))
    h = handler()
    overflow = {"type": "standardize", "columns": ["age"], "mean": {"age": 35.0}, "scale": {"age": 1e-307}}
    with pytest.raises(FedlabDisclosureError, match="overflow"):
        h(request(ds, "set", {"transform": overflow}))
    nan_out = {"type": "minmax", "columns": ["age"], "min": {"age": -1e308}, "max": {"age": 1e308}}
    left = h.analytics.load(h.registry.get(ds), [overflow, nan_out]).frame["age"]
    assert left.notna().sum() == 13  # ages 30..42 are left: a count of an interval
    big = {"type": "standardize", "columns": ["age"], "mean": {"age": 0.0}, "scale": {"age": 1e-306}}
    state = h(request(ds, "set", {"transform": big})).state_id  # 3e307..5.9e307: large, still finite
    shift = {"type": "standardize", "columns": ["age"], "mean": {"age": -1.5e308}, "scale": {"age": 1.0}}
    with pytest.raises(FedlabDisclosureError, match="overflow"):  # finite + 1.5e308 overflows
        h(request(ds, "set", {"transform": shift}, state_id=state))
    everything = {"type": "standardize", "columns": ["age"], "mean": {"age": -1e308}, "scale": {"age": 1e-300}}
    forced = PreprocStateStore(config.db_path).new("p", ds, [everything, nan_out])
    assert h.analytics.load(h.registry.get(ds), [everything, nan_out]).frame["age"].isna().all()
    reply = fit(h, ds, ["age"], state_id=forced)
    assert reply.no_values is None
    assert reply.partials is not None and reply.partials.refused["age"].startswith("min_count: 0 non-missing")


def test_no_measured_values_follows_the_root_through_the_chain():
    source = frame(0)
    origins = initial(source)
    assert no_measured_values(origins["chol"], source) and not no_measured_values(origins["age"], source)
    onehot = {"type": "onehot", "columns": ["chol"], "categories": {"chol": ["1.0"]}, "other": {"chol": True}}
    tracked = track(origins, onehot)
    assert no_measured_values(tracked["chol=1.0"], source) and no_measured_values(tracked["chol=<other>"], source)
    measured = frame(1)
    assert not no_measured_values(initial(measured)["chol"], measured)
    # an origin without real rows whose source still holds a value (rows a step left out) is not empty
    cut = initial(measured)["chol"]
    gone = type(cut)(cut.sources, cut.kind, np.zeros(N, dtype=bool))
    assert not no_measured_values(gone, measured)


def test_set_records_the_nodes_own_no_values_in_its_lineage(node):
    config, add, handler = node
    ds = add("d", frame(0))
    h = handler()
    spec = {"type": "standardize", "columns": ["age", "chol"], "mean": {"age": 40.0, "chol": 200.0},
            "scale": {"age": 9.0, "chol": 30.0}, "no_values": ["age"]}  # the researcher's claim is not kept
    state = h(request(ds, "set", {"transform": spec})).state_id
    (kept,) = PreprocStateStore(config.db_path).get(state, ds)[2]
    assert kept["no_values"] == ["chol"]
    assert describe_spec(kept) == "standardize(age, chol; no values of chol here: fitted on the other sites)"
    measured = add("m", frame(12))
    state = h(request(measured, "set", {"transform": spec})).state_id
    (kept,) = PreprocStateStore(config.db_path).get(state, measured)[2]
    assert "no_values" not in kept and describe_spec(kept) == "standardize(age, chol)"
    applied = h(request(ds, "apply", {"name": "clean", "tags": ["c"]}, state_id=h(request(
        ds, "set", {"transform": spec})).state_id))
    assert applied.derived is not None and applied.derived.steps == [describe_spec({**spec, "no_values": ["chol"]})]


def test_combat_at_a_site_without_one_column_leaves_it_out_of_its_priors(node):
    config, add, handler = node
    data = frame(0)
    data["bmi"] = 20.0 + (np.arange(N) % 7) * 0.5
    data["sbp"] = 120.0 + (np.arange(N) % 11) * 2.0
    ds = add("d", data)
    spec = {"type": "combat", "columns": ["age", "bmi", "chol"], "alpha": {"age": 40.0, "bmi": 22.0, "chol": 200.0},
            "sigma": {"age": 6.0, "bmi": 1.5, "chol": 30.0}}
    state = handler()(request(ds, "set", {"transform": spec}, preproc_type="combat")).state_id
    (kept,) = PreprocStateStore(config.db_path).get(state, ds)[2]
    assert kept["no_values"] == ["chol"] and kept["gamma_star"]["chol"] == 0 and kept["delta_star"]["chol"] == 1
    from fedlab.preprocessing.combat import combat_local_params

    gamma, delta = combat_local_params(data, ["age", "bmi"], spec["alpha"], spec["sigma"])
    assert kept["gamma_star"]["age"] == pytest.approx(gamma["age"]) and kept["delta_star"]["bmi"] == pytest.approx(
        delta["bmi"])
    two = {**spec, "columns": ["age", "chol"]}
    with pytest.raises(FedlabError, match="at least 2 columns with values"):
        handler()(request(ds, "set", {"transform": two}, preproc_type="combat"))


# --- the researcher's sorting of the replies -----------------------------------------------------


def numeric(count: int, mean: float) -> NumericPartial:
    return NumericPartial(count=count, missing=0, sum=count * mean, mean=mean, m2=float(count))


def reply(numeric_parts=None, categorical_parts=None, no_values=None, refused=None) -> PreprocReply:
    partials = FAReply(dataset_id="d", n_rows=50, numeric=numeric_parts or {}, categorical=categorical_parts or {},
                       refused=refused or {})
    return PreprocReply(state_id="state-1", partials=partials, no_values=no_values)


def test_the_nodes_without_values_are_named_and_left_out_of_the_merge():
    replies = {
        "n1": reply({"chol": numeric(40, 200.0), "age": numeric(40, 50.0)}),
        "n2": reply({"chol": numeric(60, 210.0), "age": numeric(60, 52.0)}),
        # a node that says "no values" contributes nothing of that column, whatever it also sends
        "n3": reply({"chol": numeric(99, 999.0), "age": numeric(20, 40.0)}, no_values=["chol"]),
    }
    assert no_values_by_column(replies, ["chol", "age"], "standardize") == {"chol": ("n3",)}
    assert set(numeric_partials(replies, "chol")) == {"n1", "n2"}
    assert set(numeric_partials(replies, "age")) == {"n1", "n2", "n3"}
    cat = {"n1": reply(categorical_parts={"sex": CategoricalPartial(40, 0, {"f": 20, "m": 20})}),
           "n2": reply(no_values=["sex"])}
    assert set(categorical_partials(cat, "sex")) == {"n1"}


def test_a_column_no_node_has_values_of_is_a_clear_error():
    replies = {"n1": reply(no_values=["chol"]), "n2": reply(no_values=["chol", "ldl"]),
               "n3": reply({"ldl": numeric(30, 3.0)}, no_values=["chol"])}
    with pytest.raises(FedlabError, match=r"holds a value of it \(site-1, n2, n3 answered") as err:
        no_values_by_column(replies, ["ldl", "chol"], "impute", {"n1": "site-1"})
    assert "Leave 'chol' out of this step" in str(err.value) and 'strategy="constant"' in str(err.value)
    with pytest.raises(FedlabError, match="Leave 'chol' out of this step$"):
        no_values_by_column(replies, ["chol"], "standardize")
    assert no_values_by_column(replies, ["ldl"], "standardize") == {"ldl": ("n2",)}


def test_not_contributing_says_who_and_what_they_get():
    record = NotContributing(1, "impute", "chol", ("n3",))
    assert record.describe({"n3": "site-3"}) == ("step 2 (impute) of 'chol' was fitted without site-3, which holds "
                                                 "no value of it; every missing row there gets the imputed value")
    assert "takes the fitted step there like every site" in NotContributing(0, "standardize", "chol",
                                                                             ("n3",)).describe()
