"""Two nights of one corpus through `cascade run` with a shared answer store: night 2 holds 90% of
night 1's rows and 10% new ones. Prints each night's wall time, what it paid, what reuse saved,
and how many tier runs the engine computed. Three tiers served by the scripted test-double
engine with a delay per engine call (CASCADE_SCRIPTED_DELAY, default 0.05 s), so engine time is
part of the figure as it is on real models.

    .venv/bin/python bench/nightly_bench.py [--rows 20000] [--overlap 0.9] [--delay 0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--overlap", type=float, default=0.9)
    ap.add_argument("--delay", type=float, default=0.05)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cascade-nightly-"))
    n, keep = args.rows, int(args.rows * args.overlap)
    ids = [f"r{i}" for i in range(n)]
    prompts = [f"item {i} w{i}" for i in range(n)]
    (work / "in").mkdir()
    pl.DataFrame({"id": ids, "prompt": prompts}).write_parquet(work / "in" / "2026-12-01.parquet")
    new = n - keep
    pl.DataFrame({"id": ids[:keep] + [f"s{i}" for i in range(new)],
                  "prompt": prompts[:keep] + [f"fresh {i} v{i}" for i in range(new)]}
                 ).write_parquet(work / "in" / "2026-12-02.parquet")
    spec = {"name": "nightly", "input": str(work / "in" / "{date}.parquet"),
            "output": str(work / "nightly" / "{date}"), "answers": str(work / "answers"),
            "tiers": [{"name": t, "model": "scripted", "engine": "scripted", "cost": {"per_token": c}}
                      for t, c in (("small", 1), ("mid", 3), ("big", 10))],
            "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}}
    (work / "nightly.yaml").write_text(json.dumps(spec))
    env = {**os.environ, "CASCADE_PLUGINS": "tests.doubles", "CASCADE_SCRIPTED_DELAY": str(args.delay),
           "PYTHONPATH": str(ROOT)}
    print(f"{n:,} rows a night, night 2 = {args.overlap:.0%} of night 1's rows + {new:,} new; "
          f"scripted engine, {args.delay} s per engine call")
    figures = []
    for day in ("2026-12-01", "2026-12-02"):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "jobs.cli", "run", str(work / "nightly.yaml"),
                        "--date", day, "--quiet"], cwd=ROOT, env=env, check=True,
                       stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        out = pl.read_parquet(f"{work}/nightly/{day}/results/*.parquet")
        runs = out.select(pl.col("tiers").explode()).unnest("tiers")
        figures.append({"day": day, "wall": wall, "paid": out["cost"].sum(), "saved": out["saved_cost"].sum(),
                        "computed": int((~runs["reused"]).sum()), "reused": int(runs["reused"].sum())})
        f = figures[-1]
        print(f"night {day}: {f['wall']:.1f} s wall, paid {f['paid']:,.0f}, saved {f['saved']:,.0f}; "
              f"tier runs computed {f['computed']:,}, reused {f['reused']:,}")
    one, two = figures
    print(f"night 2 against night 1: wall {two['wall'] / one['wall']:.2f}x, paid "
          f"{two['paid'] / one['paid']:.3f}x, engine runs {two['computed'] / one['computed']:.3f}x")
    subprocess.run(["rm", "-rf", str(work)], check=False)


if __name__ == "__main__":
    main()
