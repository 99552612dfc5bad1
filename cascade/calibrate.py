"""`cascade calibrate`: fit predictors and the optimal-stopping policy from a logged ladder.

Everything is learned from the calibration data it is given: no tier, task or cost scale is
assumed. Costs are normalised by the best tier's mean cost (so lambda has the same meaning on a
ladder logged in USD and one logged in GPU-seconds); the artifact stores lambda in both units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cascade.features import StateFeaturizer, observe_all
from cascade.ladder import Ladder
from cascade.policy import (BudgetChoice, DPResult, OperatingPoint, all_states,
                            backward_induction, choose_budget, phi, ridge_projector)
from cascade.predictor import TrainConfig, auc, cross_fit, ece, fold_of

# Normalised lambdas swept: 0 (quality only) then log-spaced up to where only the cheapest
# tier pays for itself. Quality is in [0, 1] and costs are in units of the best tier's mean.
LAMBDA_GRID = np.concatenate([[0.0], np.logspace(-3, 1.7, 63)])
REPLAY_POINTS = 24


@dataclass
class Budget:
    kind: str                 # "cost" (cost <= target x best tier) or "quality" (>= target x best)
    target: float
    confidence: float = 0.95


@dataclass
class CalibrationReport:
    seconds: float
    rows: int
    tier_quality: list[float]
    tier_cost: list[float]
    best_tier: int
    predictor_metrics: list[dict] = field(default_factory=list)   # per state and tier: AUC, ECE
    points: list[dict] = field(default_factory=list)
    budget: dict | None = None


def quality_scale(quality: np.ndarray) -> tuple[float, float]:
    """Map logged quality to [0, 1] for the predictors (binary and [0,1] scores pass unchanged)."""
    lo, hi = float(quality.min()), float(quality.max())
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    return lo, max(hi - lo, 1e-12)


def fit_policy(ladder: Ladder, *, cfg: TrainConfig | None = None, budget: Budget | None = None,
               lambdas: np.ndarray = LAMBDA_GRID, user_lambdas=None, log=lambda msg: None):
    """Calibrate on a complete ladder (quality and cost at every tier). Returns (Policy, report).

    `lambdas` are in normalised cost units (best tier's mean cost = 1); `user_lambdas`, if given,
    replace them with lambdas in the log's own cost units and skip the grid refinement.
    """
    from cascade.runtime import Policy

    if ladder.quality is None or ladder.cost is None:
        raise ValueError("calibration needs 'quality' and 'cost' at every tier")
    cfg = cfg or TrainConfig()
    t0 = time.perf_counter()
    n, N = ladder.n_tiers, len(ladder)
    q_lo, q_span = quality_scale(ladder.quality)
    quality = (ladder.quality - q_lo) / q_span
    mean_q, mean_c = quality.mean(1), ladder.cost.mean(1)
    best = int(np.lexsort((mean_c, -mean_q))[0])          # highest quality, cheaper on ties
    cost_unit = float(mean_c[best]) if mean_c[best] > 0 else float(max(mean_c.max(), 1e-12))
    cost = ladder.cost / cost_unit

    obs = observe_all(ladder)
    featurizer = StateFeaturizer.fit(obs)
    folds = fold_of(ladder.row_ids, cfg.folds)
    log(f"features: {time.perf_counter() - t0:.1f}s")

    predictors, q_by_state, metrics = {}, {}, []
    for k, state in enumerate(all_states(n)):
        x = featurizer(obs, state)
        predictors[state], q_by_state[state] = cross_fit(x, quality.T, folds, cfg, seed=cfg.seed + k)
        for t in range(n):
            metrics.append({"state": list(state), "tier": t, "observed": t in state,
                            "auc": auc(q_by_state[state][:, t], quality[t]),
                            "ece": ece(q_by_state[state][:, t], quality[t])})
    log(f"predictors for {len(predictors)} states: {time.perf_counter() - t0:.1f}s")

    plen = featurizer.prompt_scaler(obs.prompt_dense)[:, 0].astype(np.float64)
    projectors = {}
    for s in all_states(n):
        basis = phi(q_by_state[s], plen)
        projectors[s] = (basis, ridge_projector(basis))
    def solve(lam):
        return backward_induction(q_by_state, plen, quality, cost, lam, projectors)

    if user_lambdas is not None:
        results = [solve(float(lam) * cost_unit) for lam in user_lambdas]
    else:
        results = _refine([solve(lam) for lam in lambdas], solve, extra=2 * REPLAY_POINTS)
    log(f"dynamic programme for {len(lambdas)} lambdas: {time.perf_counter() - t0:.1f}s")

    points = _spread(results, REPLAY_POINTS)
    for res in points:
        res.point.cal_cost = float(res.cost.mean() * cost_unit)
        res.point.cal_quality = float(res.quality.mean() * q_span + q_lo)
    budget_choice = None
    if budget is not None:
        budget_choice = choose_budget(results, quality, cost, best, budget.kind, budget.target,
                                      budget.confidence)
        default = next(r for r in results if r.point.lam == budget_choice.lam)
    elif user_lambdas is not None:
        default = results[0]
    else:
        # without a budget: the cheapest point keeping 99% of the best tier's quality at 95%
        default_choice = choose_budget(results, quality, cost, best, "quality", 0.99, 0.95)
        default = next(r for r in results if r.point.lam == default_choice.lam)
    if all(default is not r for r in points):
        default.point.cal_cost = float(default.cost.mean() * cost_unit)
        default.point.cal_quality = float(default.quality.mean() * q_span + q_lo)
        points = sorted(points + [default], key=lambda r: r.cost.mean())
    for k, res in enumerate(points):     # cheapest first; the index keeps labels unique
        res.point.label = f"p{k:02d} lambda={res.point.lam / cost_unit:.6g}"

    policy = Policy(
        n_tiers=n, models=ladder.models, schema={"prompt_text": list(ladder.prompt_text),
                                                 "prompt_num": list(ladder.prompt_num),
                                                 "output_num": list(ladder.output_num)},
        featurizer=featurizer, predictors=predictors, points=[r.point for r in points],
        default_label=default.point.label, cost_unit=cost_unit, quality_offset=q_lo,
        quality_span=q_span, best_tier=best, train_config=cfg,
    )
    report = CalibrationReport(
        seconds=time.perf_counter() - t0, rows=N, tier_quality=(mean_q * q_span + q_lo).tolist(),
        tier_cost=mean_c.tolist(), best_tier=best, predictor_metrics=metrics,
        points=[{"label": r.point.label, "lambda": r.point.lam / cost_unit,
                 "cost": r.point.cal_cost, "quality": r.point.cal_quality,
                 # selection shares on the calibration rows: the baseline for drift checks
                 "shares": [float(np.mean(r.final_tier == t)) for t in range(n)]} for r in points],
        budget=None if budget_choice is None else vars(budget_choice) | {"label": default.point.label},
    )
    policy.calibration = vars(report)
    return policy, report


def _refine(results: list[DPResult], solve, extra: int) -> list[DPResult]:
    """Add lambdas where neighbouring points are furthest apart in cost (geometric bisection).

    The frontier can turn steeply within a narrow band of lambda; a fixed grid leaves gaps there.
    """
    results = sorted(results, key=lambda r: r.point.lam)
    for _ in range(extra):
        costs = np.array([r.cost.mean() for r in results])
        gaps = np.abs(np.diff(costs))
        i = int(np.argmax(gaps))
        if gaps[i] <= 1e-9:
            break
        lo, hi = results[i].point.lam, results[i + 1].point.lam
        mid = np.sqrt(lo * hi) if lo > 0 else hi / 4
        if not lo < mid < hi:
            break
        results.insert(i + 1, solve(mid))
    return results


def _spread(results: list[DPResult], k: int) -> list[DPResult]:
    """k results spread evenly over mean cost, cheapest first (all of them if there are fewer)."""
    ordered = sorted(results, key=lambda r: (r.cost.mean(), -r.point.lam))
    if len(ordered) <= k:
        return ordered
    costs = np.array([r.cost.mean() for r in ordered])
    targets = np.linspace(costs[0], costs[-1], k)
    chosen, used = [], set()
    for t in targets:
        order = np.argsort(np.abs(costs - t))
        i = next((int(i) for i in order if int(i) not in used), None)
        if i is not None:
            used.add(i)
            chosen.append(ordered[i])
    return sorted(chosen, key=lambda r: (r.cost.mean(), -r.point.lam))
