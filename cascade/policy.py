"""The optimal-stopping policy: backward induction over the states of a cascade.

Derivation (the paper's Theorem 1 is not used; see README "How the policy decides"). A state is the
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

- E[q_t | obs_S] for all t: the cross-fitted, Platt-calibrated quality predictor of state S
  (predictor.py): per tier the candidate with the lowest out-of-fold log-loss, among a prior,
  monotone maps of a logged confidence, a linear head, an MLP and (opt-in) boosted trees;
- E[-lambda c_j + W(S+j) | obs_S]: ridge regression of the *realized* return of following the
  policy from S+j (true quality of the answer it keeps, true costs it pays) on a spline basis of
  the state's predicted qualities. Realized returns rather than the model's own estimates keep the
  recursion honest when the predictors are miscalibrated.

States are solved in order of decreasing last tier, so every W(S + j) is known when S is solved.
The ridge solve depends on lambda only through its target, so a sweep over lambda costs one
matrix-vector product per (state, action) per lambda.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

KNOTS = np.linspace(0.0, 1.0, 5)
STOP = -1            # the key of the stopping value's coefficients among a state's betas
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
    # A fixed-tier mix instead of the cascade: (a, b, w) sends a row to tier b when its row hash
    # (row_hash) is below w, else to tier a, and stops there. w = 0 is fixed tier a.
    mix: tuple[int, int, float] | None = None
    # Out-of-sample check against the fixed-tier hull at this point's cost (calibrate.py):
    # advantage, its standard error, the confidence it is positive, and whether it fell back.
    check: dict | None = None


@dataclass
class DPResult:
    point: OperatingPoint
    final_tier: np.ndarray       # (N,)
    tiers_run: list[list[int]]
    cost: np.ndarray             # (N,) realized cumulative cost, normalised units
    quality: np.ndarray          # (N,) realized quality of the kept answer


def row_hash(row_ids) -> np.ndarray:
    """A uniform number in [0, 1) per row id, the same on every machine and in every run: what
    assigns a row to a tier of a fixed-tier mix."""
    return np.array([zlib.crc32(b"mix:" + str(r).encode()) for r in row_ids], np.float64) / 2.0 ** 32


def mix_pick(mix: tuple[int, int, float], u: np.ndarray) -> np.ndarray:
    """The tier a fixed-tier mix (a, b, w) sends each row to, from the rows' row_hash."""
    a, b, w = mix
    return np.where(u < w, b, a)


def decide(state: tuple[int, ...], q: np.ndarray, basis: np.ndarray, point: OperatingPoint,
           n: int, u: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Actions at `state` for a batch: (action, kept) where action -1 = stop else next tier.

    `kept` is the run tier whose answer is kept if stopping (the best predicted among S).
    `u`: the rows' row_hash, needed by fixed-tier mix points only.
    """
    rows = len(q)
    if point.mix is not None:
        if not state:
            if u is None:
                raise ValueError(f"operating point {point.label!r} is a fixed-tier mix: it needs row ids")
            return mix_pick(point.mix, u), np.full(rows, -1)
        return np.full(rows, -1), np.full(rows, state[-1])
    if state:
        run = list(state)
        best = np.argmax(q[:, run], axis=1)
        kept = np.asarray(run)[best]
        value = q[np.arange(rows), kept]
        stop = point.betas.get(state, {}).get(STOP)
        if stop is not None:
            value = value + basis @ stop
    else:
        kept = np.full(rows, -1)
        value = np.full(rows, -np.inf)
    action = np.full(rows, -1)
    for j, beta in point.betas.get(state, {}).items():
        if j == STOP:
            continue
        cont = basis @ beta
        better = cont > value + 1e-12
        action = np.where(better, j, action)
        value = np.where(better, cont, value)
    return action, kept


def backward_induction(q_by_state: dict, plen: np.ndarray, quality: np.ndarray, cost: np.ndarray,
                       lam: float, projectors: dict | None = None, paths: bool = True) -> DPResult:
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
        if s:
            # the value of stopping checked against outcomes the way continuing is: the predicted
            # quality of the answer kept plus a regression, on the same basis, of what it missed
            # by on these rows. Comparing a regression of outcomes with the predictor's raw
            # estimate would let a tier that adds nothing look worth its cost wherever the
            # predictor is locally miscalibrated. (A calibrated predictor gets ~0 correction.)
            kept = np.asarray(s)[np.argmax(q_by_state[s][:, list(s)], axis=1)]
            betas[s][STOP] = proj @ (quality[kept, rows] - q_by_state[s][rows, kept])
        point = OperatingPoint(lam, {s: betas[s]})
        action, kept = decide(s, q_by_state[s], basis, point, n)
        r = np.where(action < 0, quality[np.maximum(kept, 0), rows], 0.0)
        c = np.zeros(N)
        for j in range(last + 1, n):
            go = action == j
            r[go] = -lam * cost[j, go] + ret[s + (j,)][go]
            c[go] = cost[j, go] + fut_cost[s + (j,)][go]
        ret[s], fut_cost[s], kept_by[s], act_by[s] = r, c, kept, action
    if not paths:            # the fitted point only (nested cross-fitting simulates it itself)
        return DPResult(OperatingPoint(lam, betas), np.full(N, -1), [], fut_cost[()], np.zeros(N))
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


def simulate(point: OperatingPoint, q_by_state: dict, plen: np.ndarray, quality: np.ndarray,
             cost: np.ndarray, u: np.ndarray, projectors: dict | None = None) -> DPResult:
    """Run a fitted point on rows whose outcomes at every tier are known (quality, cost: (n, N));
    for rows the point was not fitted on, this is its out-of-sample outcome."""
    n, N = quality.shape
    final = np.full(N, -1)
    paid = np.zeros(N)
    at = {(): np.arange(N)}
    for s in reversed(solve_order(n)):
        rows = at.pop(s, None)
        if rows is None or not len(rows):
            continue
        q = q_by_state[s][rows]
        basis = projectors[s][0][rows] if projectors else phi(q, plen[rows])
        action, kept = decide(s, q, basis, point, n, u[rows])
        final[rows[action < 0]] = kept[action < 0]
        for j in np.unique(action[action >= 0]):
            go = rows[action == j]
            paid[go] += cost[j, go]
            nxt = s + (int(j),)
            at[nxt] = np.concatenate([at[nxt], go]) if nxt in at else go
    idx = np.arange(N)
    return DPResult(point, final, [], paid, quality[final, idx])     # paths not kept


@dataclass
class BudgetChoice:
    kind: str              # "cost" or "quality"
    target: float          # fraction of the best tier's cost / quality
    confidence: float
    lam: float | None
    feasible: bool
    bound: float           # the one-sided confidence bound of the constrained quantity (ratio)
    note: str = ""


def choose_budget(results: list[DPResult], held: list[DPResult], quality: np.ndarray,
                  cost: np.ndarray, best: int, kind: str, target: float,
                  confidence: float = 0.95) -> tuple[BudgetChoice, DPResult]:
    """Pick the operating point for "cost <= X of best tier" or "quality >= Y of best tier".

    `held[i]` is `results[i]`'s held-out outcome per calibration row (nested cross-fitting), so
    the bound speaks for rows the point was not fitted on. A point is feasible when a one-sided
    normal confidence bound on the paired per-row difference holds at `confidence`: for quality,
    mean(q_policy - Y q_best) - z se >= 0; for cost, mean(X c_best - c_policy) - z se >= 0. Among
    feasible points, the cheapest (quality mode) or the best (cost mode) wins. Returns the choice
    and the chosen result.
    """
    from scipy.stats import norm

    z = float(norm.ppf(confidence))
    qb, cb = quality[best], cost[best]
    rows = []
    for res, oos in zip(results, held):
        d = (oos.quality - target * qb) if kind == "quality" else (target * cb - oos.cost)
        margin = d.mean() - z * d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else -np.inf
        # the same bound on the ratio to the best tier: Y + margin/mean(q_best), X - margin/mean(c_best)
        ratio_bound = (target + margin / max(qb.mean(), 1e-12)) if kind == "quality" else \
            (target - margin / max(cb.mean(), 1e-12))
        rows.append((margin >= 0, res, oos, float(ratio_bound)))
    feasible = [(r, o, b) for ok, r, o, b in rows if ok]
    if not feasible:
        _, fallback, _, bound = (max(rows, key=lambda x: x[2].quality.mean()) if kind == "quality"
                                 else min(rows, key=lambda x: x[2].cost.mean()))
        return BudgetChoice(kind, target, confidence, fallback.point.lam, False, bound,
                            "no operating point meets the target at this confidence on held-out "
                            "calibration rows; using the closest one"), fallback
    if kind == "quality":
        res, _, bound = min(feasible, key=lambda x: x[1].cost.mean())
    else:
        res, _, bound = max(feasible, key=lambda x: x[1].quality.mean())
    return BudgetChoice(kind, target, confidence, res.point.lam, True, bound), res
