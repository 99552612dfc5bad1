"""An offline simulation of online learning, measured as regret on rows streamed from a logged
ladder (jobs do not refit while they run; this measures what doing so from audits would earn).

The learner starts knowing nothing. Every row it serves either follows its current policy or,
with probability `audit` (default 2%), is audited: every tier runs and the row's quality labels
become known (a reference check). During a warm-up the first `warmup` rows are all audited.
The policy is refitted on all audited rows at doubling checkpoints. Before its first fit it runs
every tier and keeps the last tier's answer. Audits and warm-up are paid for in its reward.

Regret after T rows = sum over those rows of (reward of the best static policy in hindsight -
reward of the learner), reward = quality - lambda * cost of the tiers run. The best static
policy in hindsight is the policy calibrated with full information on every row the stream
draws from, at the same lambda. The slope of log regret against log T says how regret grows:
1 is linear (no learning), 0.5 is sqrt(T).
"""

from __future__ import annotations

import numpy as np

from cascade.calibrate import fit_policy
from cascade.ladder import Ladder
from cascade.runtime import replay, spent

CHECKPOINTS = (100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)


def _rewards(policy, ladder: Ladder, lam: float) -> np.ndarray:
    d = replay(policy, ladder.without_labels())
    rows = np.arange(len(ladder))
    return ladder.quality[d["final_tier"].to_numpy(), rows] - lam * spent(d["tiers_run"], rows, ladder.cost)


def online_regret(pool: Ladder, lam: float, *, max_t: int = 100_000, audit: float = 0.02,
                  warmup: int = 200, seed: int = 0, log=lambda m: None) -> dict:
    """Stream `max_t` rows drawn with replacement from `pool`; lambda in the log's cost units.
    Regret is defined at one lambda, so a missing one (a fixed-tier operating point has none) is
    refused rather than carried as NaN through every reward."""
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"online regret needs a finite lambda >= 0 (the quality/cost trade of "
                         f"the rewards it compares); got {lam}")
    rng = np.random.default_rng(seed)
    n = pool.n_tiers
    stream = rng.integers(0, len(pool), max_t)
    audited = (np.arange(max_t) < warmup) | (rng.random(max_t) < audit)

    hindsight, _ = fit_policy(pool, user_lambdas=[lam])
    best_static = _rewards(hindsight, pool, lam)

    everything = pool.quality[n - 1] - lam * pool.cost.sum(0)     # audit: all tiers, keep last
    reward = np.empty(max_t)
    policy, start, fits = None, 0, []
    checkpoint = warmup
    while start < max_t:
        end = min(max_t, checkpoint)
        idx = np.arange(start, end)
        rows = stream[idx]
        if policy is None:
            reward[idx] = everything[rows]
        else:
            uniq, inv = np.unique(rows, return_inverse=True)
            reward[idx] = _rewards(policy, pool.subset(uniq), lam)[inv]
        reward[idx[audited[idx]]] = everything[rows[audited[idx]]]
        start = end
        if start >= max_t:
            break
        seen = np.unique(stream[:start][audited[:start]])
        if len(seen) >= 50 and pool.quality[:, seen].std() > 0:
            policy, _ = fit_policy(pool.subset(seen), user_lambdas=[lam])
            fits.append({"after_rows": int(start), "audited_rows": int(len(seen))})
            log(f"online: refit after {start} rows on {len(seen)} audited rows")
        checkpoint *= 2

    gap = best_static[stream] - reward
    cum = np.cumsum(gap)
    table = [{"T": t, "regret": float(cum[t - 1]), "mean_regret_per_row": float(cum[t - 1] / t)}
             for t in CHECKPOINTS if t <= max_t]
    ts = np.array([r["T"] for r in table], float)
    rs = np.array([r["regret"] for r in table])
    ok = rs > 0
    slope = float(np.polyfit(np.log(ts[ok]), np.log(rs[ok]), 1)[0]) if ok.sum() >= 2 else float("nan")
    return {"lambda": lam, "audit_share": audit, "warmup_rows": warmup, "table": table,
            "loglog_slope": slope, "refits": fits,
            "best_static_mean_reward": float(best_static[stream].mean()),
            "learner_mean_reward": float(reward.mean())}
