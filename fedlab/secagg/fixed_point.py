"""Numbers as elements of the ring Z_(2**64), so that masked vectors sum by plain uint64 addition.

Masks are uniform in Z_(2**64) and cancel only modulo 2**64, so whatever a node sums must be an
integer there, and the true sum must not wrap. Two encodings:

**Training vectors** (:func:`encode_into`, :func:`decode_sum`): a value ``x`` becomes the int64
``round(clip(x * scale, -clip, clip) * 2**frac_bits)``, stored as its two's complement uint64.
:func:`frac_bits_for` gives as many fraction bits as the ring allows while a sum of ``n_nodes``
such values stays below 2**62 in magnitude (one bit of margin under int64's 2**63). Error bound:
each encoded value is within ``2**-(frac_bits + 1)`` of ``x * scale`` (plus float64's rounding
of ``x * scale``, relative 2**-53; the scaling by 2**frac_bits itself is exact), so a sum of
``n`` values is within ``n * 2**-(frac_bits + 1)`` of the exact sum of the ``x * scale``
(``decode_sum``'s conversion to float64 adds a relative 2**-53). Values beyond ``clip`` are
clipped and counted, so that a node can report how much it changed its answer.

**Two 32-bit lanes per word** (``lanes=2``): the same encoding in ``Z_(2**32)`` with
``30 - ceil(log2(n_nodes)) - ceil(log2(clip))`` fraction bits, two values in one 64-bit word as
``low + high * 2**32`` (both signed). The word is still masked and summed as one element of
``Z_(2**64)`` (the masks are uniform there, so the masked word hides both lanes); because each
lane's true sum stays below 2**31 in magnitude, the sum of the words separates back into the two
lane sums exactly. Half the words: half the bytes on the wire and half the mask stream, for a
coarser step (``2**-(frac_bits + 1)`` per value, as above, with the smaller ``frac_bits``).

**Exact analytics values** (:func:`encode_exact`, :func:`decode_exact_sum`): counts and sums that
must come back exactly, as in the clear. A value becomes the integer ``V = round(v * 2**frac_bits)``,
computed exactly with Python integers, written in two's complement over ``32 * limbs`` bits and
split into 32-bit limbs, each in its own uint64 slot. A limb is below 2**32, so a sum over up to
2**32 nodes never carries out of its slot; the carries are propagated only after unmasking, with
Python integers. ``|V| < 2**(32 * limbs - 40)`` keeps the sum of 2**32 of them inside the signed
range. Integers come back exact; floats as the exact sum of their binary values, each rounded
to a multiple of 2**-frac_bits (with the default 64 fraction bits, exact for any float64 of
magnitude at least 2**-12; the default 8 limbs hold |v| < 2**152).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from fedlab.errors import FedlabSecaggError

__all__ = [
    "LANES",
    "MIN_FRAC_BITS",
    "decode_exact_sum",
    "decode_int",
    "decode_sum",
    "encode_exact",
    "encode_int",
    "encode_into",
    "frac_bits_for",
    "words_for",
]

MIN_FRAC_BITS = 16  # below this a training value would lose more than 2**-17 absolute
MAX_FRAC_BITS = 62  # the most a value of magnitude >= 1 may take in int64 (and what the wire accepts)
LANE_MAX_FRAC_BITS = 30  # the same in a 32-bit lane
LANES = (1, 2)  # values per 64-bit word: one (Z_(2**64)) or two 32-bit lanes (Z_(2**32) each)
_CHUNK = 1 << 16  # values per chunk: 512 KiB of float64 scratch, which stays in the cache
_RING = 1 << 64
_HALF = 1 << 63
_LIMB_BITS = 32
_HEADROOM_BITS = 40  # 32 bits for the number of nodes, 8 of margin
_LOW_SIGN = np.uint64(1 << 31)


def _check_lanes(lanes: int) -> int:
    if lanes not in LANES or isinstance(lanes, bool):
        raise FedlabSecaggError(f"a 64-bit word holds 1 value or 2 values of 32 bits, not {lanes!r}")
    return lanes


def words_for(size: int, lanes: int = 1) -> int:
    """How many 64-bit words ``size`` values take with ``lanes`` values per word."""
    return -(-size // _check_lanes(lanes))


def frac_bits_for(n_nodes: int, clip: float, lanes: int = 1) -> int:
    """Fraction bits for sums of ``n_nodes`` values clipped to ``[-clip, clip]``:
    ``62 - ceil(log2(n_nodes)) - ceil(log2(clip))`` in a 64-bit word, at most 62; ``30 - ...`` in a
    32-bit lane (``lanes=2``), at most 30."""
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
        raise FedlabSecaggError(f"secure aggregation sums over at least one node, not {n_nodes!r}")
    if not (isinstance(clip, int | float) and math.isfinite(clip) and clip > 0):
        raise FedlabSecaggError(f"the clip range of secure aggregation is a positive finite number, not {clip!r}")
    top = LANE_MAX_FRAC_BITS if _check_lanes(lanes) == 2 else MAX_FRAC_BITS
    width = 32 if lanes == 2 else 64
    bits = top - math.ceil(math.log2(n_nodes)) - math.ceil(math.log2(clip))
    if bits < MIN_FRAC_BITS:
        hint = " (or 64-bit words: ring_bits=64)" if lanes == 2 else " (or fewer nodes)"
        raise FedlabSecaggError(
            f"secure aggregation of {n_nodes} nodes with values clipped to +-{clip:g} leaves {bits} fraction bits "
            f"in {width}, fewer than {MIN_FRAC_BITS}: the clip range or the node count is too large; use a smaller "
            f"clip{hint}")
    return min(bits, top)


def encode_into(out: np.ndarray, values: np.ndarray, *, scale: float, clip: float, frac_bits: int,
                lanes: int = 1) -> int:
    """Write the fixed-point encoding of ``values * scale`` (read flat) into the uint64 ``out``.

    With ``lanes=2`` two values share a word (:func:`words_for`): value ``2i`` in the low 32 bits of
    word ``i``, value ``2i + 1`` in the high ones, the word being ``low + high * 2**32`` modulo
    2**64 with both lanes signed, so that a sum of words is the sum of the lows plus 2**32 times
    the sum of the highs (:func:`decode_sum` separates them). An odd last value leaves a zero lane.

    Returns how many values were clipped: beyond ``[-clip, clip]`` after scaling, infinite, or
    NaN (which is written as 0). Works in chunks that stay in the cache: the extra memory is a
    few chunks, whatever the size of ``values``."""
    values = np.asarray(values)
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)
            or values.dtype == np.bool_):
        raise FedlabSecaggError(
            f"secure aggregation encodes real numbers; got an array of {values.dtype} (convert it to float first)")
    if not isinstance(out, np.ndarray) or out.dtype != np.uint64 or out.ndim != 1 or not out.flags.writeable:
        raise FedlabSecaggError("secure aggregation encodes into a writeable 1-D uint64 array")
    _check_lanes(lanes)
    if out.size != words_for(values.size, lanes):
        raise FedlabSecaggError(
            f"{values.size} values do not fit a slot of {out.size} words in the secure aggregation vector")
    if not (math.isfinite(clip) and clip > 0 and math.isfinite(scale)):
        raise FedlabSecaggError(
            f"secure aggregation needs a positive finite clip and a finite scale, not {clip} and {scale}")
    width, top = (32, 2.0**30) if lanes == 2 else (64, 2.0**62)
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or math.ldexp(clip, frac_bits) > top:
        raise FedlabSecaggError(
            f"{frac_bits!r} fraction bits do not fit values clipped to +-{clip:g} in {width} bits; use frac_bits_for")
    if lanes == 2 and not out.flags.c_contiguous:
        raise FedlabSecaggError("two lanes per word are written into a C-contiguous slot")
    unit = math.ldexp(1.0, frac_bits)
    bound = math.ldexp(clip, frac_bits)  # the clip range in units: exact (a power-of-two multiple)
    factor = scale * unit
    size = values.size
    flat = values.reshape(-1) if values.flags.c_contiguous else None  # else: copy chunk by chunk (.flat)
    signed = out.view(np.int32) if lanes == 2 else out.view(np.int64)
    if lanes == 2 and size % 2:
        signed[size] = 0  # the spare lane of the last word
    scratch = np.empty(min(size, _CHUNK), dtype=np.float64)
    borrow = np.empty(min(out.size, _CHUNK // 2 + 1), dtype=np.uint64) if lanes == 2 else None
    clipped = 0
    for start in range(0, size, _CHUNK):
        stop = min(start + _CHUNK, size)
        x = scratch[: stop - start]
        chunk = flat[start:stop] if flat is not None else values.flat[start:stop]
        np.multiply(chunk, factor, out=x, dtype=np.float64, casting="unsafe")  # cast and scale in one pass
        if not (x.min() >= -bound and x.max() <= bound):  # NaN fails both: the slow path counts it
            outside = ~(np.abs(x) <= bound)
            clipped += int(np.count_nonzero(outside))
            np.clip(x, -bound, bound, out=x)
            x[np.isnan(x)] = 0.0
        np.rint(x, out=x)
        np.copyto(signed[start:stop], x, casting="unsafe")  # |x| <= 2**62 (2**30 in a lane): exact
        if borrow is not None:  # the lanes were written as two unsigned halves: a negative low borrows 1
            words = out[start // 2: -(-stop // 2)]
            b = borrow[: words.size]
            np.bitwise_and(words, _LOW_SIGN, out=b)
            np.left_shift(b, 1, out=b)
            np.subtract(words, b, out=words)
    return clipped


def decode_sum(total: np.ndarray, frac_bits: int, out: np.ndarray | None = None, *, lanes: int = 1,
               size: int | None = None, weight: float = 1.0) -> np.ndarray:
    """``weight`` times the float64 values of a sum of :func:`encode_into` encodings (``total`` is
    uint64; with ``lanes=2``, ``size`` values in its lanes, default all of them).

    With ``out`` (float64, ``size`` values, any shape) the result is written there in chunks and
    nothing the size of ``total`` is allocated."""
    if not isinstance(total, np.ndarray) or total.dtype != np.uint64 or total.ndim != 1:
        raise FedlabSecaggError("a secure aggregation sum is a 1-D uint64 array")
    _check_lanes(lanes)
    size = total.size * lanes if size is None else size
    if words_for(size, lanes) != total.size:
        raise FedlabSecaggError(f"{size} values are not what a sum of {total.size} words holds")
    unit = math.ldexp(weight, -frac_bits)
    if out is None:
        if lanes == 1:
            return total.view(np.int64) * unit
        out = np.empty(size, np.float64)
    if out.dtype != np.float64 or out.size != size or not out.flags.c_contiguous:
        raise FedlabSecaggError(f"decode_sum writes into a C-contiguous float64 array of {size} values")
    flat = out.reshape(-1)
    if lanes == 1:
        signed = total.view(np.int64)
        for start in range(0, size, _CHUNK):
            stop = min(start + _CHUNK, size)
            np.multiply(signed[start:stop], unit, out=flat[start:stop])
        return out
    halves = total.view(np.int32)  # little-endian: low lane, high lane
    scratch = np.empty(2 * min(total.size, _CHUNK), np.int32)
    for start in range(0, total.size, _CHUNK):
        stop = min(start + _CHUNK, total.size)
        pairs = scratch[: 2 * (stop - start)]
        np.copyto(pairs, halves[2 * start: 2 * stop])  # a cached copy: the fix below is in place
        # the word is low + high * 2**32 with |low| < 2**31: its upper half is high - 1 when low < 0
        np.subtract(pairs[1::2], np.right_shift(pairs[0::2], 31), out=pairs[1::2])
        last = min(2 * stop, size)
        np.multiply(pairs[: last - 2 * start], unit, out=flat[2 * start: last])
    return out


def encode_int(value: int) -> int:
    """An exact integer (a weight, a count) as an element of the ring: ``value mod 2**64``."""
    value = operator.index(value)
    if not -_HALF <= value < _HALF:
        raise FedlabSecaggError(f"the integer {value} does not fit secure aggregation's signed 64 bits")
    return value % _RING


def decode_int(u: int) -> int:
    """A ring element (a sum of :func:`encode_int` values) back to a signed integer."""
    u = operator.index(u) % _RING
    return u - _RING if u >= _HALF else u


def _scaled(value: float | int | Fraction, frac_bits: int) -> int:
    """``round(value * 2**frac_bits)`` computed exactly (ties to even)."""
    if isinstance(value, Fraction):
        return round(value * (1 << frac_bits))
    if isinstance(value, int | np.integer):
        return int(value) << frac_bits
    f = float(value)
    if not math.isfinite(f):
        raise FedlabSecaggError(f"secure aggregation sums finite numbers; got {f} (leave it out or replace it)")
    numerator, denominator = f.as_integer_ratio()  # the denominator is a power of two
    if denominator <= 1 << frac_bits:
        return numerator * ((1 << frac_bits) // denominator)
    return round(Fraction(numerator, denominator) * (1 << frac_bits))


def _check_exact(limbs: int, frac_bits: int) -> None:
    if isinstance(limbs, bool) or not isinstance(limbs, int) or limbs < 2:
        raise FedlabSecaggError(f"an exact value takes at least 2 limbs of 32 bits, not {limbs!r}")
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits < _LIMB_BITS * limbs:
        raise FedlabSecaggError(f"an exact value has between 0 and {_LIMB_BITS * limbs - 1} fraction bits, "
                                f"not {frac_bits!r}")


def encode_exact(values: Sequence[float | int | Fraction], *, limbs: int = 8, frac_bits: int = 64) -> np.ndarray:
    """``values`` as ``len(values) * limbs`` uint64 slots, each holding a 32-bit limb (little-endian)
    of ``round(v * 2**frac_bits)`` in two's complement over ``32 * limbs`` bits."""
    _check_exact(limbs, frac_bits)
    width = _LIMB_BITS * limbs
    bound = 1 << (width - _HEADROOM_BITS)
    modulus = 1 << width
    raw = bytearray()
    for v in values:
        scaled = _scaled(v, frac_bits)
        if not -bound < scaled < bound:
            raise FedlabSecaggError(
                f"the value {v!r} is too large for an exact secure sum of {limbs} limbs with {frac_bits} fraction bits "
                f"(|value| must be below 2**{width - _HEADROOM_BITS - frac_bits}); use more limbs")
        raw += (scaled % modulus).to_bytes(width // 8, "little")
    return np.frombuffer(bytes(raw), dtype="<u4").astype(np.uint64)


def decode_exact_sum(total: np.ndarray, n_values: int, *, limbs: int = 8, frac_bits: int = 64) -> list[Fraction]:
    """The exact sums of ``n_values`` values from the unmasked sum of their :func:`encode_exact` slots."""
    _check_exact(limbs, frac_bits)
    if not isinstance(total, np.ndarray) or total.dtype != np.uint64 or total.size != n_values * limbs:
        raise FedlabSecaggError(
            f"an exact secure sum of {n_values} values with {limbs} limbs is {n_values * limbs} uint64 values")
    width = _LIMB_BITS * limbs
    modulus = 1 << width
    half = modulus >> 1
    denominator = 1 << frac_bits
    sums = []
    for row in total.reshape(n_values, limbs).tolist():
        v = 0
        for i, limb in enumerate(row):
            v += limb << (_LIMB_BITS * i)
        v %= modulus
        if v >= half:
            v -= modulus
        sums.append(Fraction(v, denominator))
    return sums
