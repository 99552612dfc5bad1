"""Choose the demo's escalation threshold from a calibration job in which both tiers answered
every row (examples/demo/calibrate.yaml). For every candidate threshold on tier 0's confidence
FEATURE (default choice_prob: the probability of its answer over the two labels) it computes, from the job's results, the cascade's quality (normalised label
match) and cost; it prints the frontier and picks the cheapest threshold whose quality reaches
TARGET (default 0.9) of tier 1's quality, the budget mode of `cascade calibrate` in miniature.
The `above mix` column is the cascade's quality minus what a random mix of the two fixed tiers
gets at the same cost: where it is negative, cascading does not pay on this pair.

    .venv/bin/python examples/demo/pick_threshold.py runs/demo-calibration [TARGET] [FEATURE]
"""

import sys
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from jobs.report import replay_logs  # noqa: E402  (the same rows and scorer as `cascade logs`)


def main(job_dir: str, target: str = "0.9", feature: str = "choice_prob"):
    target = float(target)
    logs = replay_logs(job_dir)
    t0, t1 = (logs.filter(pl.col("tier") == t).sort("row_id") for t in (0, 1))
    fl, c0, c1 = t0[feature].to_numpy(), t0["cost"].to_numpy(), t1["cost"].to_numpy()
    q0, q1 = t0["quality"].to_numpy(), t1["quality"].to_numpy()
    n = len(fl)
    fixed0, fixed1 = (c0.mean(), q0.mean()), ((c1).mean(), q1.mean())
    slope = (fixed1[1] - fixed0[1]) / (fixed1[0] - fixed0[0])
    print(f"{n} rows. tier 0 alone: quality {fixed0[1]:.3f} cost/row {fixed0[0]:.1f}; "
          f"tier 1 alone: quality {fixed1[1]:.3f} cost/row {fixed1[0]:.1f}")
    best, best_mix = None, None
    print(f"{'threshold':>10} {'escalated':>9} {'quality':>8} {'cost/row':>9} {'vs tier1 cost':>13} {'above mix':>9}")
    for th in np.quantile(fl, np.linspace(0.05, 0.95, 19)):
        esc = fl < th
        q = np.where(esc, q1, q0).mean()
        c = (c0 + esc * c1).mean()
        gain = q - (fixed0[1] + slope * (c - fixed0[0]))
        print(f"{th:10.3f} {esc.mean():9.2f} {q:8.3f} {c:9.1f} {c / fixed1[0]:13.2f} {gain:9.3f}")
        if q >= target * fixed1[1] and (best is None or c < best[3]):
            best = (gain, th, q, c)
        if best_mix is None or gain > best_mix[0]:
            best_mix = (gain, th, q, c)
    if best is None:
        print(f"no threshold reaches {target:.0%} of tier 1's quality")
    else:
        print(f"chosen threshold {best[1]:.3f}: the cheapest reaching {target:.0%} of tier 1's quality: "
              f"quality {best[2]:.3f} at {best[3] / fixed1[0]:.2f} of tier 1's cost")
    print(f"furthest above the fixed-tier mix: threshold {best_mix[1]:.3f}, {best_mix[0]:+.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
