"""A training reply as one vector of the ring Z_(2**64), and the sum of such vectors back as arrays.

The researcher lays the vector out (``layout``): every parameter of the global model, then every aux
var (Scaffold's control variate updates), each a ``SecaggField``; then three exact integers: the
node's sample count, 1 for "this node contributed" and how many of its values were clipped. The
node fills it (``encode``) from its round's result; masks are added elsewhere. After unmasking,
``decode`` gives the sums FedAvg and Scaffold need: ``sum_k (n_k / W) x_k`` per parameter (the
weighted fields, ``W`` the round's ``weight_bound``), ``sum_k delta_k`` per aux var, ``sum_k n_k``,
the number of contributors and of clipped values.

Why ``n_k / W`` and not ``n_k``: the scale keeps every term within ``[-clip, clip]`` whatever the
sample counts, so the bits of the ring go to the fraction (``frac_bits``) instead of to the counts.
``W`` is public (the largest dataset size the nodes advertise), ``n_k`` stays secret.

Accuracy: each encoded value is within ``2**-(frac_bits + 1)`` of ``x * n_k / W`` (plus float64's
own rounding, relative ``2**-53``), so the weighted mean ``sum(...) * W / sum(n_k)`` is within
``n * 2**-(frac_bits + 1) * W / sum(n_k)`` of FedAvg's. With the default clip of 2**12 at 8 nodes,
``frac_bits`` is 47: about 3.6e-15 * W / sum(n_k) absolute, far below float32's resolution.

``ring_bits=32`` puts two float values in each 64-bit word (32-bit lanes, ``fixed_point.encode_into``):
a float32 model's vector is then as many bytes as the model, and each mask half as long. The step is
coarser: ``frac_bits = 30 - ceil(log2 n) - ceil(log2 clip)``, so it is meant with a clip near the
model's range (8 nodes, clip 8: 24 bits, ``n * 2**-25 * W / sum(n_k)``, about 2.4e-7 * W / sum(n_k)
absolute). Integer buffers keep a whole word each (their clip is 2**40).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedlab.errors import FedlabSecaggError
from fedlab.protocol.secagg_messages import SecaggField
from fedlab.secagg.fixed_point import decode_int, decode_sum, encode_int, encode_into, frac_bits_for, words_for

__all__ = ["DEFAULT_CLIP", "RING_BITS", "TAIL", "TrainingSums", "bound", "decode", "encode", "layout",
           "vector_length"]

#: |x| of a parameter or aux var above which it is clipped (and counted): 4096 covers any trained
#: network's weights; integer buffers (batch counts) get 2**40.
DEFAULT_CLIP = 2.0**12
INT_CLIP = 2.0**40
TAIL = 3  # n_samples, contributed, clipped
RING_BITS = (64, 32)  # a value per 64-bit word, or a value per 32-bit lane (two per word)


def _clip_for(dtype: np.dtype, clip: float | None) -> float:
    if np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.bool_):
        return INT_CLIP
    return DEFAULT_CLIP if clip is None else float(clip)


def _field(group: str, name: str, value: np.ndarray, weighted: bool, n_nodes: int, clip: float | None,
           ring_bits: int) -> SecaggField:
    c = _clip_for(value.dtype, clip)
    lanes = 2 if ring_bits == 32 and c != INT_CLIP else 1
    return SecaggField(group=group, name=name, size=int(value.size), weighted=weighted, clip=c,
                       frac_bits=frac_bits_for(n_nodes, c, lanes), lanes=lanes)


def layout(params: Mapping[str, np.ndarray], aux: Mapping[str, Mapping[str, np.ndarray]], n_nodes: int,
           *, clip: float | None = None, ring_bits: int = 64) -> list[SecaggField]:
    """The fields of a round: ``params`` (the global model, weighted) then each aux group (unweighted);
    with ``ring_bits=32`` the float ones in 32-bit lanes."""
    if ring_bits not in RING_BITS or isinstance(ring_bits, bool):
        raise FedlabSecaggError(f"secure aggregation sums in 64-bit words or 32-bit lanes: ring_bits is 64 or 32, "
                                f"not {ring_bits!r}")
    fields = [_field("", name, value, True, n_nodes, clip, ring_bits) for name, value in params.items()]
    for group, arrays in aux.items():
        fields += [_field(group, name, value, False, n_nodes, clip, ring_bits) for name, value in arrays.items()]
    return fields


def vector_length(fields: list[SecaggField]) -> int:
    """The vector's length in uint64 words."""
    return sum(words_for(f.size, f.lanes) for f in fields) + TAIL


def bound(fields: list[SecaggField], n_nodes: int) -> float:
    """The largest absolute error of the sum of a float value over the nodes (``sum_k (n_k / W) x_k``
    for a parameter: times ``W / sum(n_k)`` for the weighted mean): ``n_nodes * 2**-(frac_bits + 1)``
    of the coarsest float field. Integer buffers (clip 2**40, 62 - ceil(log2 n) - 40 fraction bits) are
    left out: their mean is rounded to an integer anyway."""
    return max((n_nodes * math.ldexp(1.0, -(f.frac_bits + 1)) for f in fields if f.clip != INT_CLIP), default=0.0)


def encode(fields: list[SecaggField], params: Mapping[str, np.ndarray],
           aux: Mapping[str, Mapping[str, np.ndarray]], n_samples: int, weight_bound: int,
           out: np.ndarray | None = None) -> np.ndarray:
    """The node's vector, in ``out`` if given (a uint64 array of the layout's length, reused from round to
    round: fresh memory of a model's size costs more than encoding into it) or a new array. A node that
    trained on no sample contributes zeros (and 0 as "contributed"), as in plain FedAvg where it is left
    out of the mean."""
    if n_samples > weight_bound:
        raise FedlabSecaggError(
            f"this node trained on {n_samples} samples, more than the round's weight bound {weight_bound} (the "
            "largest dataset the nodes advertised when the experiment searched them); run the search again "
            "(a new Experiment) so the bound is current")
    length = vector_length(fields)
    reuse = out is not None and out.shape == (length,) and out.dtype == np.uint64
    vector = out if out is not None and reuse else np.empty(length, np.uint64)
    if n_samples <= 0:
        vector.fill(0)
    scale = n_samples / weight_bound if weight_bound else 0.0
    clipped = 0
    offset = 0
    for f in fields:
        source = params if f.group == "" else aux.get(f.group)
        value = None if source is None else source.get(f.name)
        if value is None or int(np.size(value)) != f.size:
            got = "missing" if value is None else f"{np.size(value)} values"
            raise FedlabSecaggError(
                f"the round's secure aggregation layout expects {f.group or 'parameter'} {f.name} with {f.size} "
                f"values; this node's result has it {got}. Every node must run the same plan with the same model_args")
        if n_samples > 0:
            words = words_for(f.size, f.lanes)
            clipped += encode_into(vector[offset:offset + words], np.asarray(value),
                                   scale=scale if f.weighted else 1.0, clip=f.clip, frac_bits=f.frac_bits,
                                   lanes=f.lanes)
        offset += words_for(f.size, f.lanes)
    contributed = 1 if n_samples > 0 else 0
    vector[offset:] = [encode_int(n_samples), encode_int(contributed), encode_int(clipped)]
    return vector


@dataclass
class TrainingSums:
    """The unmasked sum of a round: what FedAvg and Scaffold need, and nothing per node.

    The arrays are decoded on demand, straight into the caller's float64 memory (``decode_into``):
    the aggregator's running sums, with no model-sized temporary."""

    fields: list[SecaggField]
    total: np.ndarray  # the unmasked uint64 sum
    offsets: dict[tuple[str, str], int]
    n_samples: int
    contributors: int
    clipped: int
    weight_bound: int

    def names(self, group: str = "") -> list[str]:
        return [f.name for f in self.fields if f.group == group]

    def decode_into(self, group: str, name: str, out: np.ndarray, *, weight: float = 1.0) -> None:
        """``weight`` times the sum of ``name`` of ``group`` ("" for the parameters: sum_k (n_k / W) x_k;
        an aux group: sum_k x_k), written into the float64 array ``out`` (any shape of the same size)."""
        f = next(f for f in self.fields if (f.group, f.name) == (group, name))
        start = self.offsets[(group, name)]
        decode_sum(self.total[start:start + words_for(f.size, f.lanes)], f.frac_bits, out, lanes=f.lanes,
                   size=f.size, weight=weight)

    def array(self, group: str, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A new float64 array of the sum (for tests and custom aggregators)."""
        out = np.empty(shape, np.float64)
        self.decode_into(group, name, out)
        return out


def decode(fields: list[SecaggField], total: np.ndarray, weight_bound: int) -> TrainingSums:
    """The sums in ``total`` (the unmasked uint64 sum), decoded when asked (``TrainingSums.decode_into``)."""
    if total.size != vector_length(fields):
        raise FedlabSecaggError(f"the unmasked sum has {total.size} values, the layout {vector_length(fields)}")
    offsets = {}
    offset = 0
    for f in fields:
        offsets[(f.group, f.name)] = offset
        offset += words_for(f.size, f.lanes)
    n_samples, contributors, clipped = (decode_int(int(v)) for v in total[offset:offset + TAIL])
    return TrainingSums(list(fields), total, offsets, n_samples, contributors, clipped, weight_bound)
