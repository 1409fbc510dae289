"""Training vectors: encoded on the nodes, summed, decoded; the aggregators' secure path equals the plain one."""

from __future__ import annotations

import numpy as np
import pytest

from fedlab.errors import FedlabSecaggError
from fedlab.researcher.aggregators import FedAvg, Scaffold
from fedlab.secagg import train_vector


def _nodes(seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = {"w": (4, 3), "b": (3,), "steps": ()}
    out = []
    for n_samples in (120, 7, 300):
        params = {"w": rng.normal(size=shapes["w"]).astype(np.float32),
                  "b": rng.normal(scale=50, size=shapes["b"]).astype(np.float32),
                  "steps": np.asarray(n_samples * 3, dtype=np.int64)}
        delta = {"w": rng.normal(scale=1e-3, size=shapes["w"]).astype(np.float32),
                 "b": rng.normal(scale=1e-3, size=shapes["b"]).astype(np.float32)}
        out.append((params, {"scaffold": delta}, n_samples))
    return out


def _global():
    return {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32), "steps": np.asarray(0, np.int64)}


def _summed(nodes, fields, bound):
    total = np.zeros(train_vector.vector_length(fields), np.uint64)
    for params, aux, n in nodes:
        total += train_vector.encode(fields, params, aux, n, bound)
    return total


@pytest.mark.parametrize("cls", [FedAvg, Scaffold])
def test_the_secure_sum_gives_the_plain_aggregate(cls):
    nodes = _nodes()
    bound = 300
    plain, secure = cls(), cls()
    for agg in (plain, secure):
        agg.begin_round(_global())
    aux_sent = secure.node_args("x")[1]
    fields = train_vector.layout(_global(), aux_sent, len(nodes))
    for i, (params, aux, n) in enumerate(nodes):
        plain.add(f"n{i}", params, n, aux)
    sums = train_vector.decode(fields, _summed(nodes, fields, bound), bound)
    assert (sums.n_samples, sums.contributors, sums.clipped) == (427, 3, 0)
    secure.add_secure(sums, ["n0", "n1", "n2"])
    a, b = plain.end_round(3), secure.end_round(3)
    for name in a:
        assert a[name].dtype == b[name].dtype
        np.testing.assert_allclose(b[name], a[name], rtol=1e-7, atol=1e-9)
    if cls is Scaffold:
        for name in plain.c:
            np.testing.assert_allclose(secure.c[name], plain.c[name], rtol=0, atol=1e-12)


def test_values_past_the_clip_are_clipped_and_counted():
    params = {"w": np.array([1.0, 5000.0, -1e9, np.nan], np.float32)}
    fields = train_vector.layout(params, {}, 2, clip=4096.0)
    vector = train_vector.encode(fields, params, {}, 10, 10)
    sums = train_vector.decode(fields, vector, 10)
    assert sums.clipped == 3
    np.testing.assert_allclose(sums.array("", "w", (4,)), [1.0, 4096.0, -4096.0, 0.0])


def test_a_node_over_the_weight_bound_or_off_the_layout_is_refused():
    params = {"w": np.ones(3, np.float32)}
    fields = train_vector.layout(params, {}, 2)
    with pytest.raises(FedlabSecaggError, match="more than the round's weight bound"):
        train_vector.encode(fields, params, {}, 11, 10)
    with pytest.raises(FedlabSecaggError, match="expects parameter w with 3 values"):
        train_vector.encode(fields, {"w": np.ones(4, np.float32)}, {}, 5, 10)
    with pytest.raises(FedlabSecaggError, match="missing"):
        train_vector.encode(fields, {}, {}, 5, 10)


def test_a_node_with_no_samples_contributes_nothing():
    params = {"w": np.ones(3, np.float32)}
    fields = train_vector.layout(params, {}, 2)
    vector = train_vector.encode(fields, params, {}, 0, 10)
    assert not vector.any()


def test_a_reused_buffer_gives_the_same_vector():
    params = {"w": np.arange(6, dtype=np.float32)}
    fields = train_vector.layout(params, {}, 2)
    fresh = train_vector.encode(fields, params, {}, 5, 10)
    buffer = np.full(train_vector.vector_length(fields), 7, np.uint64)
    assert train_vector.encode(fields, params, {}, 5, 10, out=buffer) is buffer
    np.testing.assert_array_equal(buffer, fresh)
    assert not train_vector.encode(fields, params, {}, 0, 10, out=buffer).any()
