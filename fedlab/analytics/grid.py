"""The grid on which nodes answer thresholds and histogram edges, and float ordinals.

Nodes round every threshold and edge to a power-of-ten grid (see :mod:`fedlab.privacy.cuts`);
the researcher's quantile search must round exactly as they do, so both use :func:`snap`.
Pure: no dependency beyond the standard library.
"""

from __future__ import annotations

import math
import struct

__all__ = ["from_ordinal", "grid_point", "ordinal", "snap"]


def snap(value: float, step: float | None) -> float:
    """``value`` rounded to the nearest multiple of ``step``, as nodes round thresholds and edges.

    For a power-of-ten step the multiple is computed from integers, so that a round number
    (40, 0.5) stays exactly itself and a point on a coarse power-of-ten grid is unchanged by
    rounding to a finer one. Values beyond 2**52 steps, non-finite values and a step of None or
    0 are returned as they are.
    """
    if step is None or not step > 0 or not math.isfinite(value):
        return value
    k = value / step
    if not abs(k) < 2.0**52:
        return value
    return grid_point(round(k), step)


def grid_point(m: int, step: float) -> float:
    """The m-th multiple of step (exactly representable decimals for power-of-ten steps)."""
    exponent = round(math.log10(step))
    if math.isclose(step, 10.0**exponent, rel_tol=1e-12):
        return float(m * 10**exponent) if exponent >= 0 else m / 10 ** (-exponent)
    return m * step


def ordinal(x: float) -> int:
    """An integer that orders floats like their values and steps by 1 between adjacent floats."""
    (i,) = struct.unpack("<q", struct.pack("<d", x))
    return int(i) if i >= 0 else -(int(i) & 0x7FFFFFFFFFFFFFFF)


def from_ordinal(o: int) -> float:
    bits = o if o >= 0 else (-o) | (1 << 63)
    (x,) = struct.unpack("<d", struct.pack("<Q", bits))
    return float(x)
