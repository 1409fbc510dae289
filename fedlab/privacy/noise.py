"""Min/max noise that neither repeated requests nor derived copies can average away.

A noisy minimum drawn afresh each time could be averaged (the largest of many noisy minima
approaches the true one). So the noise of a column is two fixed fractions ``u_lo, u_hi`` in
(0, 1], drawn from a generator keyed by the node's secret, a digest of the source dataset's
content and the *source* column: the same on every request, for every researcher, on every
derived copy. The shift is ``u * noise * range`` outward, with the range of the column as asked;
since every value transform of a derived copy is an increasing affine map (see
:mod:`.spec_check`), the copy's noisy minimum is exactly the map of the source's.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

__all__ = ["noise_fractions", "noisy_range"]


def noise_fractions(secret: bytes, source_digest: str, source_column: str) -> tuple[float, float]:
    """Two fractions in (0, 1], fixed for this node, source content and source column."""
    material = b"|".join([secret, source_digest.encode(), source_column.encode("utf-8", "surrogatepass")])
    digest = hashlib.sha256(material).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "big"))
    lo, hi = rng.uniform(0.0, 1.0, size=2)
    return 1.0 - float(lo), 1.0 - float(hi)  # uniform in (0, 1]


def _outward(value: float, shift: float, direction: float) -> float:
    moved = value + direction * shift
    if not math.isfinite(moved) or (moved - value) * direction <= 0:
        moved = math.nextafter(value, direction * math.inf) if math.isfinite(value) else value
    return moved


def noisy_range(lo: float, hi: float, noise: float, fractions: tuple[float, float]) -> tuple[float, float]:
    """``(lo, hi)`` moved outward by ``fraction * noise * scale``; the scale is the range, or
    ``|value|`` (1 when 0) for a constant column."""
    if hi > lo and math.isfinite(hi - lo):
        scale = hi - lo
    else:
        present = [abs(v) for v in (lo, hi) if math.isfinite(v)]
        scale = max(present, default=0.0) or 1.0
    return _outward(lo, fractions[0] * noise * scale, -1.0), _outward(hi, fractions[1] * noise * scale, +1.0)
