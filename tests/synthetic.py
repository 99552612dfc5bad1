"""Synthetic ladders in the replay format whose optimal policies are known by construction."""

from __future__ import annotations

import numpy as np
import polars as pl

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()


def two_tier(n_rows: int, seed: int, c0: float = 0.1, c1: float = 1.0) -> tuple[pl.DataFrame, np.ndarray]:
    """Tier 0 is right with probability p (a prompt-level number the policy can read), tier 1 is
    always right. Returns (logs, p). With reward q - lambda*cost the optimum is closed-form:
    if p >= 1 - lambda*(c1 - c0) run tier 0 and stop, else start at tier 1 (never both);
    value E[max(p - lambda c0, 1 - lambda c1)].
    """
    rng = np.random.default_rng(seed)
    p = rng.random(n_rows)
    right0 = rng.random(n_rows) < p
    rows = []
    for i in range(n_rows):
        prompt = " ".join(rng.choice(WORDS, 8)) + "?"
        rid = f"s{seed}-{i}"
        # the output says nothing about whether it is right: only p does
        rows.append((rid, 0, "small", prompt, "The answer is (B).", float(right0[i]), c0, p[i]))
        rows.append((rid, 1, "large", prompt, "The answer is (B).", 1.0, c1, p[i]))
    cols = ["row_id", "tier", "model", "prompt", "output", "quality", "cost", "difficulty"]
    return pl.DataFrame(rows, schema=cols, orient="row"), p


def three_tier(n_rows: int, seed: int, useless_middle: bool = True) -> pl.DataFrame:
    """A ladder where a latent difficulty drives every tier. Each row has a hidden gold label;
    a right tier says it, a wrong one says the other, so no single output reveals its own
    correctness but agreement between tiers does. With `useless_middle`, tier 1 repeats tier 0's
    answer at three times the cost, so a good policy never runs it. Outputs carry a logged,
    noisy confidence (`mean_logprob`)."""
    rng = np.random.default_rng(seed)
    d = rng.random(n_rows)
    acc = [np.clip(1.1 - d, 0, 1), np.clip(1.3 - d, 0, 1), np.clip(1.6 - d, 0, 1)]
    cost = [0.1, 0.3, 1.0]
    rows = []
    for i in range(n_rows):
        prompt = " ".join(rng.choice(WORDS, 6 + int(10 * d[i])))
        gold = rng.choice(["yes", "no"])
        right = [rng.random() < acc[t][i] for t in range(3)]
        if useless_middle:
            right[1] = right[0]
        for t in range(3):
            conf = float(np.clip(acc[t][i] + rng.normal(0, 0.15), 0, 1))
            ans = gold if right[t] else ("no" if gold == "yes" else "yes")
            rows.append((f"r{i}", t, f"m{t}", prompt, f"answer is {ans}", float(right[t]),
                         cost[t] * (1 + 0.1 * rng.random()), conf, "cat" + str(int(d[i] * 3))))
    return pl.DataFrame(rows, orient="row", schema=["row_id", "tier", "model", "prompt", "output",
                                                    "quality", "cost", "mean_logprob", "category"])


def keeps_earlier(n_rows: int, seed: int) -> pl.DataFrame:
    """A 3-tier ladder on which the optimal policy starts some rows above tier 0, skips tier 1,
    and sometimes keeps tier 0's answer after running tier 2. `easy` rows: tier 0 is right 70% of
    the time; tier 2 is right exactly when its logged confidence (`mean_logprob`, uniform on
    [-0.55, -0.05], the range the scripted engine double produces) is above -0.3, so it is worth
    running, and when it turns out unsure, tier 0's answer is the better one to keep. `hard` rows:
    tier 0 is nearly always wrong, so they start at tier 2. Tier 1 repeats tier 0 at a high cost
    (never worth running)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_rows):
        hard = rng.random() < 0.3
        prompt = " ".join(rng.choice(WORDS, 8))
        gold = rng.choice(["yes", "no"])
        right0 = rng.random() < (0.05 if hard else 0.7)
        conf = [rng.uniform(-0.55, -0.05) for _ in range(3)]
        right = [right0, right0, conf[2] > -0.3]
        for t in range(3):
            ans = gold if right[t] else ("no" if gold == "yes" else "yes")
            rows.append((f"k{i}", t, f"m{t}", prompt, f"answer is {ans}", float(right[t]),
                         (0.1, 0.6, 0.2)[t], conf[t], "hard" if hard else "easy"))
    return pl.DataFrame(rows, orient="row", schema=["row_id", "tier", "model", "prompt", "output",
                                                    "quality", "cost", "mean_logprob", "category"])


def confidence_ladder(n_rows: int, seed: int) -> pl.DataFrame:
    """Two tiers where one logged number says it all: tier 0 is right with probability
    sigmoid(3 (logprob + 1)) of its own `logprob` (a token log-probability; 5% of them -inf, 5%
    missing), its text is noise; tier 1 is right 85% of the time at ten times the cost."""
    rng = np.random.default_rng(seed)
    lp = -rng.exponential(1.0, n_rows)
    right0 = rng.random(n_rows) < 1 / (1 + np.exp(-3 * (lp + 1)))
    logged = lp.copy()
    logged[rng.random(n_rows) < 0.05] = -np.inf          # an impossible token: surely wrong...
    right0[np.isneginf(logged)] = False
    missing = rng.random(n_rows) < 0.05
    rows = []
    for i in range(n_rows):
        prompt = " ".join(rng.choice(WORDS, 8))
        rid = f"c{seed}-{i}"
        rows.append((rid, 0, "small", prompt, " ".join(rng.choice(WORDS, 3)), float(right0[i]), 0.1,
                     None if missing[i] else float(logged[i])))
        rows.append((rid, 1, "large", prompt, " ".join(rng.choice(WORDS, 3)),
                     float(rng.random() < 0.85), 1.0, float(-rng.exponential(0.3))))
    return pl.DataFrame(rows, orient="row", schema={
        "row_id": pl.String, "tier": pl.Int32, "model": pl.String, "prompt": pl.String,
        "output": pl.String, "quality": pl.Float64, "cost": pl.Float64, "logprob": pl.Float64})


def band_ladder(n_rows: int, seed: int) -> pl.DataFrame:
    """Two tiers where tier 0 is right only when the prompt's logged `difficulty` lies in a
    middle band (0.3, 0.7) (90% there, 15% elsewhere): a signal no monotone or linear map of it
    can use, which trees can; tier 1 is right 85% of the time at ten times the cost."""
    rng = np.random.default_rng(seed)
    difficulty = rng.random(n_rows)
    band = (difficulty > 0.3) & (difficulty < 0.7)
    right0 = rng.random(n_rows) < np.where(band, 0.9, 0.15)
    rows = []
    for i in range(n_rows):
        prompt = " ".join(rng.choice(WORDS, 8))
        rid = f"b{seed}-{i}"
        for tier, model, right, cost in ((0, "small", right0[i], 0.1),
                                         (1, "large", rng.random() < 0.85, 1.0)):
            rows.append((rid, tier, model, prompt, " ".join(rng.choice(WORDS, 3)), float(right), cost,
                         float(difficulty[i])))
    return pl.DataFrame(rows, orient="row", schema={
        "row_id": pl.String, "tier": pl.Int32, "model": pl.String, "prompt": pl.String,
        "output": pl.String, "quality": pl.Float64, "cost": pl.Float64, "difficulty": pl.Float64})


def noise_ladder(n_rows: int, seed: int) -> pl.DataFrame:
    """Three tiers whose outcomes nothing logged predicts: prompts and outputs are random words,
    quality is an independent coin per tier (0.55, 0.6, 0.8 at costs 0.1, 0.5, 1). No policy can
    beat mixing fixed tiers here; one that overfits its calibration rows does worse."""
    rng = np.random.default_rng(seed)
    acc, cost = (0.55, 0.6, 0.8), (0.1, 0.5, 1.0)
    rows = []
    for i in range(n_rows):
        prompt = " ".join(rng.choice(WORDS, 10))
        for t in range(3):
            rows.append((f"n{seed}-{i}", t, f"m{t}", prompt, " ".join(rng.choice(WORDS, 4)),
                         float(rng.random() < acc[t]), cost[t] * (1 + 0.05 * rng.random()),
                         float(rng.normal())))
    return pl.DataFrame(rows, orient="row", schema=["row_id", "tier", "model", "prompt", "output",
                                                    "quality", "cost", "mean_logprob"])
