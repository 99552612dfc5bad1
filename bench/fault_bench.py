"""Fault injection at the scale of the job-state issue: a 3-tier job (default 20,000 rows, shard
256, 0.5 s per engine call) on 4 real Celery worker processes and their own redis-server, with
10 random kill -9 of workers (restarted, as a container restart policy would) and one Redis kill
with an empty restart, per seed. Prints, per seed, whether the job finished by itself (no
`resume`), its time, and whether every input row has exactly one result row.

    .venv/bin/python bench/fault_bench.py [--seeds 6] [--rows 20000] [--delay 0.5]
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one(seed: int, rows: int, delay: float) -> str:
    import polars as pl

    from jobs.submit import submit
    from tests import test_celery_redis as harness
    from tests.redis_server import free_port, start_redis_server
    from workers.celery_app import celery_dispatcher

    work = Path(tempfile.mkdtemp(prefix="fault-bench-"))
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    servers = []

    def start_redis():
        servers.append(start_redis_server(port))

    start_redis()
    tiers = [f"f{i}{uuid.uuid4().hex[:4]}" for i in range(3)]
    spec = harness.make_spec(work, rows, tiers, shard_rows=256, batch_rows=256, max_attempts=20)
    rng = random.Random(seed)
    cluster = harness.Cluster(work, url, [tiers[0], tiers[0], tiers[1], tiers[2]], delay=delay)
    t0 = time.time()
    try:
        job = submit(spec, broker=url, dispatch=celery_dispatcher(url))
        kills, redis_at = 0, rng.randint(3, 8)
        for step in range(11):
            time.sleep(rng.uniform(1, 3))
            if step == redis_at:
                servers[-1].kill()
                servers[-1].wait()
                time.sleep(1)
                start_redis()                     # empty: no queue, no job state
            else:
                cluster.kill(rng)
                kills += 1
            cluster.supervise()
        try:
            harness.wait_done(job.dir, 600, cluster.supervise)
        except AssertionError as exc:
            return f"seed {seed}: NOT finished by itself in 600 s ({exc})"
        out = pl.read_parquet(f"{job.dir}/results/*.parquet")
        exact = len(out) == rows and out["id"].is_unique().all()
        return (f"seed {seed}: finished by itself in {time.time() - t0:.0f} s after {kills} kill -9 "
                f"and a Redis restart; {len(out):,} result rows for {rows:,} input rows, "
                f"{'exactly one each' if exact else 'NOT exactly one each'}")
    finally:
        cluster.stop()
        for s in servers:
            if s.poll() is None:
                s.kill()
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=6)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--delay", type=float, default=0.5)
    args = ap.parse_args()
    results = [one(seed, args.rows, args.delay) for seed in range(1, args.seeds + 1)]
    print("\n".join(results))
    print(f"{sum('finished by itself' in r and 'exactly one each' in r for r in results)} of "
          f"{len(results)} runs finished by themselves with exactly one result row per input row")


if __name__ == "__main__":
    main()
