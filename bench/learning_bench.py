"""Thirty nights of a policy learning across nights (cascade/registry.py), simulated on a logged
ladder from ../shared/data/logged: each night is a fresh random sample of the ladder's rows;
night 1 has no policy and runs the safe default (every tier, the best tier's answer), so every
row joins the calibration pool; later nights run the champion, and the audited share of rows
(every tier run, as a job's audits) joins the pool. After each night a challenger is fitted on
the pool and promoted only if it beats the champion on held-out pool rows (registry.learn).

Per night it prints the champion used, the night's cost per row and quality against the
hindsight policy (calibrated on the whole ladder at the same lambda, run on the same rows), and
the utility gap (quality - lambda * normalised cost); it writes the table and a plot to --out.

    .venv/bin/python bench/learning_bench.py [--ladder mmlu_pro_llama31_mixtral] [--nights 30]
        [--rows 400] [--audit 0.1] [--lam 0.1] [--out runs/learning]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "logged"


def main():
    from cascade.calibrate import fit_policy
    from cascade.ladder import load_ladder
    from cascade.predictor import TrainConfig
    from cascade.registry import Objective, Registry, utilities
    from cascade.render import Doc, lines_png
    from cascade.runtime import replay, spent

    ap = argparse.ArgumentParser()
    ap.add_argument("--ladder", default="mmlu_pro_llama31_mixtral")
    ap.add_argument("--nights", type=int, default=30)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--audit", type=float, default=0.1)
    ap.add_argument("--lam", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/learning")
    args = ap.parse_args()

    frame = pl.read_parquet(DATA / f"{args.ladder}.parquet")
    full = load_ladder(frame, require_quality=True)
    unit = float(full.cost[-1].mean())
    lam_log = args.lam / unit
    cfg = TrainConfig(models=("prior", "monotone", "linear"))
    t0 = time.perf_counter()
    hindsight, _ = fit_policy(full, cfg=cfg, user_lambdas=[lam_log])
    print(f"{args.ladder}: {len(full):,} rows, {full.n_tiers} tiers; lambda {args.lam} per best-tier "
          f"cost; hindsight policy calibrated on every row in {time.perf_counter() - t0:.0f} s")
    reg_dir = Path(tempfile.mkdtemp(prefix="cascade-registry-"))
    reg = Registry(reg_dir, Objective(lam=args.lam))
    rng = np.random.default_rng(args.seed)
    ids = full.row_ids
    print(f"{'night':>5} {'policy':>14} {'cost/row':>9} {'quality':>8} {'hindsight cost':>15} "
          f"{'hindsight q':>12} {'utility gap':>12}  decision")
    table = []
    for night in range(1, args.nights + 1):
        rows = np.sort(rng.choice(len(full), args.rows, replace=False))
        lad = full.subset(rows)
        champion = reg.champion()
        used = reg.current() or "safe default"
        if champion is None:
            audited = np.ones(len(rows), dtype=bool)                # every row runs every tier
        else:
            audited = rng.random(len(rows)) < args.audit
        r = np.arange(len(rows))
        if champion is None:
            q, c = lad.quality[-1], lad.cost.sum(0)
        else:
            d = replay(champion, lad.without_labels())
            q = lad.quality[d["final_tier"].to_numpy(), r]
            c = spent(d["tiers_run"], r, lad.cost)
            q = np.where(audited, lad.quality[-1], q)                # audits keep the last answer
            c = np.where(audited, lad.cost.sum(0), c)
        h = replay(hindsight, lad.without_labels())
        hq = lad.quality[h["final_tier"].to_numpy(), r]
        hc = spent(h["tiers_run"], r, lad.cost)
        gap = (hq.mean() - args.lam * hc.mean() / unit) - (q.mean() - args.lam * c.mean() / unit)
        pool_rows = frame.filter(pl.col("row_id").is_in(list(ids[rows[audited]])))
        entry = reg.learn(f"night{night:03d}", pool_rows, cfg=cfg)
        decision = ("promoted " + entry["version"] if entry.get("promote") else
                    "kept (" + entry.get("reason", "") + ")")
        table.append([night, used, c.mean() / unit, q.mean(), hc.mean() / unit, hq.mean(), gap, decision])
        print(f"{night:>5} {used:>14} {c.mean() / unit:>9.3f} {q.mean():>8.3f} {hc.mean() / unit:>15.3f} "
              f"{hq.mean():>12.3f} {gap:>12.4f}  {decision}")
    gaps = np.array([t[6] for t in table])
    last = gaps[-10:]
    print(f"utility gap to hindsight: nights 1-5 mean {gaps[:5].mean():.4f}, nights "
          f"{args.nights - 9}-{args.nights} mean {last.mean():.4f} (max {last.max():.4f}); "
          f"{sum('promoted' in t[7] for t in table)} promotions; "
          f"cost per row (best tier = 1) last night {table[-1][2]:.3f} vs hindsight {table[-1][4]:.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = Doc(f"Learning across nights: {args.ladder}")
    doc.table(["night", "policy", "cost_per_row", "quality", "hindsight_cost", "hindsight_quality",
               "utility_gap", "decision"], table)
    x = [t[0] for t in table]
    doc.image("learning_utility.png", lines_png(
        x, {"utility gap to hindsight": list(gaps)}, "Utility gap to the hindsight policy by night",
        "night", "gap (quality - lambda * cost)"), "Gap to hindsight per night")
    doc.image("learning_cost.png", lines_png(
        x, {"policy": [t[2] for t in table], "hindsight": [t[4] for t in table]},
        "Cost per row by night (best tier = 1)", "night", "cost per row"), "Cost per row per night")
    doc.write(out)
    print(f"wrote {out}/report.md and its plots")
    shutil.rmtree(reg_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
