"""Two 32-bit lanes per 64-bit word (``ring_bits=32``), and masks added chunk by chunk in one pass."""

from __future__ import annotations

import math
import secrets

import msgspec
import numpy as np
import pytest

from fedlab.errors import FedlabError, FedlabSecaggError
from fedlab.protocol.secagg_messages import SecaggField
from fedlab.researcher.aggregators import FedAvg, Scaffold
from fedlab.researcher.secure_round import check_secagg_arguments
from fedlab.secagg import fixed_point, prg, train_vector
from fedlab.secagg.fixed_point import decode_sum, encode_into, frac_bits_for, words_for


def _masked_sum(vectors: list[np.ndarray]) -> np.ndarray:
    """The sum of ``vectors`` each masked with pairwise masks that cancel (and nothing else)."""
    n = len(vectors)
    seeds = {(i, j): secrets.token_bytes(32) for i in range(n) for j in range(i + 1, n)}
    total = np.zeros_like(vectors[0])
    for i, v in enumerate(vectors):
        masked = v.copy()
        masks = [(seed, 1 if i == a else -1) for (a, b), seed in seeds.items() if i in (a, b)]
        prg.add_masks(masked, masks)
        assert not np.array_equal(masked, v)
        total += masked
    return total


def test_frac_bits_in_a_lane() -> None:
    assert frac_bits_for(8, 8.0, 2) == 30 - 3 - 3
    assert frac_bits_for(1, 0.5, 2) == 30  # at most 30
    assert frac_bits_for(8, 8.0, 1) == 62 - 3 - 3
    with pytest.raises(FedlabSecaggError, match="ring_bits=64"):
        frac_bits_for(8, 4096.0, 2)  # 15 bits left in 32
    with pytest.raises(FedlabSecaggError, match="1 value or 2 values"):
        frac_bits_for(8, 8.0, 3)
    assert (words_for(7, 2), words_for(8, 2), words_for(7, 1), words_for(0, 2)) == (4, 4, 7, 0)


@pytest.mark.parametrize("size", [1, 2, 7, 1000, 3 * (1 << 16) + 5])
def test_masked_lanes_sum_to_the_plain_sum_within_the_step(size: int) -> None:
    rng = np.random.default_rng(size)
    n, clip = 5, 4.0
    bits = frac_bits_for(n, clip, 2)
    values = [rng.uniform(-clip, clip, size=size).astype(np.float32) for _ in range(n)]
    vectors = []
    for v in values:
        out = np.empty(words_for(size, 2), np.uint64)
        assert encode_into(out, v, scale=1.0, clip=clip, frac_bits=bits, lanes=2) == 0
        vectors.append(out)
    got = decode_sum(_masked_sum(vectors), bits, lanes=2, size=size)
    exact = np.sum([v.astype(np.float64) for v in values], axis=0)
    assert got.shape == (size,)
    assert np.max(np.abs(got - exact)) <= n * math.ldexp(1.0, -(bits + 1))
    assert np.max(np.abs(got - exact)) > 0 or size < 10  # the step is real: 32 bits are coarser than float32


def test_lanes_hold_sums_at_the_clip_of_either_sign() -> None:
    """Every node at +clip or -clip in both lanes, every mix of signs: the largest sums still separate."""
    n, clip = 8, 8.0
    bits = frac_bits_for(n, clip, 2)
    for low in (clip, -clip):
        for high in (clip, -clip, 0.0):
            pair = np.array([low, high], np.float64)
            words = []
            for _ in range(n):
                out = np.empty(1, np.uint64)
                encode_into(out, pair, scale=1.0, clip=clip, frac_bits=bits, lanes=2)
                words.append(out)
            total = np.sum(words, axis=0, dtype=np.uint64)
            np.testing.assert_array_equal(decode_sum(total, bits, lanes=2), n * pair)


def test_lane_decoding_writes_into_the_callers_memory_in_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fixed_point, "_CHUNK", 6)
    values = np.arange(-13, 14, dtype=np.float64).reshape(3, 9) / 4
    out = np.empty(words_for(values.size, 2), np.uint64)
    encode_into(out, values, scale=2.0, clip=16.0, frac_bits=20, lanes=2)
    dest = np.full((3, 9), np.nan)
    decode_sum(out, 20, dest, lanes=2, size=values.size, weight=0.5)
    np.testing.assert_array_equal(dest, values)
    with pytest.raises(FedlabSecaggError, match="C-contiguous float64"):
        decode_sum(out, 20, np.empty((9, 3)).T, lanes=2, size=values.size)


def test_lane_encoding_clips_counts_and_refuses_what_does_not_fit() -> None:
    out = np.empty(2, np.uint64)
    clipped = encode_into(out, np.array([100.0, -1.0, np.nan, 0.5]), scale=1.0, clip=2.0, frac_bits=20, lanes=2)
    assert clipped == 2
    np.testing.assert_array_equal(decode_sum(out, 20, lanes=2), [2.0, -1.0, 0.0, 0.5])
    with pytest.raises(FedlabSecaggError, match="in 32 bits"):
        encode_into(out, np.zeros(4), scale=1.0, clip=2.0, frac_bits=30, lanes=2)
    with pytest.raises(FedlabSecaggError, match="slot of 2 words"):
        encode_into(out, np.zeros(5), scale=1.0, clip=2.0, frac_bits=20, lanes=2)


def _nodes():
    rng = np.random.default_rng(3)
    out = []
    for n_samples in (120, 7, 300):
        params = {"w": rng.normal(scale=0.5, size=(5, 3)).astype(np.float32),
                  "b": rng.normal(size=3).astype(np.float32),
                  "steps": np.asarray(n_samples * 3, dtype=np.int64)}
        delta = {"w": rng.normal(scale=1e-2, size=(5, 3)).astype(np.float32),
                 "b": rng.normal(scale=1e-2, size=3).astype(np.float32)}
        out.append((params, {"scaffold": delta}, n_samples))
    return out


def _global():
    return {"w": np.zeros((5, 3), np.float32), "b": np.zeros(3, np.float32), "steps": np.asarray(0, np.int64)}


def test_a_32_bit_layout_takes_half_the_words_except_for_integers() -> None:
    g = _global()
    wide = train_vector.layout(g, {}, 3, clip=8.0)
    narrow = train_vector.layout(g, {}, 3, clip=8.0, ring_bits=32)
    assert [f.lanes for f in wide] == [1, 1, 1]
    assert [(f.name, f.lanes, f.frac_bits) for f in narrow] == [("w", 2, 30 - 2 - 3), ("b", 2, 25), ("steps", 1, 20)]
    assert train_vector.vector_length(wide) == 15 + 3 + 1 + train_vector.TAIL
    assert train_vector.vector_length(narrow) == 8 + 2 + 1 + train_vector.TAIL
    assert train_vector.bound(narrow, 3) == 3 * 2.0**-26  # float fields only (the integer one has 20 bits)
    assert train_vector.bound(wide, 3) == 3 * 2.0**-58
    with pytest.raises(FedlabSecaggError, match="64 or 32"):
        train_vector.layout(g, {}, 3, ring_bits=16)


@pytest.mark.parametrize("cls", [FedAvg, Scaffold])
def test_the_32_bit_secure_sum_gives_the_plain_aggregate_within_its_bound(cls) -> None:
    nodes, bound_w = _nodes(), 300
    plain, secure = cls(), cls()
    for agg in (plain, secure):
        agg.begin_round(_global())
    fields = train_vector.layout(_global(), secure.node_args("x")[1], len(nodes), clip=8.0, ring_bits=32)
    vectors = [train_vector.encode(fields, p, a, n, bound_w) for p, a, n in nodes]
    for i, (params, aux, n) in enumerate(nodes):
        plain.add(f"n{i}", params, n, aux)
    sums = train_vector.decode(fields, _masked_sum(vectors), bound_w)
    assert (sums.n_samples, sums.contributors, sums.clipped) == (427, 3, 0)
    secure.add_secure(sums, ["n0", "n1", "n2"])
    a, b = plain.end_round(3), secure.end_round(3)
    # the weighted mean's error: n * 2**-(frac_bits + 1) * W / sum(n_k), plus float32's rounding of the result
    tolerance = train_vector.bound([f for f in fields if f.weighted and f.lanes == 2], 3) * bound_w / 427
    for name in ("w", "b"):
        np.testing.assert_allclose(b[name], a[name], rtol=2.0**-23, atol=tolerance)
    assert b["steps"] == a["steps"]
    if cls is Scaffold:
        step = train_vector.bound([f for f in fields if f.group == "scaffold"], 3)
        for name in plain.c:
            np.testing.assert_allclose(secure.c[name], plain.c[name], rtol=0, atol=step)


def test_lanes_are_sent_only_when_there_are_two() -> None:
    """An older node knows no ``lanes``: 64-bit fields reach it as before, a 32-bit one is refused by its
    decoder (an unknown field) instead of being answered in the wrong layout."""

    class OlderField(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
        group: str
        name: str
        size: int
        weighted: bool
        clip: float
        frac_bits: int

    wide = SecaggField(group="", name="w", size=3, weighted=True, clip=8.0, frac_bits=50)
    assert b"lanes" not in msgspec.msgpack.encode(wide)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(wide), type=OlderField).frac_bits == 50
    narrow = SecaggField(group="", name="w", size=3, weighted=True, clip=8.0, frac_bits=20, lanes=2)
    with pytest.raises(msgspec.ValidationError, match="unknown field `lanes`"):
        msgspec.msgpack.decode(msgspec.msgpack.encode(narrow), type=OlderField)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(narrow), type=SecaggField) == narrow


def test_ring_bits_argument() -> None:
    assert check_secagg_arguments({"ring_bits": 32, "clip": 8.0})["ring_bits"] == 32
    with pytest.raises(FedlabError, match="64 .the default. or 32"):
        check_secagg_arguments({"ring_bits": 16})
    with pytest.raises(FedlabError, match="needs secagg_arguments\\['clip'\\]"):
        check_secagg_arguments({"ring_bits": 32})


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_all_masks_in_one_pass_equal_the_masks_one_by_one(workers: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prg, "CHUNK_BYTES", 64)  # 8 words a chunk: many chunks, a short last one
    monkeypatch.setattr(prg, "_ZEROS", bytes(64))
    masks = [(secrets.token_bytes(32), 1), (secrets.token_bytes(32), -1), (secrets.token_bytes(32), 1)]
    start = np.arange(203, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    one_by_one = start.copy()
    for seed, sign in masks:
        stream = prg.mask_stream(seed, start.size)
        one_by_one = one_by_one + stream if sign == 1 else one_by_one - stream
    together = start.copy()
    prg.add_masks(together, masks, workers=workers)
    np.testing.assert_array_equal(together, one_by_one)
    with pytest.raises(FedlabSecaggError, match="sign"):
        prg.add_masks(together, [(masks[0][0], 2)])
