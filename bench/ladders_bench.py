"""The README's decision-quality tables: `cascade eval` (30% calibration / 70% test by row hash)
on the four shared ladders and on the live ladder this project made (examples/live/logs.parquet,
bench/live_ladder.py), one markdown row each; then the small-sample harm table.

    .venv/bin/python bench/ladders_bench.py [--online] [--only ladders|small-sample] [LOGS.parquet ...]
    .venv/bin/python bench/ladders_bench.py --only small-sample [--sizes 100,200,400] [--draws 20]

Ladder table columns: gain over the fixed-tier hull (relative to the oracle) with its 95% bootstrap
interval; cost at 99% of the best tier's quality (fraction of its cost) for the policy (with
interval), the fixed-tier mix, the FrugalGPT-style cascade and the oracle; the default point's cost
and quality against the best tier; how many cascade points fell back to a fixed-tier mix; the
predictors chosen per (state, tier); with --online, the regret slope of online learning. --models
sets the predictor candidates (as `calibrate --models`), e.g. to add the boosted trees.

Embedding table: per ladder, the same gain and cost at 99% calibrated without and with prompt
embeddings (`calibrate --embeddings`, all-MiniLM-L6-v2), and how many (state, tier) heads chose
an embedding candidate. A ladder's embeddings are cached on disk under runs/cache/embeddings
after the first run (the encoding time goes to stderr; bench/policy_bench.py prints the
encoder's cost per prompt on its own).

Small-sample table: the do-no-harm guarantee where it bites. Per ladder (and a 5-tier MMLU-Pro
ladder built from the two MMLU-Pro files) and calibration size, `--draws` random draws of that many
rows from the ladder's calibration share are calibrated on, and each policy is run on the
ladder's whole test share; the gain is as above (the policy's operating points against the
fixed-tier hull, relative to the oracle). Prints, per ladder and size, how often the gain falls
below -0.01 (harm), the median gain, and how often the default point (what a job runs unless
told otherwise) gives up more than 0.01 of quality against the fixed-tier mix at its test cost.
"""

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

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
    ap.add_argument("--only", choices=("ladders", "embeddings", "small-sample"),
                    help="print one table (default: all three)")
    ap.add_argument("--small-sample", action="store_true", help="the same as --only small-sample")
    ap.add_argument("--sizes", default="100,200,400")
    ap.add_argument("--draws", type=int, default=20)
    args = ap.parse_args()
    only = "small-sample" if args.small_sample else args.only
    paths = [Path(p) for p in args.logs] or LADDERS
    if only in (None, "ladders"):
        ladders(paths, args)
    if only in (None, "embeddings"):
        embeddings(paths)
    if only in (None, "small-sample"):
        small_sample([Path(p) for p in args.logs] or [*LADDERS, five_tier()],
                     [int(x) for x in args.sizes.split(",")], args.draws)


def name_of(path: Path) -> str:
    return f"{path.parent.name}/{path.stem}" if path.stem == "logs" else path.stem


def embeddings(paths):
    """Gain and cost at 99% of the best tier's quality without and with prompt embeddings."""
    from cascade.encoder import DEFAULT_ENCODER, get_encoder
    from cascade.evaluate import evaluate
    from cascade.ladder import load_ladder
    from cascade.predictor import TrainConfig

    def f(x):
        return "never" if x == float("inf") else f"{x:.3f}"

    print("\n| ladder | gain without embeddings [95%] | gain with [95%] | cost at 99%: without | with "
          "| heads reading the embedding |")
    print("|---" * 6 + "|")
    enc = get_encoder(DEFAULT_ENCODER)
    for path in paths:
        if not path.exists():
            print(f"skipped {path}: not found", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        ladder = load_ladder(path, require_quality=True)
        before, rows = enc.seconds, enc.rows
        enc.embed(ladder.prompts, cache_dir=ROOT / "runs" / "cache" / "embeddings")
        if enc.rows > rows:
            print(f"  {path.stem}: encoded {enc.rows - rows} prompts in {enc.seconds - before:.0f} s",
                  file=sys.stderr)
        out = []
        for cfg in (TrainConfig(), TrainConfig(encoder=DEFAULT_ENCODER)):
            out.append(evaluate(ladder, cfg=cfg, online=False).summary)
        (a, b) = out
        reading = b["embeddings"]
        print(f"| {name_of(path)} | {a['gain']:.3f} [{a['bootstrap']['gain'][0]:.3f}, {a['bootstrap']['gain'][1]:.3f}] "
              f"| {b['gain']:.3f} [{b['bootstrap']['gain'][0]:.3f}, {b['bootstrap']['gain'][1]:.3f}] "
              f"| {f(a['cost_at_99pct_of_best_quality']['policy'])} | {f(b['cost_at_99pct_of_best_quality']['policy'])} "
              f"| {reading['heads_reading']} of {reading['heads']} |", flush=True)
        print(f"  {path.stem}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def ladders(paths, args):
    from cascade.evaluate import evaluate
    from cascade.ladder import load_ladder
    from cascade.predictor import TrainConfig

    def f(x):
        return "never" if x == float("inf") else f"{x:.3f}"

    print("| ladder | rows (cal/test) | gain [95%] | cost at 99%: policy [95%] | fixed mix | FrugalGPT | oracle "
          "| default point cost / quality vs best | fell back | predictors chosen" + (" | regret slope" if args.online else "") + " |")
    print("|---" * (10 + args.online) + "|")
    for path in paths:
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
        name = name_of(path)
        print(f"| {name} ({len(s['tiers'])} tiers) | {s['rows']['calibration']}/{s['rows']['test']} "
              f"| {s['gain']:.3f} [{b['gain'][0]:.3f}, {b['gain'][1]:.3f}] "
              f"| {f(c['policy'])} [{f(b['policy_cost_at_99pct'][0])}, {f(b['policy_cost_at_99pct'][1])}] "
              f"| {f(c['fixed'])} | {f(c['frugalgpt'])} | {f(c['oracle'])} "
              f"| {d['cost_vs_best']:.3f} / {d['quality_vs_best']:.3f} | {fell} of {cascade} "
              f"| {', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))}"
              + (f" | {s['online'].get('loglog_slope', float('nan')):.2f}" if args.online else "") + " |", flush=True)
        print(f"  {path.stem}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def draw_gain(cal, test, cfg=None, **fit) -> dict:
    """A policy calibrated on `cal`, run on `test`: its gain (as `cascade eval` computes it),
    and what its default point and its kept cascade points give up against the fixed-tier mix
    at their test cost (quality; positive = worse than the mix)."""
    from cascade.calibrate import FixedHull, fit_policy
    from cascade.evaluate import per_row
    from cascade.frontier import area, oracle_hull, upper_hull
    from cascade.runtime import replay

    policy, _ = fit_policy(cal, cfg=cfg, **fit)
    results = per_row(replay(policy, test.without_labels()), test)
    mc, mq = test.cost.mean(1), test.quality.mean(1)
    best = int(np.lexsort((mc, -mq))[0])
    lo, hi = float(mc.min()), float(mc[best])
    fixed = area(upper_hull(*zip(*zip(mc, mq))), lo, hi)
    pol = area(upper_hull(*zip(*[(c.mean(), q.mean()) for c, q in results.values()])), lo, hi)
    oracle = area(oracle_hull(test.quality, test.cost), lo, hi)
    hull = FixedHull(test.quality, test.cost)

    def shortfall(label):
        c, q = results[label]
        return float(hull.expected(hull.mix_at(float(c.mean())))[1].mean() - q.mean())

    cascade = [p.label for p in policy.points if p.mix is None]
    return {"gain": (pol - fixed) / (oracle - fixed) if oracle > fixed else float("nan"),
            "default": shortfall(policy.default_label),
            "worst_kept": max([shortfall(x) for x in cascade], default=float("-inf"))}


def five_tier() -> Path:
    """A 5-tier ladder made from the two MMLU-Pro ladders (the same 12,032 questions): all five
    models, cheapest first, two of them dominated (Mixtral by Llama-3.1-8B, Llama-3-70B by
    Llama-3.1-70B): where a fixed-tier hull read off a few hundred rows is least sure. Written
    to a temporary file."""
    import tempfile

    import polars as pl

    frames = [pl.read_parquet(SHARED / f"{n}.parquet") for n in ("mmlu_pro_llama31_mixtral", "mmlu_pro_llama3_base")]
    both = pl.concat([f.drop("tier") for f in frames])
    order = both.group_by("model").agg(pl.col("cost").mean()).sort("cost")["model"].to_list()
    both = both.with_columns(pl.col("model").replace_strict(order, list(range(len(order))),
                                                            return_dtype=pl.Int32).alias("tier"))
    out = Path(tempfile.mkdtemp(prefix="cascade-ladder-")) / "mmlu_pro_5tier.parquet"
    both.sort(["row_id", "tier"]).write_parquet(out)
    return out


def small_sample(paths, sizes, draws):
    from cascade.evaluate import split
    from cascade.ladder import load_ladder

    print("\nEach cell: harmed draws (gain below -0.01) / median gain / draws whose default point "
          "is more than 0.01 of quality below the fixed-tier mix at its test cost.\n")
    print(f"| ladder | " + " | ".join(f"{n} rows" for n in sizes) + " |")
    print("|---" * (1 + len(sizes)) + "|")
    for path in paths:
        if not path.exists():
            print(f"skipped {path}: not found", file=sys.stderr)
            continue
        t0 = time.perf_counter()
        cal, test = split(load_ladder(path, require_quality=True), 0.3)
        rng = np.random.default_rng(0)
        cells = []
        for n in sizes:
            out = [draw_gain(cal.subset(rng.choice(len(cal), min(n, len(cal)), replace=False)), test)
                   for _ in range(draws)]
            gains = np.array([o["gain"] for o in out])
            default = np.array([o["default"] for o in out])
            cells.append(f"{np.mean(gains < -0.01):.0%} / {np.nanmedian(gains):.3f} / "
                         f"{np.mean(default > 0.01):.0%} of {draws}")
        print(f"| {name_of(path)} | " + " | ".join(cells) + " |", flush=True)
        print(f"  {path.stem}: {time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
