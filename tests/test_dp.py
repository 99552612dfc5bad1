"""The dynamic programme against optima known by construction: closed form and exact expectimax."""

from itertools import product

import numpy as np
import pytest

from cascade.policy import all_states, backward_induction


def reward(res, lam):
    return float(np.mean(res.quality - lam * res.cost))


def test_two_tier_closed_form():
    # Tier 0 right with known probability p, tier 1 always right. Starting at tier 0 is worth
    # -lam c0 + max(p, 1 - lam c1), starting at tier 1 is worth 1 - lam c1. Optimum: if
    # p >= 1 - lam (c1 - c0) run tier 0 and stop, else start at tier 1 (never both);
    # value E[max(p - lam c0, 1 - lam c1)].
    rng = np.random.default_rng(0)
    N, lam, c = 20000, 0.5, np.array([0.1, 1.0])
    p = rng.random(N)
    quality = np.vstack([(rng.random(N) < p).astype(float), np.ones(N)])
    cost = np.repeat(c[:, None], N, axis=1)
    q = {s: np.column_stack([p, np.ones(N)]) for s in all_states(2)}
    res = backward_induction(q, np.zeros(N), quality, cost, lam)
    expected_path = np.where(p >= 1 - lam * (c[1] - c[0]), 0, 1)
    got_path = np.array([tr[0] for tr in res.tiers_run])
    assert all(len(tr) == 1 for tr in res.tiers_run)             # never pays for both
    assert np.mean(got_path == expected_path) > 0.97
    far = np.abs(p - (1 - lam * (c[1] - c[0]))) > 0.05
    assert np.all(got_path[far] == expected_path[far])
    optimum = np.mean(np.maximum(p * 1 - lam * c[0], 1 - lam * c[1]))
    assert reward(res, lam) == pytest.approx(optimum, abs=0.01)


def expectimax(acc, cost, lam):
    """Exact optimal value of a cascade whose tier t is right w.p. acc[t] independently and whose
    output reveals whether it was right. Returns the expected reward of the best adaptive policy."""
    n = len(acc)

    def value(run, outcome):
        best = max((outcome[t] for t in run), default=-np.inf)
        for j in range(run[-1] + 1 if run else 0, n):
            cont = -lam * cost[j] + sum(
                (acc[j] if o else 1 - acc[j]) * value(run + (j,), outcome | {j: o}) for o in (0, 1))
            best = max(best, cont)
        return best

    return value((), {})


@pytest.mark.parametrize("lam", [0.2, 0.6, 1.5])
def test_three_tier_matches_exact_expectimax(lam):
    rng = np.random.default_rng(1)
    N = 30000
    levels = np.array([[0.9, 0.8, 0.97], [0.5, 0.6, 0.85], [0.1, 0.2, 0.6]])
    cost = np.array([0.1, 0.3, 1.0])
    d = rng.integers(0, 3, N)
    acc = levels[d].T                                     # (3, N)
    quality = (rng.random((3, N)) < acc).astype(float)
    q = {}
    for s in all_states(3):
        est = acc.T.copy()
        for t in s:
            est[:, t] = quality[t]                        # a run tier's output reveals correctness
        q[s] = est
    res = backward_induction(q, np.zeros(N), quality, np.repeat(cost[:, None], N, 1), lam)
    optimum = np.mean([expectimax(levels[k], cost, lam) for k in d])
    assert reward(res, lam) == pytest.approx(optimum, abs=0.01)


@pytest.mark.parametrize("seed", [2, 3])
@pytest.mark.parametrize("lam", [0.2, 0.4, 0.8])
def test_beats_every_threshold_vector(seed, lam):
    """Exhaustive search over the classic cascade's threshold vectors (0 -> 1 -> 2, stop when the
    current tier's estimate clears its threshold), each scored on the same rows' outcomes as the
    DP, never finds a better policy: the DP may also skip tiers, which at lower lambdas is worth
    a clear margin."""
    rng = np.random.default_rng(seed)
    N = 20000
    cost = np.repeat(np.array([0.1, 0.3, 1.0])[:, None], N, 1)
    diff = rng.random(N)
    acc = np.vstack([np.clip(1.05 - diff, 0, 1), np.clip(1.2 - diff, 0, 1), np.clip(1.5 - diff, 0, 1)])
    quality = (rng.random((3, N)) < acc).astype(float)
    noisy = np.clip(acc + rng.normal(0, 0.1, acc.shape), 0, 1)   # what a predictor would see
    q = {s: noisy.T.copy() for s in all_states(3)}
    res = backward_induction(q, np.zeros(N), quality, cost, lam)
    grid = np.linspace(0, 1.01, 41)
    best = -np.inf
    rows = np.arange(N)
    cum = np.cumsum(cost, 0)
    for t0, t1 in product(grid, grid):
        stop = np.where(noisy[0] >= t0, 0, np.where(noisy[1] >= t1, 1, 2))
        best = max(best, np.mean(quality[stop, rows] - lam * cum[stop, rows]))
    assert reward(res, lam) >= best + (0.02 if lam <= 0.4 else 0.0), (reward(res, lam), best)
