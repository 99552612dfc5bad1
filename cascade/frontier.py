"""Quality/cost frontiers and the numbers read off them (area gain, cost at a quality target).

A frontier is the upper concave envelope of (mean cost, mean quality) points: any two operating
points can be mixed at random row by row, so everything on the segment between them is
achievable. All methods are treated the same way, the fixed tiers included.
"""

from __future__ import annotations

import numpy as np


def upper_hull(costs, qualities) -> np.ndarray:
    """Vertices (cost, quality) of the non-decreasing upper concave envelope, by cost."""
    pts = sorted(zip(map(float, costs), map(float, qualities)), key=lambda p: (p[0], -p[1]))
    hull: list[tuple[float, float]] = []
    for p in pts:
        if hull and p[1] <= hull[-1][1]:
            continue                       # dominated: costs more, no better
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (p[0] - x1) <= (p[1] - y1) * (x2 - x1):
                hull.pop()                 # middle point under the chord
            else:
                break
        hull.append(p)
    return np.asarray(hull)


def value_at(hull: np.ndarray, cost) -> np.ndarray:
    """Best quality reachable at mean cost <= `cost` (nan below the cheapest vertex)."""
    cost = np.asarray(cost, float)
    out = np.interp(cost, hull[:, 0], hull[:, 1])
    return np.where(cost < hull[0, 0] - 1e-12, np.nan, out)


def area(hull: np.ndarray, lo: float, hi: float, grid: int = 2001) -> float:
    """Integral of the frontier over [lo, hi]; below its cheapest vertex it counts as 0 quality."""
    xs = np.linspace(lo, hi, grid)
    return float(np.trapezoid(np.nan_to_num(value_at(hull, xs), nan=0.0), xs))


def cost_at_quality(hull: np.ndarray, target: float) -> float:
    """Least mean cost whose frontier quality reaches `target` (inf if never)."""
    if hull[-1, 1] < target - 1e-12:
        return float("inf")
    i = int(np.argmax(hull[:, 1] >= target - 1e-12))
    if i == 0:
        return float(hull[0, 0])
    (x1, y1), (x2, y2) = hull[i - 1], hull[i]
    return float(x1 + (target - y1) * (x2 - x1) / (y2 - y1))


def oracle_hull(quality: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Frontier of an oracle that knows every row's outcome at every tier and pays only for the
    tier it picks: a fractional knapsack per budget, solved greedily over each row's own hull."""
    n, N = quality.shape
    start = np.argmin(cost + 0 * quality, axis=0)       # cheapest tier of each row
    base_c = cost[start, np.arange(N)].sum()
    base_q = quality[start, np.arange(N)].sum()
    steps = []
    for i in range(N):
        h = upper_hull(cost[:, i], quality[:, i])
        for (c1, q1), (c2, q2) in zip(h[:-1], h[1:]):
            steps.append(((q2 - q1) / max(c2 - c1, 1e-12), c2 - c1, q2 - q1))
    steps.sort(key=lambda s: -s[0])
    xs, ys = [base_c], [base_q]
    for _, dc, dq in steps:
        xs.append(xs[-1] + dc)
        ys.append(ys[-1] + dq)
    return upper_hull(np.asarray(xs) / N, np.asarray(ys) / N)
