"""`cascade calibrate`: fit predictors and the optimal-stopping policy from a logged ladder.

Everything is learned from the calibration data it is given: no tier, task or cost scale is
assumed. Costs are normalised by the best tier's mean cost (so lambda has the same meaning on a
ladder logged in USD and one logged in GPU-seconds); the artifact stores lambda in both units.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from cascade.encoder import describe, get_encoder
from cascade.features import StateFeaturizer, observe_all
from cascade.frontier import upper_hull
from cascade.ladder import Ladder
from cascade.policy import (DPResult, OperatingPoint, all_states, backward_induction,
                            choose_budget, mix_pick, phi, ridge_projector, row_hash,
                            simulate)
from cascade.predictor import EMBEDDING_HEADS, TrainConfig, auc, ece, fit_embedding, fit_state, fold_of
from cascade.runtime import Policy

# Normalised lambdas swept: 0 (quality only) then log-spaced up to where only the cheapest
# tier pays for itself. Quality is in [0, 1] and costs are in units of the best tier's mean.
LAMBDA_GRID = np.concatenate([[0.0], np.logspace(-3, 1.7, 63)])
REPLAY_POINTS = 24
# A cascade point is kept only where, out of sample, it beats the fixed-tier mix at its cost
# with at least this confidence; elsewhere the point is that mix.
NO_HARM_CONFIDENCE = 0.75


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
    model_choice: list[dict] = field(default_factory=list)       # per state and tier
    no_harm_confidence: float = NO_HARM_CONFIDENCE
    # with an encoder: its description, how many (state, tier) heads read the embedding, and
    # what encoding the calibration rows cost
    embeddings: dict | None = None


def quality_scale(quality: np.ndarray) -> tuple[float, float]:
    """Map logged quality to [0, 1] for the predictors (binary and [0,1] scores pass unchanged)."""
    lo, hi = float(quality.min()), float(quality.max())
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    return lo, max(hi - lo, 1e-12)


def fit_policy(ladder: Ladder, *, cfg: TrainConfig | None = None, budget: Budget | None = None,
               lambdas: np.ndarray = LAMBDA_GRID, user_lambdas=None,
               no_harm_confidence: float = NO_HARM_CONFIDENCE, embedding: np.ndarray | None = None,
               simultaneous: bool = True, log=lambda msg: None):
    """Calibrate on a complete ladder (quality and cost at every tier). Returns (Policy, report).

    `lambdas` are in normalised cost units (best tier's mean cost = 1); `user_lambdas`, if given,
    replace them with lambdas in the log's own cost units and skip the grid refinement.
    With `cfg.encoder`, the prompts' embeddings (`embedding`, else computed here) feed the embed
    and cluster candidates; the policy keeps them only if some (state, tier) chooses one of
    those by out-of-fold loss, and only then does its artifact need the encoder.
    `simultaneous=False` tests each point's do-no-harm check alone (the rule before the max-t
    threshold; kept for measuring what the threshold costs and buys).
    """
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

    folds = fold_of(ladder.row_ids, cfg.folds)
    encoder, emb_fits, embed_seconds = None, None, 0.0
    if cfg.encoder:
        encoder = describe(cfg.encoder)
        if embedding is None:
            enc = get_encoder(cfg.encoder)
            before = enc.seconds
            embedding = enc.embed(ladder.prompts)
            embed_seconds = enc.seconds - before
        emb_fits = fit_embedding(np.asarray(embedding, np.float32), quality.T, folds, cfg.seed)
    obs = observe_all(ladder, embedding if cfg.encoder else None)
    featurizer = StateFeaturizer.fit(obs)
    u = row_hash(ladder.row_ids)
    log(f"features: {time.perf_counter() - t0:.1f}s")

    predictors, q_by_state, metrics, choices = {}, {}, [], []
    for k, state in enumerate(all_states(n)):
        x = featurizer(obs, state)
        numeric = featurizer.numeric_columns(state, list(ladder.prompt_num), list(ladder.output_num))
        predictors[state], q_by_state[state], chosen = fit_state(
            x, quality.T, folds, cfg, seed=cfg.seed + k, numeric=numeric,
            dense=featurizer.dense_columns(state),
            embedding=featurizer.embedding_columns(state) if cfg.encoder else None, emb_fits=emb_fits)
        choices += [{"state": list(state)} | c for c in chosen]
        for t in range(n):
            metrics.append({"state": list(state), "tier": t, "observed": t in state,
                            "model": chosen[t]["model"],
                            "auc": auc(q_by_state[state][:, t], quality[t]),
                            "ece": ece(q_by_state[state][:, t], quality[t])})
    log(f"predictors for {len(predictors)} states: {time.perf_counter() - t0:.1f}s")
    embeddings = None
    if encoder is not None:
        readers = sum(h in EMBEDDING_HEADS for p in predictors.values() for h in p.heads)
        embeddings = {"encoder": encoder, "heads_reading": readers,
                      "heads": sum(len(p.heads) for p in predictors.values()),
                      "seconds": embed_seconds, "rows": N}
        if not readers:               # measured no better anywhere: the artifact needs no encoder
            predictors = {s: p.without_embedding(featurizer.width(s)) for s, p in predictors.items()}
            featurizer.embedding_dim = 0
            encoder = None

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
    log(f"dynamic programme for {len(results)} lambdas: {time.perf_counter() - t0:.1f}s")

    # Out of sample: each point refitted without each fold and run on it (nested in the
    # predictors' own cross-fitting), then checked against the fixed-tier hull at its cost.
    held = held_out(results, q_by_state, plen, quality, cost, folds, u)
    hull = FixedHull(quality, cost)
    # Every fixed tier is a point too, not only the tiers of the calibration rows' hull: on a few
    # hundred rows two tiers of near-equal quality can swap places, and a policy whose points
    # miss the tier that is really on the hull is worse than the fixed tiers it was to beat.
    fixed = [] if user_lambdas is not None else [hull.run((t, t, 0.0), u) for t in range(n)]
    for res, t in zip(fixed, range(n)):
        res.point = OperatingPoint(lam=float("nan"), betas={}, mix=(t, t, 0.0))
    # The frontier keeps each point that beats its mix on its own test; the default, which a job
    # runs unless told otherwise and which is chosen among the points, only from those that beat
    # theirs all at once (see default_candidates).
    crit = simultaneous_threshold([advantage(oos, hull)[0] for oos in held], no_harm_confidence,
                                  seed=cfg.seed) if simultaneous else None
    checked = [no_harm(res, oos, hull, u, no_harm_confidence) for res, oos in zip(results, held)]
    for res, _ in checked:
        res.point.check["default_threshold"] = crit
    fallbacks, swept = sum(r.point.mix is not None for r, _ in checked), len(checked)
    if fixed:        # a point that fell back to a single tier is that fixed tier's point already
        checked = [(r, o) for r, o in checked if r.point.mix is None or r.point.mix[0] != r.point.mix[1]]
    seen = set()     # and two points that fell back to the same mix are one point
    checked = [(r, o) for r, o in checked
               if r.point.mix is None or not (r.point.mix in seen or seen.add(r.point.mix))]
    results = [r for r, _ in checked] + fixed
    held = [o for _, o in checked] + fixed
    for res, oos in zip(results, held):
        res.point.cal_cost = float(oos.cost.mean() * cost_unit)
        res.point.cal_quality = float(oos.quality.mean() * q_span + q_lo)
    log(f"out-of-sample check: {fallbacks} of {swept} points fall back to a fixed-tier mix: "
        f"{time.perf_counter() - t0:.1f}s")

    budget_choice = None
    cands = default_candidates(list(zip(results, held)), crit, hull, u)
    for res, oos in cands:
        res.point.cal_cost = float(oos.cost.mean() * cost_unit)
        res.point.cal_quality = float(oos.quality.mean() * q_span + q_lo)
    c_res, c_held = [r for r, _ in cands], [o for _, o in cands]
    if budget is not None:
        budget_choice, default = choose_budget(c_res, c_held, quality, cost, best, budget.kind,
                                               budget.target, budget.confidence)
    elif user_lambdas is not None:
        default = results[0]
    else:
        # without a budget: the cheapest point keeping 99% of the best tier's quality at 95%
        _, default = choose_budget(c_res, c_held, quality, cost, best, "quality", 0.99, 0.95)
    by_id = {id(r): o for r, o in [*zip(results, held), *cands]}
    points = _spread(list(zip(results, held)), REPLAY_POINTS)
    points += [(r, o) for r, o in zip(results, held)
               if r.point.mix is not None and r.point.check is None]    # the fixed tiers
    if all(default is not r for r, _ in points):
        points.append((default, by_id[id(default)]))
    points = sorted({id(r): (r, o) for r, o in points}.values(), key=lambda ro: ro[1].cost.mean())
    for k, (res, _) in enumerate(points):     # cheapest first; the index keeps labels unique
        res.point.label = _label(k, res.point, cost_unit)

    policy = Policy(
        n_tiers=n, models=ladder.models, schema={"prompt_text": list(ladder.prompt_text),
                                                 "prompt_num": list(ladder.prompt_num),
                                                 "output_num": list(ladder.output_num)},
        featurizer=featurizer, predictors=predictors, points=[r.point for r, _ in points],
        default_label=default.point.label, cost_unit=cost_unit, quality_offset=q_lo,
        quality_span=q_span, best_tier=best, train_config=cfg, encoder=encoder,
    )
    report = CalibrationReport(
        seconds=time.perf_counter() - t0, rows=N, tier_quality=(mean_q * q_span + q_lo).tolist(),
        tier_cost=mean_c.tolist(), best_tier=best, predictor_metrics=metrics,
        model_choice=choices,
        points=[{"label": r.point.label, "lambda": r.point.lam / cost_unit,
                 "cost": r.point.cal_cost, "quality": r.point.cal_quality,
                 "mix": None if r.point.mix is None else list(r.point.mix),
                 "check": r.point.check,
                 # selection shares on the calibration rows: the baseline for drift checks
                 "shares": [float(np.mean(r.final_tier == t)) for t in range(n)]}
                for r, _ in points],
        budget=None if budget_choice is None else vars(budget_choice) | {"label": default.point.label},
        no_harm_confidence=no_harm_confidence, embeddings=embeddings,
    )
    policy.calibration = vars(report)
    return policy, report


def default_candidates(pairs: list[tuple[DPResult, DPResult]], threshold: float | None,
                       hull: "FixedHull", u: np.ndarray) -> list[tuple[DPResult, DPResult]]:
    """The points the default may be chosen from: the fixed tiers and mixes, and the cascade
    points whose studentised held-out advantage over their mix clears `threshold` (the max-t
    bound over every point tested; None: all); a cascade point that does not stands in by its
    mix. The frontier keeps every point that passed its own test: a user who picks one sees its
    check; the default is what runs unasked, so it must survive the choice among many."""
    if threshold is None:
        return pairs
    mixes = {r.point.mix: (r, o) for r, o in pairs if r.point.mix is not None}
    out = []
    for r, o in pairs:
        if r.point.mix is not None or r.point.check["t"] > threshold:
            out.append((r, o))
            continue
        mix = tuple(r.point.check["mix"])
        if mix not in mixes:
            ran = hull.run(mix, u)
            ran.point = OperatingPoint(lam=r.point.lam, betas={}, mix=mix,
                                       check={**r.point.check, "fallback": True})
            mixes[mix] = (ran, ran)
        out.append(mixes[mix])
    return list({id(r): (r, o) for r, o in out}.values())


def _label(k: int, point: OperatingPoint, cost_unit: float) -> str:
    if point.mix is None:
        return f"p{k:02d} lambda={point.lam / cost_unit:.6g}"
    a, b, w = point.mix
    return f"p{k:02d} tier={a}" if w == 0 or a == b else f"p{k:02d} mix={a}:{b}@{w:.4f}"


def held_out(results: list[DPResult], q_by_state: dict, plen: np.ndarray, quality: np.ndarray,
             cost: np.ndarray, folds: np.ndarray, u: np.ndarray) -> list[DPResult]:
    """Per point, each row's outcome under the point refitted without the row's fold: the
    dynamic programme's cross-fitting, nested in the predictors' (whose out-of-fold predictions
    it reads). Returned as DPResults whose cost and quality are the held-out ones."""
    n, N = quality.shape
    fin = np.full((len(results), N), -1)
    paid = np.zeros((len(results), N))
    got = np.zeros((len(results), N))
    for f in range(int(folds.max()) + 1):
        tr, te = folds != f, folds == f
        if not tr.any() or not te.any():
            continue
        q_tr = {s: q[tr] for s, q in q_by_state.items()}
        q_te = {s: q[te] for s, q in q_by_state.items()}
        proj = {}
        for s, q in q_tr.items():
            basis = phi(q, plen[tr])
            proj[s] = (basis, ridge_projector(basis))
        for i, res in enumerate(results):
            point = backward_induction(q_tr, plen[tr], quality[:, tr], cost[:, tr], res.point.lam,
                                       proj, paths=False).point
            out = simulate(point, q_te, plen[te], quality[:, te], cost[:, te], u[te])
            fin[i, te], paid[i, te], got[i, te] = out.final_tier, out.cost, out.quality
    return [DPResult(r.point, fin[i], [], paid[i], got[i]) for i, r in enumerate(results)]


class FixedHull:
    """The fixed tiers' quality/cost hull on the calibration rows, and mixes of its tiers."""

    def __init__(self, quality: np.ndarray, cost: np.ndarray):
        self.quality, self.cost = quality, cost
        mc, mq = cost.mean(1), quality.mean(1)
        hull = upper_hull(mc, mq)
        self.costs = hull[:, 0]
        self.tiers = [int(np.flatnonzero(np.isclose(mc, c) & np.isclose(mq, q))[0]) for c, q in hull]

    def mix_at(self, target: float) -> tuple[int, int, float]:
        """(a, b, w): the mix of adjacent hull tiers whose mean cost is `target` (clamped)."""
        if target <= self.costs[0] or len(self.tiers) == 1:
            return self.tiers[0], self.tiers[0], 0.0
        if target >= self.costs[-1]:
            return self.tiers[-1], self.tiers[-1], 0.0
        i = int(np.searchsorted(self.costs, target)) - 1
        w = float((target - self.costs[i]) / (self.costs[i + 1] - self.costs[i]))
        if w < 1e-6 or w > 1 - 1e-6:                  # at a vertex: that tier alone
            t = self.tiers[i] if w < 0.5 else self.tiers[i + 1]
            return t, t, 0.0
        return self.tiers[i], self.tiers[i + 1], round(w, 6)

    def expected(self, mix) -> tuple[np.ndarray, np.ndarray]:
        """Per row, the mix's expected (cost, quality) (w of tier b, 1 - w of tier a)."""
        a, b, w = mix
        return ((1 - w) * self.cost[a] + w * self.cost[b],
                (1 - w) * self.quality[a] + w * self.quality[b])

    def run(self, mix, u: np.ndarray) -> DPResult:
        """The mix as run: each row to one tier by its row hash."""
        pick = mix_pick(mix, u)
        rows = np.arange(len(u))
        return DPResult(None, pick, [], self.cost[pick, rows], self.quality[pick, rows])


def advantage(oos: DPResult, hull: FixedHull) -> tuple[np.ndarray, tuple[int, int, float]]:
    """Per calibration row, a point's held-out quality minus that of the fixed-tier mix at the
    point's held-out mean cost; and that mix."""
    mix = hull.mix_at(float(oos.cost.mean()))
    return oos.quality - hull.expected(mix)[1], mix


def simultaneous_threshold(diffs: list[np.ndarray], confidence: float, boot: int = 400,
                           seed: int = 0) -> float:
    """The critical t for keeping points so that, with probability `confidence`, no kept point
    is one that does not beat its fixed-tier mix: the one-sided max-t (Westfall-Young) bound
    over all the points tested at once.

    Every point's per-row advantage d_p is studentised, t_p = mean(d_p) / se(d_p). Resampling
    the calibration rows (one bootstrap draw serves all points, so their correlation - points
    of nearby lambdas decide alike on most rows - is kept), the centred statistics
    t*_p = (mean*(d_p) - mean(d_p)) / se(d_p) show how far the largest of P noise-only
    advantages reaches; the `confidence` quantile of max_p t*_p is the threshold. One point alone
    gives the normal quantile (0.67 at 75%); many independent points on few rows push it up (to
    2.26 for 24 independent points), many near-identical ones barely move it. Never below the
    single-point quantile."""
    from scipy.stats import norm

    z = float(norm.ppf(confidence))
    d = np.asarray([x for x in diffs if len(x) > 1], dtype=np.float64)
    if not len(d):
        return z
    n = d.shape[1]
    se = d.std(axis=1, ddof=1) / np.sqrt(n)
    live = se > 0                          # a point identical to its mix on every row tests nothing
    if not live.any():
        return z
    d, se = d[live], se[live]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=boot).astype(np.float64)
    t_star = ((counts @ d.T) / n - d.mean(axis=1)) / se       # (boot, points)
    return max(z, float(np.quantile(t_star.max(axis=1), confidence)))


def no_harm(res: DPResult, oos: DPResult, hull: FixedHull, u: np.ndarray,
            confidence: float) -> tuple[DPResult, DPResult]:
    """Keep a cascade point only if, out of sample, it beats the fixed-tier mix at its cost with
    at least `confidence`: its studentised paired advantage t above the normal quantile
    (one-sided). Otherwise the point becomes that mix. Returns the (in-sample, held-out) results
    of what is kept."""
    from scipy.stats import norm

    d, mix = advantage(oos, hull)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("inf")
    adv = float(d.mean())
    t = adv / se if se > 0 else (np.inf if adv > 0 else -np.inf)
    sure = float(norm.cdf(t))
    crit = float(norm.ppf(confidence))
    check = {"advantage": adv, "se": se, "confidence_better": sure, "t": float(t),
             "threshold": crit, "fallback": not t > crit, "mix": list(mix)}
    res.point.check = check
    if not check["fallback"]:
        return res, oos
    ran = hull.run(mix, u)           # no fitted part: its held-out outcome is the same run
    ran.point = OperatingPoint(lam=res.point.lam, betas={}, mix=mix, check=check)
    return ran, ran


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


def _spread(pairs: list[tuple[DPResult, DPResult]], k: int) -> list[tuple[DPResult, DPResult]]:
    """k (result, held-out) pairs spread evenly over held-out mean cost (all if fewer)."""
    ordered = sorted(pairs, key=lambda ro: ro[1].cost.mean())
    if len(ordered) <= k:
        return ordered
    costs = np.array([o.cost.mean() for _, o in ordered])
    targets = np.linspace(costs[0], costs[-1], k)
    chosen, used = [], set()
    for t in targets:
        order = np.argsort(np.abs(costs - t))
        i = next((int(i) for i in order if int(i) not in used), None)
        if i is not None:
            used.add(i)
            chosen.append(ordered[i])
    return chosen
