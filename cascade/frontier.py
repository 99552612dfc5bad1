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


def oracle_steps(quality: np.ndarray, cost: np.ndarray):
    """What an oracle that knows every row's outcome at every tier does as its budget grows: start
    each row on its cheapest tier, then take the steps of the rows' own hulls in order of falling
    quality per cost (a fractional knapsack). Returns (start cost, start quality) per row and
    the steps in that order: cost added, quality added, the row it belongs to."""
    n, N = quality.shape
    start = np.argmin(cost + 0 * quality, axis=0)       # cheapest tier of each row
    rows = np.arange(N)
    slope, dc, dq, owner = [], [], [], []
    for i in range(N):
        h = upper_hull(cost[:, i], quality[:, i])
        for (c1, q1), (c2, q2) in zip(h[:-1], h[1:]):
            slope.append((q2 - q1) / max(c2 - c1, 1e-12))
            dc.append(c2 - c1)
            dq.append(q2 - q1)
            owner.append(i)
    order = np.argsort(-np.asarray(slope, float), kind="stable")
    return (cost[start, rows], quality[start, rows], np.asarray(dc, float)[order],
            np.asarray(dq, float)[order], np.asarray(owner, int)[order])


def oracle_chain(steps, weights: np.ndarray) -> np.ndarray:
    """The oracle's (cost, quality) vertices with each row weighted (1/N each: the mean over the
    rows; bootstrap counts / N: a resample)."""
    base_c, base_q, dc, dq, owner = steps
    w = weights[owner]
    return np.column_stack([base_c @ weights + np.r_[0.0, np.cumsum(dc * w)],
                            base_q @ weights + np.r_[0.0, np.cumsum(dq * w)]])


def oracle_hull(quality: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Frontier of an oracle that knows every row's outcome at every tier and pays only for the
    tier it picks (oracle_steps), over the mean cost of the rows."""
    chain = oracle_chain(oracle_steps(quality, cost), np.ones(quality.shape[1]))
    return upper_hull(chain[:, 0] / quality.shape[1], chain[:, 1] / quality.shape[1])
