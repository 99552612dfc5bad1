"""Orchestration cost without models: N rows (default 100,000) through three tiers served by the
scripted test-double engine on the embedded executor: sharding, per-row features and
decisions, atomic commits, coalescing, manifest updates and finalize. Prints rows/s overall and
the seconds spent in each stage, to set against a real engine's rows/s.

    .venv/bin/python bench/orchestration_bench.py [--rows 100000] [--shard 5000]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--shard", type=int, default=5000)
    args = ap.parse_args()

    import pandas as pd

    from jobs import core
    from jobs.executor import run_embedded
    from jobs.spec import parse_spec
    from tests.doubles import scripted_factory

    work = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    n = args.rows
    pd.DataFrame({"prompt": [f"question {i} w{i % 97}" for i in range(n)],
                  "reference": ["x"] * n}).to_parquet(work / "in.parquet")
    spec = parse_spec({
        "name": "orch", "input": str(work / "in.parquet"), "output": str(work / "job"),
        "shard_rows": args.shard,
        "tiers": [{"name": t, "model": "m", "engine": "scripted"} for t in ("a", "b", "c")],
        "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}})
    timings = {"finalize": 0.0}
    original = core.finalize

    def timed_finalize(job):
        t = time.perf_counter()
        original(job)
        timings["finalize"] += time.perf_counter() - t

    core.finalize = timed_finalize
    t0 = time.perf_counter()
    job = run_embedded(spec, engine_factory=scripted_factory())
    total = time.perf_counter() - t0
    units = job.manifest()["units"].values()
    tier_rows = {t: sum(u["rows"] for u in units if u["tier"] == t) for t in range(3)}
    print(f"{n:,} rows, {len(units)} units, rows per tier {tier_rows}")
    print(f"total {total:.1f}s = {n / total:,.0f} rows/s; finalize {timings['finalize']:.1f}s; "
          f"units {sum(u.get('seconds', 0) for u in units):.1f}s (engine double included)")


if __name__ == "__main__":
    main()
