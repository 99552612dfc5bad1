"""The demo with a calibrated policy instead of a threshold, end to end on the two real CPU
models, printing every figure the README quotes for it:

1. the calibration job (examples/demo/calibrate.yaml: 200 labelled rows, both tiers on every row),
2. `cascade logs` of it, `cascade calibrate` on those logs (predictor AUC per tier printed),
3. the demo job (examples/demo/job.yaml) with `policy: {artifact: ...}`,
4. from its results: rows started on each tier, rows that ran tier 0, rows that kept tier 0's
   answer, quality (the reports' scorer) and cost, against every demo row on gemma-3-270m
   (measured by a run of the demo spec whose rule escalates every row).

    .venv/bin/python examples/demo/artifact_demo.py        # or: make demo-artifact
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def cascade(*args: str):
    subprocess.run([str(ROOT / ".venv" / "bin" / "cascade"), *args], cwd=ROOT, check=True)


def main():
    import yaml

    from jobs.report import replay_logs, run_all

    runs = ROOT / "runs"
    if not (runs / "demo-calibration" / "finished.json").exists():
        cascade("run", "examples/demo/calibrate.yaml", "--overwrite", "--quiet")
    cascade("logs", "runs/demo-calibration", "--out", "runs/demo-logs.parquet")
    cascade("calibrate", "runs/demo-logs.parquet", "--out", "runs/demo-policy")
    spec = yaml.safe_load((ROOT / "examples/demo/job.yaml").read_text())
    spec.update(name="demo-artifact", output="runs/demo-artifact",
                policy={"artifact": "runs/demo-policy"})
    (runs / "demo-artifact.yaml").write_text(yaml.safe_dump(spec))
    cascade("run", "runs/demo-artifact.yaml", "--overwrite", "--quiet")

    import polars as pl

    out = pl.read_parquet(runs / "demo-artifact" / "results" / "*.parquet")
    starts = dict(out["tiers_run"].list.first().value_counts(sort=False).sort(by="tiers_run").iter_rows())
    ran0 = int(out["tiers_run"].list.contains(0).sum())
    kept0 = int((out["final_tier"] == 0).sum())
    quality = [r for r in run_all(str(runs / "demo-artifact"))["quality"][1] if r[0] == "overall"][0][5]
    # every demo row on gemma alone: the demo spec with a rule that escalates every row
    spec.update(name="demo-all", output="runs/demo-all", policy={"rule": {"feature": "choice_prob",
                                                                           "threshold": 1.01}})
    (runs / "demo-all.yaml").write_text(yaml.safe_dump(spec))
    cascade("run", "runs/demo-all.yaml", "--overwrite", "--quiet")
    both = replay_logs(str(runs / "demo-all"))
    g = both.filter(pl.col("tier") == 1)
    print(f"artifact job: {len(out)} rows; started per tier {starts}; ran tier 0 on {ran0}, "
          f"kept tier 0's answer on {kept0}")
    print(f"artifact job: quality {quality:.3f}, cost {out['cost'].sum():.0f} "
          f"({out['cost'].mean():.1f} per row)")
    print(f"the same rows, every row on gemma-3-270m: quality {g['quality'].mean():.3f}, "
          f"cost {g['cost'].mean():.1f} per row; artifact job cost per row / that = "
          f"{out['cost'].mean() / g['cost'].mean():.2f}")


if __name__ == "__main__":
    main()
