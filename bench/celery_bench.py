"""Cluster throughput without models: a 3-tier job through real Celery worker processes on a
real Redis (its own redis-server on a free port, stopped at the end), the scripted test-double
engine with no delay, so only the job system and the broker are measured.

Prints rows/s end to end (submit to done) and what coordination costs per unit: the Redis
state scripts' calls and server time per unit, from Redis's own INFO commandstats (each
transition is one atomic script), and how many times a worker rebuilt a job's state from its
directory, the one path that takes a lock (the workers' logs say so each time; 0 unless the
state was lost).

    .venv/bin/python bench/celery_bench.py [--rows 200000] [--shard 256] [--workers 4]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--shard", type=int, default=256)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq
    import redis

    import tests.doubles  # noqa: F401  (the scripted engine, for spec validation)
    from jobs import control
    from jobs.submit import submit
    from jobs.spec import parse_spec
    from tests.redis_server import free_port, start_redis_server
    from workers.celery_app import celery_dispatcher

    work = Path(tempfile.mkdtemp(prefix="celery-bench-"))
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = start_redis_server(port)
    workers = []
    try:
        client = redis.Redis.from_url(url)
        n = args.rows
        pq.write_table(pa.table({"prompt": [f"question {i} w{i % 97}" for i in range(n)],
                                 "reference": ["x"] * n}), work / "in.parquet")
        tiers = ["a", "b", "c"]
        spec = parse_spec({
            "name": "celery-bench", "input": str(work / "in.parquet"), "output": str(work / "jobs" / "job"),
            "shard_rows": args.shard,
            "tiers": [{"name": t, "model": "m", "engine": "scripted", "cost": {"per_token": 1 + 2 * i}}
                      for i, t in enumerate(tiers)],
            "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}})
        # tier 0 gets half the workers; the others split the rest (at least one each)
        serve = [tiers[0]] * max(1, args.workers - 2) + tiers[1:]
        env = {**os.environ, "CASCADE_PLUGINS": "tests.doubles", "PYTHONPATH": str(ROOT),
               "CASCADE_JOBS_ROOT": str(work / "jobs")}
        for i, t in enumerate(serve):
            workers.append(subprocess.Popen(
                [sys.executable, "-m", "jobs.cli", "worker", "--tier", t, "--broker", url,
                 "--loglevel", "WARNING", "--hostname", f"{t}-{i}@bench"],
                cwd=ROOT, env=env, stdout=open(work / f"w{i}.log", "w"), stderr=subprocess.STDOUT,
                start_new_session=True))
        time.sleep(3.0)                                  # workers up before the clock starts
        client.config_resetstat()
        t0 = time.perf_counter()
        job = submit(spec, broker=url, dispatch=celery_dispatcher(url))
        t_submit = time.perf_counter() - t0
        while control.status(job.dir)["state"] != "done":
            time.sleep(0.2)
        total = time.perf_counter() - t0
        st = control.status(job.dir)
        units = sum(s["units"] for t in st["tiers"] for s in t["states"].values())
        stats = client.info("commandstats")
        scripts = {k: v for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval")}
        calls = sum(v["calls"] for v in scripts.values())
        usec = sum(v["usec"] for v in scripts.values())
        ops = sum(v["calls"] for v in stats.values())
        print(f"{n:,} rows, shard {args.shard}, {units:,} units, {len(serve)} workers "
              f"({', '.join(serve)}), this {os.cpu_count()}-core machine: {total:.1f} s = "
              f"{n / total:,.0f} rows/s (submit {t_submit:.1f} s)")
        print(f"state scripts: {calls / units:.1f} calls/unit, mean {usec / max(calls, 1):.1f} us each "
              f"in Redis, {usec / units:.0f} us/unit; all Redis commands {ops / units:.1f}/unit")
        rebuilds = sum(p.read_text().count("no live state") for p in work.glob("w*.log"))
        print(f"state rebuilds (the only path that takes a lock, the rebuild lock): {rebuilds}")
    finally:
        for w in workers:
            if w.poll() is None:
                os.killpg(w.pid, signal.SIGKILL)
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
