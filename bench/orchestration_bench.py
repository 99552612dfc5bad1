"""Orchestration cost without models: N rows through three tiers served by the scripted
test-double engine on the embedded executor, at the spec's default shard_rows 256: sharding,
per-row features and decisions, write-once commits, state transitions, coalescing, finalize.
Prints rows/s, the seconds in finalize, peak RSS, and the bytes of job state written per unit
(everything the job writes except its final results/): constant per unit means the job's
coordination cost does not grow with the job. Also the main thread's CPU seconds and the
background writer's (jobs.storage.WriteBehind) busy seconds, files per sync, and how long units
waited for it: which of the two bounds the run.

    .venv/bin/python bench/orchestration_bench.py [--rows 100000] [--shard 256]
    .venv/bin/python bench/orchestration_bench.py --rows 100000 --rows 1000000   # both, compared
    .venv/bin/python bench/orchestration_bench.py --profile      # where the time goes, per stage

Each size runs in a fresh process, so peak RSS is that size's own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_input(rows: int) -> Path:
    """The input, written by the parent so that the measured process holds only the job."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    work = Path(tempfile.mkdtemp(prefix="orch-bench-"))
    pq.write_table(pa.table({"prompt": [f"question {i} w{i % 97}" for i in range(rows)],
                             "reference": ["x"] * rows}), work / "in.parquet")
    return work


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) // 1024


def one(work: Path, rows: int, shard: int) -> dict:
    from jobs import finalize, storage
    from jobs.embedded import run_embedded
    from jobs.spec import parse_spec
    from tests.doubles import scripted_factory

    spec = parse_spec({
        "name": "orch", "input": str(work / "in.parquet"), "output": str(work / "job"),
        "shard_rows": shard,
        "tiers": [{"name": t, "model": "m", "engine": "scripted", "cost": {"per_token": 1 + 2 * i}}
                  for i, t in enumerate(("a", "b", "c"))],
        "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}})
    spent = {"finalize": 0.0}
    original = finalize.write_results

    def timed(job):
        t = time.perf_counter()
        spent["rss_before_finalize"] = _rss_mib()
        try:
            return original(job)
        finally:
            spent["finalize"] += time.perf_counter() - t

    finalize.write_results = timed
    writer = {}
    close = storage.WriteBehind.close

    def closing(wb):                     # the background writer's own counters, at its end
        close(wb)
        writer.update(wb.stats)

    storage.WriteBehind.close = closing
    t0, cpu0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
    job = run_embedded(spec, engine_factory=scripted_factory())
    total, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
    proc = time.process_time() - proc0
    state_bytes, units = 0, 0
    for sub in ("routed", "work", "tiers"):
        for p in (work / "job" / sub).rglob("*.arrow"):
            state_bytes += p.stat().st_size
            units += sub == "tiers"               # one committed result per unit run
    state_bytes += sum(p.stat().st_size for p in (work / "job").glob("*.json"))
    status = json.loads((work / "job" / "finished.json").read_text())["status"]
    return {"rows": rows, "shard": shard, "units": units, "seconds": round(total, 2),
            "rows_per_s": round(rows / total), "finalize_s": round(spent["finalize"], 2),
            "us_per_row": round(1e6 * total / rows, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_finalize_mib": spent["rss_before_finalize"],
            "state_bytes_per_unit": round(state_bytes / units),
            "state_bytes_per_row": round(state_bytes / rows, 1),
            "rows_per_tier": [t["rows_done"] for t in status["tiers"]], "job": job.id,
            "main_cpu_s": round(cpu, 2), "process_cpu_s": round(proc, 2),
            "cpus": len(os.sched_getaffinity(0)), "writer_busy_s": round(writer["busy_s"], 2),
            "writer_waited_s": round(writer["waited_s"], 2),
            "files_per_group": round(writer["files"] / max(writer["groups"], 1), 2)}


def machine_speed() -> float:
    """Seconds a fixed pure-Python loop takes: this VM's speed drifts by tens of percent between
    runs and days, so figures from different runs compare only through it (or alternated A/B)."""
    t, total = time.perf_counter(), 0
    for i in range(3_000_000):
        total += i
    return time.perf_counter() - t


def profile(rows: int, shard: int):
    """Where the time goes: wall seconds in each stage of the job (timers around the functions,
    which distort far less than a profiler), in total and per call, in one process."""
    import collections
    import functools

    from jobs import finalize, storage, submit, units, workfiles
    from tests import doubles

    spent, calls = collections.Counter(), collections.Counter()

    def timed(owner, name, label):
        f = getattr(owner, name)

        @functools.wraps(f)
        def wrapper(*a, **kw):
            t = time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                spent[label] += time.perf_counter() - t
                calls[label] += 1

        setattr(owner, name, wrapper)

    stages = [  # (owner, function, label), nested stages indented
        (submit, "submit", "submit (read and check input, write shards)"),
        (units, "run_units", "run_units (a batch of units of a tier, to their commits)"),
        (units, "answer", "  answer a unit (read its rows, engine calls)"),
        (doubles.ScriptedEngine, "generate", "    the scripted engine double's generate"),
        (doubles.ScriptedEngine, "count_tokens", "    the scripted engine double's count_tokens"),
        (units, "decide_units", "  decide a batch (features, decisions, result tables)"),
        (units, "write_result", "  write_result (Arrow IPC, handed to the writer)"),
        (units, "commit", "  commit (state transition, cuts)"),
        (workfiles, "materialize", "    materialize a cut unit (gather its rows, write)"),
        (finalize, "write_results", "finalize"),
        (storage.Store, "write_arrow", "every Arrow IPC write"),
        (storage.Store, "read_arrow", "every Arrow IPC read"),
    ]
    for owner, name, label in stages:
        timed(owner, name, label)
    work = make_input(rows)
    try:
        r = one(work, rows, shard)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{rows:,} rows, {r['units']:,} units: {r['seconds']:.2f} s, main-thread CPU {r['main_cpu_s']} s; "
          f"a 3M-step Python loop takes {machine_speed():.2f} s on this machine now")
    for _, _, label in stages:
        if calls[label]:
            print(f"  {label:<62} {spent[label]:6.2f} s  {calls[label]:6,} calls  "
                  f"{1e3 * spent[label] / calls[label]:8.3f} ms each  "
                  f"{1e3 * spent[label] / r['units']:7.3f} ms per unit run")


def report(r: dict):
    print(f"{r['rows']:>9,} rows, shard {r['shard']}, {r['units']:,} units: {r['seconds']:.1f} s "
          f"= {r['rows_per_s']:,} rows/s ({r['us_per_row']} us/row), finalize {r['finalize_s']} s, "
          f"peak RSS {r['peak_rss_mib']} MiB ({r['rss_before_finalize_mib']} MiB before finalize), "
          f"job state written {r['state_bytes_per_unit']:,} bytes/unit ({r['state_bytes_per_row']} bytes/row); rows per tier {r['rows_per_tier']}; "
          f"main thread CPU {r['main_cpu_s']} s, whole process {r['process_cpu_s']} s on {r['cpus']} CPU(s); background writer busy {r['writer_busy_s']} s "
          f"({r['files_per_group']} files per sync), units waited {r['writer_waited_s']} s for it")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, action="append")
    ap.add_argument("--shard", type=int, default=256)
    ap.add_argument("--profile", action="store_true",
                    help="time the stages of one size and print where the time goes, per call")
    ap.add_argument("--pin", action="store_true",
                    help="run each measured process on one CPU only (sched_setaffinity), so that "
                         "the background writer's and the kernel's work for it share that core")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pin:                          # inherited by the measured child processes
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    sizes = args.rows or [100_000]
    if args.one:
        print(json.dumps(one(Path(args.one), sizes[0], args.shard)))
        return
    if args.profile:
        profile(sizes[0], args.shard)
        return
    print(f"this machine: a 3M-step Python loop takes {machine_speed():.2f} s")
    results, works = [], []
    try:
        for rows in sizes:
            # Every size's files stay until the end: on a filesystem that delays reusing freed
            # inodes (ext4 without a journal, as on this VM, scans past every inode freed in the
            # last minutes for each file it creates), deleting one run's files would slow the next.
            works.append(work := make_input(rows))
            out = subprocess.run([sys.executable, __file__, "--one", str(work), "--rows", str(rows),
                                  "--shard", str(args.shard)], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode:
                sys.exit(out.stderr[-2000:])
            results.append(r := json.loads(out.stdout.strip().splitlines()[-1]))
            report(r)
    finally:
        for work in works:
            shutil.rmtree(work, ignore_errors=True)
    if len(results) > 1:
        a, b = results[0], results[-1]
        print(f"per-row time {b['rows']:,} vs {a['rows']:,}: {b['us_per_row'] / a['us_per_row']:.2f}x; "
              f"peak RSS {b['peak_rss_mib'] / a['peak_rss_mib']:.2f}x; state bytes per unit "
              f"{b['state_bytes_per_unit'] / a['state_bytes_per_unit']:.2f}x")


if __name__ == "__main__":
    main()
