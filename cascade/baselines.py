"""Baselines a policy must beat: fixed tiers, random mixes, a FrugalGPT-style cascade, the oracle."""

from __future__ import annotations

from itertools import product

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression

from cascade.frontier import upper_hull
from cascade.ladder import Ladder

_text = HashingVectorizer(n_features=2 ** 14, ngram_range=(1, 2), alternate_sign=False)
GRID = 8


class FrugalGPT:
    """Per-tier logistic regression on the answer text (prompt + that tier's output), thresholds
    from a grid search, always starting at tier 0 and escalating one tier at a time."""

    def __init__(self, n_tiers: int, grid: int = GRID):
        self.n, self.grid = n_tiers, grid
        self.models: list[LogisticRegression | None] = []
        self.combos: list[np.ndarray] = []

    def _scores(self, ladder: Ladder) -> np.ndarray:
        out = np.ones((self.n, len(ladder)))
        for t, model in enumerate(self.models):
            if model is not None:
                x = _text.transform([p + "\n" + o[:2000] for p, o in
                                     zip(ladder.prompts, ladder.outputs[t])])
                out[t] = model.predict_proba(x)[:, 1]
        return out

    def fit(self, cal: Ladder) -> "FrugalGPT":
        y = cal.quality > 0.5
        self.models = []
        for t in range(self.n - 1):
            if y[t].all() or not y[t].any():
                self.models.append(None)
                continue
            x = _text.transform([p + "\n" + o[:2000] for p, o in zip(cal.prompts, cal.outputs[t])])
            self.models.append(LogisticRegression(C=1.0, max_iter=300).fit(x, y[t]))
        scores = self._scores(cal)
        levels = [np.r_[np.quantile(scores[t], np.linspace(0, 1, self.grid - 1)), np.inf]
                  for t in range(self.n - 1)]
        combos = [np.asarray(c) for c in product(*levels)]
        costs, quals = zip(*(self._run(scores, c, cal)[2:] for c in combos))
        hull = upper_hull(costs, quals)
        keep = {(round(c, 12), round(q, 12)) for c, q in hull}
        self.combos = [c for c, cc, qq in zip(combos, costs, quals) if (round(cc, 12), round(qq, 12)) in keep]
        return self

    def _run(self, scores, thresholds, ladder: Ladder):
        n, N = scores.shape
        stop = np.full(N, n - 1)
        for t in reversed(range(n - 1)):
            stop = np.where(scores[t] >= thresholds[t], t, stop)
        rows = np.arange(N)
        cum = np.cumsum(ladder.cost, axis=0)
        cost, qual = cum[stop, rows], ladder.quality[stop, rows]
        return cost, qual, float(cost.mean()), float(qual.mean())

    def evaluate(self, test: Ladder) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per-row (cost, quality) on `test` for each threshold vector chosen on calibration."""
        scores = self._scores(test)
        return [self._run(scores, c, test)[:2] for c in self.combos]


def random_mix(test: Ladder, target_cost: float, rng: np.random.Generator):
    """Per-row (cost, quality) of sending each row to one fixed tier at random, mixing the two
    adjacent tiers on the fixed tiers' frontier so that the mean cost matches `target_cost`."""
    mc, mq = test.cost.mean(1), test.quality.mean(1)
    hull = upper_hull(mc, mq)
    tier_of = {(round(c, 12), round(q, 12)): t for t, (c, q) in enumerate(zip(mc, mq))}
    tiers = [tier_of[(round(c, 12), round(q, 12))] for c, q in hull]
    rows = np.arange(len(test))
    if target_cost <= hull[0, 0] or len(tiers) == 1:
        pick = np.full(len(test), tiers[0])
    elif target_cost >= hull[-1, 0]:
        pick = np.full(len(test), tiers[-1])
    else:
        i = int(np.searchsorted(hull[:, 0], target_cost)) - 1
        w = (target_cost - hull[i, 0]) / (hull[i + 1, 0] - hull[i, 0])
        pick = np.where(rng.random(len(test)) < w, tiers[i + 1], tiers[i])
    return test.cost[pick, rows], test.quality[pick, rows]
