"""The README's decision-quality table: `cascade eval` (30% calibration / 70% test by row hash)
on the four shared ladders and on the live ladder this project made (examples/live/logs.parquet,
bench/live_ladder.py), one markdown row each.

    .venv/bin/python bench/ladders_bench.py [--online] [LOGS.parquet ...]

Columns: gain over the fixed-tier hull (relative to the oracle) with its 95% bootstrap interval;
cost at 99% of the best tier's quality (fraction of its cost) for the policy (with interval), the
fixed-tier mix, the FrugalGPT-style cascade and the oracle; the default point's cost and quality
against the best tier; how many cascade points fell back to a fixed-tier mix; the predictors
chosen per (state, tier); with --online, the regret slope of online learning. --models sets the
predictor candidates (as `calibrate --models`), e.g. to add the boosted trees.
"""

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared" / "data" / "logged"
LADDERS = [SHARED / f"{n}.parquet" for n in ("mmlu_pro_llama31_mixtral", "mmlu_pro_llama3_base",
                                              "alpaca_eval_llama2chat", "routellm_gsm8k")]
LADDERS.append(ROOT / "examples" / "live" / "logs.parquet")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("logs", nargs="*")
    ap.add_argument("--online", action="store_true")
    ap.add_argument("--models", help="predictor candidates (calibrate --models), e.g. "
                                     "prior,monotone,linear,gbt,mlp; default: calibrate's")
    args = ap.parse_args()
    from cascade.evaluate import evaluate
    from cascade.ladder import load_ladder
    from cascade.predictor import TrainConfig

    def f(x):
        return "never" if x == float("inf") else f"{x:.3f}"

    print("| ladder | rows (cal/test) | gain [95%] | cost at 99%: policy [95%] | fixed mix | FrugalGPT | oracle "
          "| default point cost / quality vs best | fell back | predictors chosen" + (" | regret slope" if args.online else "") + " |")
    print("|---" * (10 + args.online) + "|")
    for path in [Path(p) for p in args.logs] or LADDERS:
        if not path.exists():
            print(f"skipped {path}: not found", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        cfg = TrainConfig(models=tuple(args.models.split(","))) if args.models else None
        s = evaluate(load_ladder(path, require_quality=True), online=args.online, cfg=cfg).summary
        b, c = s["bootstrap"], s["cost_at_99pct_of_best_quality"]
        d = s["default_point_test"]
        kinds = Counter(m["model"].split(":")[0] for m in s["model_choice"])
        pts = s["no_harm"]["points"]
        fell = sum(p["kind"] == "fixed-tier mix" for p in pts)
        cascade = sum(p["kind"] != "fixed tier" for p in pts)
        name = f"{path.parent.name}/{path.stem}" if path.stem == "logs" else path.stem
        print(f"| {name} ({len(s['tiers'])} tiers) | {s['rows']['calibration']}/{s['rows']['test']} "
              f"| {s['gain']:.3f} [{b['gain'][0]:.3f}, {b['gain'][1]:.3f}] "
              f"| {f(c['policy'])} [{f(b['policy_cost_at_99pct'][0])}, {f(b['policy_cost_at_99pct'][1])}] "
              f"| {f(c['fixed'])} | {f(c['frugalgpt'])} | {f(c['oracle'])} "
              f"| {d['cost_vs_best']:.3f} / {d['quality_vs_best']:.3f} | {fell} of {cascade} "
              f"| {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}"
              + (f" | {s['online'].get('loglog_slope', float('nan')):.2f}" if args.online else "") + " |", flush=True)
        print(f"  {path.stem}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
