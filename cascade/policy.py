"""The optimal-stopping policy: backward induction over the states of a cascade.

Derivation (the paper's Theorem 1 is not used; see README "Decision science"). A state is the
ordered set S of tiers already run for a row, with what they produced. Charging the cumulative
cost of the tiers actually run, the reward of a finished row is

    quality(kept answer) - lambda * sum_{t run} cost_t.

Costs already paid are sunk, so decisions only need the value of the future, W:

    W(S) = max( max_{t in S} E[q_t | obs_S],                             stop, keep best answer
                max_{j > last(S)} E[-lambda c_j + W(S + j) | obs_S] )     run tier j (next or skip)

and the start is W(()) = max_j E[-lambda c_j + W((j,)) | prompt]: the starting tier is chosen
from the prompt alone. The conditional expectations are what the paper's scalar V_{s+1} drops:
E[W(S + j) | obs_S] depends on what S's outputs looked like. We estimate them by regression
on calibration rows where every tier was logged:

- E[q_t | obs_S] for all t: the cross-fitted, Platt-calibrated MLP of state S (predictor.py);
- E[-lambda c_j + W(S+j) | obs_S]: ridge regression of the *realized* return of following the
  policy from S+j (true quality of the answer it keeps, true costs it pays) on a spline basis of
  the state's predicted qualities. Realized returns rather than the model's own estimates keep the
  recursion honest when the predictors are miscalibrated.

States are solved in order of decreasing last tier, so every W(S + j) is known when S is solved.
The ridge solve depends on lambda only through its target, so a sweep over lambda costs one
matrix-vector product per (state, action) per lambda.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

KNOTS = np.linspace(0.0, 1.0, 5)
RIDGE_ALPHA = 1.0


def all_states(n: int) -> list[tuple[int, ...]]:
    """Every set of run tiers, as increasing tuples, including the empty start state."""
    return [s for k in range(n + 1) for s in combinations(range(n), k)]


def solve_order(n: int) -> list[tuple[int, ...]]:
    """States so that every successor S + (j,) comes before S."""
    return sorted(all_states(n), key=lambda s: (-(s[-1] if s else -1), -len(s)))


def phi(q: np.ndarray, plen: np.ndarray) -> np.ndarray:
    """Regression basis of a state: hat functions of each tier's predicted quality, prompt length."""
    hats = np.maximum(0.0, 1.0 - np.abs(q[:, :, None] - KNOTS) / (KNOTS[1] - KNOTS[0]))
    plen = np.clip(plen, -4, 4)[:, None]
    return np.hstack([np.ones((len(q), 1)), hats.reshape(len(q), -1), plen, plen ** 2])


def ridge_projector(basis: np.ndarray, alpha: float = RIDGE_ALPHA) -> np.ndarray:
    """(X'X + alpha I)^-1 X': coefficients for any target are one product away."""
    gram = basis.T @ basis + alpha * np.eye(basis.shape[1])
    return np.linalg.solve(gram, basis.T)


@dataclass
class OperatingPoint:
    """One lambda and the fitted continuation coefficients of every (state, next tier)."""

    lam: float                                     # in normalised cost units
    betas: dict[tuple[int, ...], dict[int, np.ndarray]]
    cal_cost: float = float("nan")                 # mean cost on calibration rows (user units)
    cal_quality: float = float("nan")
    label: str = ""


@dataclass
class DPResult:
    point: OperatingPoint
    final_tier: np.ndarray       # (N,)
    tiers_run: list[list[int]]
    cost: np.ndarray             # (N,) realized cumulative cost, normalised units
    quality: np.ndarray          # (N,) realized quality of the kept answer


def decide(state: tuple[int, ...], q: np.ndarray, basis: np.ndarray, point: OperatingPoint,
           n: int) -> tuple[np.ndarray, np.ndarray]:
    """Actions at `state` for a batch: (action, kept) where action -1 = stop else next tier.

    `kept` is the run tier whose answer is kept if stopping (the best predicted among S).
    """
    rows = len(q)
    if state:
        run = list(state)
        best = np.argmax(q[:, run], axis=1)
        kept = np.asarray(run)[best]
        value = q[np.arange(rows), kept]
    else:
        kept = np.full(rows, -1)
        value = np.full(rows, -np.inf)
    action = np.full(rows, -1)
    for j, beta in point.betas.get(state, {}).items():
        cont = basis @ beta
        better = cont > value + 1e-12
        action = np.where(better, j, action)
        value = np.where(better, cont, value)
    return action, kept


def backward_induction(q_by_state: dict, plen: np.ndarray, quality: np.ndarray, cost: np.ndarray,
                       lam: float, projectors: dict | None = None) -> DPResult:
    """Fit the continuation regressions for one lambda and simulate the policy on the same rows.

    q_by_state[S]: (N, n) out-of-fold predicted qualities in state S; quality, cost: (n, N) true
    outcomes of every tier (cost normalised).
    """
    n, N = quality.shape
    order = solve_order(n)
    if projectors is None:
        projectors = {s: (phi(q_by_state[s], plen),) for s in order}
        projectors = {s: (b[0], ridge_projector(b[0])) for s, b in projectors.items()}
    ret: dict[tuple, np.ndarray] = {}       # realized future return from each state
    fut_cost: dict[tuple, np.ndarray] = {}
    kept_by: dict[tuple, np.ndarray] = {}
    act_by: dict[tuple, np.ndarray] = {}
    betas: dict[tuple, dict[int, np.ndarray]] = {}
    rows = np.arange(N)
    for s in order:
        basis, proj = projectors[s]
        last = s[-1] if s else -1
        betas[s] = {j: proj @ (-lam * cost[j] + ret[s + (j,)]) for j in range(last + 1, n)}
        point = OperatingPoint(lam, {s: betas[s]})
        action, kept = decide(s, q_by_state[s], basis, point, n)
        r = np.where(action < 0, quality[np.maximum(kept, 0), rows], 0.0)
        c = np.zeros(N)
        for j in betas[s]:
            go = action == j
            r[go] = -lam * cost[j, go] + ret[s + (j,)][go]
            c[go] = cost[j, go] + fut_cost[s + (j,)][go]
        ret[s], fut_cost[s], kept_by[s], act_by[s] = r, c, kept, action
    # Roll the decisions forward from the start state: states in topological order.
    final = np.full(N, -1)
    paths: list[list[int]] = [[] for _ in range(N)]
    at = {(): np.ones(N, bool)}
    for s in reversed(order):
        here = at.pop(s, None)
        if here is None or not here.any():
            continue
        stop = here & (act_by[s] < 0)
        final[stop] = kept_by[s][stop]
        for j in range(s[-1] + 1 if s else 0, n):
            go = here & (act_by[s] == j)
            if go.any():
                at[s + (j,)] = at.get(s + (j,), np.zeros(N, bool)) | go
                for i in np.flatnonzero(go):
                    paths[i].append(j)
    realized_q = quality[final, rows]
    return DPResult(OperatingPoint(lam, betas), final, paths, fut_cost[()], realized_q)


@dataclass
class BudgetChoice:
    kind: str              # "cost" or "quality"
    target: float          # fraction of the best tier's cost / quality
    confidence: float
    lam: float | None
    feasible: bool
    bound: float           # the one-sided confidence bound of the constrained quantity (ratio)
    note: str = ""


def choose_budget(results: list[DPResult], quality: np.ndarray, cost: np.ndarray, best: int,
                  kind: str, target: float, confidence: float = 0.95) -> BudgetChoice:
    """Pick the operating point for "cost <= X of best tier" or "quality >= Y of best tier".

    A point is feasible when a one-sided normal confidence bound on the paired per-row difference
    holds at `confidence`: for quality, mean(q_policy - Y q_best) - z se >= 0; for cost,
    mean(X c_best - c_policy) - z se >= 0. Among feasible points, the cheapest (quality mode) or
    the best (cost mode) wins.
    """
    from scipy.stats import norm

    z = float(norm.ppf(confidence))
    qb, cb = quality[best], cost[best]
    rows = []
    for res in results:
        d = (res.quality - target * qb) if kind == "quality" else (target * cb - res.cost)
        margin = d.mean() - z * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else -np.inf
        # the same bound on the ratio to the best tier: Y + margin/mean(q_best), X - margin/mean(c_best)
        ratio_bound = (target + margin / max(qb.mean(), 1e-12)) if kind == "quality" else \
            (target - margin / max(cb.mean(), 1e-12))
        rows.append((margin >= 0, res, ratio_bound))
    feasible = [(r, b) for ok, r, b in rows if ok]
    if not feasible:
        fallback = max(results, key=lambda r: r.quality.mean()) if kind == "quality" else \
            min(results, key=lambda r: r.cost.mean())
        bound = [b for _, r, b in rows if r is fallback][0]
        return BudgetChoice(kind, target, confidence, fallback.point.lam, False, bound,
                            "no operating point meets the target at this confidence on the "
                            "calibration rows; using the closest one")
    if kind == "quality":
        res, bound = min(feasible, key=lambda rb: rb[0].cost.mean())
    else:
        res, bound = max(feasible, key=lambda rb: rb[0].quality.mean())
    return BudgetChoice(kind, target, confidence, res.point.lam, True, bound)
