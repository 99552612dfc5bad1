"""Finalize: the job's results/ from its units' results, as a step of its own.

Whoever commits the last unit is told to finalize (the state moves the job to `finalizing`, with
a lease); if that worker dies, the lease expires and the reconciler finalizes again. Finalize is
idempotent: the parts are written to a fresh directory that replaces results/ at the end, then
finished.json marks the job done. A failure is recorded (state, `cascade status`, and
finalize_error.json) and retried with backoff up to the spec's max_attempts.

DuckDB does the work out of core (filtering terminal rows, joining them to their lineage,
sorting by input position); the rows stream to Parquet parts, so memory does not grow with the
job.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import pyarrow as pa

from jobs import failpoints

log = logging.getLogger(__name__)
SQL = Path(__file__).resolve().parent.parent / "sql" / "finalize.sql"


def write_results(job) -> int:
    """Write results/part-*.parquet (exactly one row per input row, in input order). Returns the
    number of parts."""
    import duckdb
    import pyarrow.dataset as ds

    store = job.store
    files = store.glob("tiers/*/*.arrow")
    fs = None
    if not store.local:
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        fs = PyFileSystem(FSSpecHandler(store.fs))
    unit_results = ds.dataset([store.path(f) for f in files], format="ipc", filesystem=fs)
    con = duckdb.connect(config={"memory_limit": "1GB", "threads": 1,
                                 "temp_directory": tempfile.mkdtemp(prefix="cascade-finalize-")})
    con.register("unit_results", unit_results)
    rows = job.meta["rows"]
    n, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM unit_results "
                              "WHERE next_tier IS NULL").fetchone()
    if n != rows or distinct != n:
        raise RuntimeError(f"job {job.id}: {n} terminal rows ({distinct} distinct) for {rows} "
                           f"input rows")
    con.execute("SET VARIABLE tier_names = ?", [[t.name for t in job.spec.tiers]])
    con.execute("SET VARIABLE policy_version = ?", [job.meta["policy_version"]])
    con.execute("SET VARIABLE job_id = ?", [job.id])
    reader = con.sql(SQL.read_text()).to_arrow_reader(65536)
    tmp = f"results.tmp-{uuid.uuid4().hex[:8]}"
    step = max(job.spec.shard_rows * 16, 131072)
    pending, size, part = [], 0, 0

    def flush():
        nonlocal pending, size, part
        store.write_table(f"{tmp}/part-{part:05d}.parquet", pa.Table.from_batches(pending))
        pending, size, part = [], 0, part + 1
        failpoints.hit("during_finalize")

    for batch in reader:
        pending.append(batch)
        size += batch.num_rows
        if size >= step:
            flush()
    if pending:
        flush()
    store.remove("results")
    store.fs.mv(store.path(tmp), store.path("results"), recursive=True)
    return part


def run(job, state) -> str:
    """Finalize (idempotent); record success or failure in the state and the job directory.
    Returns the job's state after it."""
    from jobs.control import live_status

    try:
        parts = write_results(job)
        st = live_status(job, state)
        st["state"] = "done"
        job.store.write_json("finished.json", {"finished": time.time(), "parts": parts, "status": st})
        job.store.remove("finalize_error.json")
        state.finalized()
        return "done"
    except Exception as exc:
        from jobs.units import backoff

        err = f"{type(exc).__name__}: {exc}"
        log.error("finalize of job %s failed: %s", job.id, err)
        after = state.finalize_failed(err, time.time() + backoff(state.job()["finalize_attempts"] + 1))
        job.store.write_json("finalize_error.json", {"error": err, "at": time.time(), "state": after,
                                                     "traceback": traceback.format_exc()})
        return after
