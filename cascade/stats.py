"""Paired significance tests for per-row comparisons of two methods on the same rows."""

from __future__ import annotations

import numpy as np
from scipy import stats


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes."""
    a, b = a > 0.5, b > 0.5
    n01, n10 = int(np.sum(~a & b)), int(np.sum(a & ~b))
    if n01 + n10 == 0:
        return 1.0
    return float(stats.binomtest(n10, n01 + n10, 0.5).pvalue)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, n: int = 2000) -> float:
    """Two-sided bootstrap p-value for mean(a - b) = 0."""
    d = a - b
    if np.allclose(d, 0):
        return 1.0
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(n)])
    frac = min(np.mean(means <= 0), np.mean(means >= 0))
    return float(min(1.0, 2 * max(frac, 1 / n)))


def cohens_d_paired(a: np.ndarray, b: np.ndarray) -> float:
    """d_z: mean of the paired differences over their standard deviation."""
    d = a - b
    sd = d.std(ddof=1)
    return float(d.mean() / sd) if sd > 0 else 0.0


def compare(policy_q, policy_c, base_q, base_c, rng) -> dict:
    """Quality and cost of the policy against one baseline on the same rows."""
    binary = np.isin(policy_q, (0.0, 1.0)).all() and np.isin(base_q, (0.0, 1.0)).all()
    p_q = mcnemar_exact(policy_q, base_q) if binary else paired_bootstrap(policy_q, base_q, rng)
    p_c = float(stats.ttest_rel(policy_c, base_c).pvalue) if not np.allclose(policy_c, base_c) else 1.0
    return {
        "quality_policy": float(policy_q.mean()), "quality_baseline": float(base_q.mean()),
        "quality_diff": float(policy_q.mean() - base_q.mean()),
        "quality_test": "McNemar exact" if binary else "paired bootstrap",
        "quality_p": p_q, "quality_d": cohens_d_paired(policy_q, base_q),
        "cost_policy": float(policy_c.mean()), "cost_baseline": float(base_c.mean()),
        "cost_reduction": float(1 - policy_c.mean() / base_c.mean()) if base_c.mean() > 0 else 0.0,
        "cost_test": "paired t-test", "cost_p": p_c if np.isfinite(p_c) else 1.0,
        "cost_d": cohens_d_paired(policy_c, base_c),
    }


def bonferroni(rows: list[dict], keys=("quality_p", "cost_p"), alpha: float = 0.05) -> list[dict]:
    m = len(rows)
    for r in rows:
        for k in keys:
            r[k + "_bonferroni"] = min(1.0, r[k] * m)
            r[k.replace("_p", "") + "_significant"] = r[k] * m < alpha
    return rows
