"""Choose the demo's escalation threshold from a calibration job in which both tiers answered
every row (examples/demo/calibrate.yaml). For every candidate threshold on tier 0's first-token
log-probability it computes, from the job's results, the cascade's quality (normalised label
match) and cost; it prints the frontier and picks the threshold that lies furthest above the
straight line between the two fixed tiers (the quality a random mix of the fixed tiers would
get at the same cost): the point where the cascade adds most over mixing.

    .venv/bin/python examples/demo/pick_threshold.py runs/demo-calibration
"""

import sys

import duckdb
import numpy as np


def main(job_dir: str):
    rows = duckdb.sql(f"""
        SELECT tiers[1].first_logprob AS fl, tiers[1].cost AS c0, tiers[2].cost AS c1,
               trim(regexp_replace(lower(tiers[1].response), '[^a-z]+', ' ', 'g')) = reference AS q0,
               trim(regexp_replace(lower(tiers[2].response), '[^a-z]+', ' ', 'g')) = reference AS q1
        FROM read_parquet('{job_dir}/results/*.parquet') WHERE len(tiers) = 2
    """).fetchnumpy()
    fl, c0, c1 = rows["fl"], rows["c0"], rows["c1"]
    q0, q1 = rows["q0"].astype(float), rows["q1"].astype(float)
    n = len(fl)
    fixed0, fixed1 = (c0.mean(), q0.mean()), ((c1).mean(), q1.mean())
    slope = (fixed1[1] - fixed0[1]) / (fixed1[0] - fixed0[0])
    print(f"{n} rows. tier 0 alone: quality {fixed0[1]:.3f} cost/row {fixed0[0]:.1f}; "
          f"tier 1 alone: quality {fixed1[1]:.3f} cost/row {fixed1[0]:.1f}")
    best = None
    print(f"{'threshold':>10} {'escalated':>9} {'quality':>8} {'cost/row':>9} {'vs tier1 cost':>13} {'above mix':>9}")
    for th in np.quantile(fl, np.linspace(0.05, 0.95, 19)):
        esc = fl < th
        q = np.where(esc, q1, q0).mean()
        c = (c0 + esc * c1).mean()
        gain = q - (fixed0[1] + slope * (c - fixed0[0]))
        print(f"{th:10.3f} {esc.mean():9.2f} {q:8.3f} {c:9.1f} {c / fixed1[0]:13.2f} {gain:9.3f}")
        if best is None or gain > best[0]:
            best = (gain, th, q, c)
    print(f"chosen threshold {best[1]:.3f}: quality {best[2]:.3f} at {best[3] / fixed1[0]:.2f} of tier 1's cost")


if __name__ == "__main__":
    main(*sys.argv[1:])
