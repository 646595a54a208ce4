"""Small statistics helpers shared by the benchmark processes (no numpy needed)."""

from __future__ import annotations

import math
from typing import Iterable


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; NaN for no values."""
    data = sorted(values)
    if not data:
        return math.nan
    pos = (len(data) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Iterable[float]) -> float:
    """The median of the values that are not NaN; NaN if there are none."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return percentile(kept, 50) if kept else math.nan
