"""Replay and eval speed on a logged ladder: load (pivot) the log, replay every operating point
causally on the held-out rows, sum each decision's cost, the whole `cascade eval` without and
with the online-regret simulation. Calibration is timed apart (it is the same model fitting
either way). Prints the median of --repeat runs of each step.

    .venv/bin/python bench/replay_bench.py [LOGS.parquet] [--repeat 3] [--max-t 10000]

Without LOGS it uses ../shared/data/logged/mmlu_pro_llama31_mixtral.parquet.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from cascade.calibrate import fit_policy
from cascade.evaluate import evaluate, per_row, split
from cascade.ladder import load_ladder
from cascade.runtime import replay

DEFAULT = Path(__file__).resolve().parents[1].parent / "shared/data/logged/mmlu_pro_llama31_mixtral.parquet"


def timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", nargs="?", default=str(DEFAULT))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--max-t", type=int, default=10_000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    t_load, ladder = timed(lambda: load_ladder(args.logs, require_quality=True), args.repeat)
    cal, test = split(ladder)
    t0 = time.perf_counter()
    policy, _ = fit_policy(cal)
    t_fit = time.perf_counter() - t0
    print(f"{args.logs}: {len(ladder)} rows x {ladder.n_tiers} tiers; {len(test)} test rows, "
          f"{len(policy.points)} operating points")
    t_replay, decisions = timed(lambda: replay(policy, test.without_labels()), args.repeat)
    t_cost, _ = timed(lambda: per_row(decisions, test), args.repeat)
    t_eval, _ = timed(lambda: evaluate(ladder, online=False), 1)
    t_online, _ = timed(lambda: evaluate(ladder, online=True, max_t=args.max_t), 1)
    decided = len(test) * len(policy.points)
    print(f"load_ladder: {t_load:.3f} s")
    print(f"calibration (30% of rows): {t_fit:.1f} s")
    print(f"replay, every point: {t_replay:.3f} s ({decided / t_replay:,.0f} row-decisions/s)")
    print(f"per-row cost and quality of every decision: {t_cost:.3f} s")
    print(f"cascade eval without online: {t_eval:.1f} s (calibration included)")
    print(f"cascade eval with online, T <= {args.max_t:,}: {t_online:.1f} s")


if __name__ == "__main__":
    main()
