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
import os
import tempfile
import time
import traceback
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa

from jobs import failpoints

log = logging.getLogger(__name__)
SQL = Path(__file__).resolve().parent.parent / "sql" / "finalize.sql"


class _Part:
    """The unit results with rows in one part's input positions [start, end), held for the
    part. DuckDB gets their columns but the lineage, as one stream; each tier's run of a row is
    in that tier's result (column _t<tier>), and `lineage` gathers a row's runs, in tier order,
    into the output's `tiers` list. The lineage is most of a row's bytes and does not go through
    DuckDB, whose conversion of nested columns in and out cost more than the rest of finalize."""

    def __init__(self, store, files: list[str], start: int, end: int):
        from jobs.inputs import LINEAGE_NAME
        from jobs.job import result_tier
        from jobs.units import tier_column

        self.tables = [store.read_arrow(f) for f in files]
        tiers = [result_tier(f) for f in files]
        pos = np.concatenate([t.column("_row").to_numpy() for t in self.tables])
        tier = np.repeat(np.asarray(tiers, np.int64), [t.num_rows for t in self.tables])
        self.records = pa.concat_arrays([c for t, k in zip(self.tables, tiers)
                                         for c in t.column(tier_column(k)).chunks])
        inside = np.flatnonzero((pos >= start) & (pos < end))
        self.order = inside[np.lexsort((tier[inside], pos[inside]))]    # by position, then tier
        self.offsets = np.zeros(end - start + 1, np.int64)
        np.cumsum(np.bincount(pos[inside] - start, minlength=end - start), out=self.offsets[1:])
        self.start = start
        first = self.tables[0].schema.remove_metadata()
        self.schema = pa.schema([f for f in first if not LINEAGE_NAME.fullmatch(f.name)])

    def reader(self) -> pa.RecordBatchReader:
        names = self.schema.names

        def batches():
            for t in self.tables:
                for b in t.select(names).to_batches():
                    yield pa.RecordBatch.from_arrays(b.columns, schema=self.schema)

        return pa.RecordBatchReader.from_batches(self.schema, batches())

    def lineage(self, lo: int, hi: int) -> pa.ListArray:
        """The `tiers` lists of input positions lo..hi-1: each row's runs in tier order."""
        a, b = lo - self.start, hi - self.start
        values = self.records.take(pa.array(self.order[self.offsets[a]:self.offsets[b]]))
        return pa.ListArray.from_arrays(pa.array((self.offsets[a:b + 1] - self.offsets[a]).astype(np.int32)),
                                        values)


def _write_part(store, rel: str, reader: pa.RecordBatchReader, part: _Part, start: int, end: int,
                job_id: str):
    """Stream one part's sorted rows to Parquet with their lineage, checking that their input
    positions run start, start+1, ... end-1: no row missing, none twice."""
    import pyarrow.parquet as pq

    writer, seen = None, start
    with store.fs.open(store.path(rel), "wb") as f:
        for batch in reader:
            pos = batch.column("_row").to_numpy()
            expect = np.arange(seen, seen + len(pos))
            if len(pos) and not np.array_equal(pos, expect):
                i = int(np.argmax(pos != expect))
                raise RuntimeError(f"job {job_id}: input row {pos[i]} has more than one final row"
                                   if pos[i] < expect[i] else
                                   f"job {job_id}: input row {expect[i]} has no final row")
            if not len(pos):
                continue
            seen += len(pos)
            tiers = part.lineage(int(pos[0]), int(pos[-1]) + 1)
            run = pa.ListArray.from_arrays(tiers.offsets, tiers.values.field("tier"))
            table = pa.Table.from_batches([batch]).drop_columns(["_row"])
            at = table.column_names.index("tiers")
            table = table.set_column(at, "tiers", tiers).add_column(at, "tiers_run", run)
            if writer is None:
                writer = pq.ParquetWriter(f, table.schema, compression="zstd")
            writer.write_table(table)
        if seen != end:
            raise RuntimeError(f"job {job_id}: input row {seen} has no final row "
                               f"({seen - start} final rows for input rows {start}..{end - 1})")
        writer.close()
        if store.local:                     # finished.json must never name a torn part
            f.flush()
            os.fsync(f.fileno())


def write_results(job) -> int:
    """Write results/part-*.parquet: exactly one row per input row, in input order. Part by
    part: each covers a range of input positions and reads only the unit results with rows in
    it (their span is in each result's metadata), so memory is bounded by a part,
    not by the job. Checked as it goes: the positions in each part must run without a gap or a
    repeat. Returns the number of parts."""
    import duckdb

    store = job.store
    files = store.glob("tiers/*/*.arrow")
    spans = [(m["span"], f) for f in files if (m := store.arrow_meta(f)).get("span")]
    lo = np.array([s[0][0] for s in spans], dtype=np.int64)
    hi = np.array([s[0][1] for s in spans], dtype=np.int64)
    spill = tempfile.TemporaryDirectory(prefix="cascade-finalize-")
    con = duckdb.connect(config={"memory_limit": "512MB", "threads": 1, "temp_directory": spill.name})
    con.execute("SET VARIABLE tier_names = ?", [[t.name for t in job.spec.tiers]])
    con.execute("SET VARIABLE policy_version = ?", [job.meta["policy_version"]])
    con.execute("SET VARIABLE job_id = ?", [job.id])
    query = SQL.read_text()
    rows, step = job.meta["rows"], max(job.spec.shard_rows * 16, 65536)
    tmp = f"results.tmp-{uuid.uuid4().hex[:8]}"
    store.makedirs(tmp)
    part = 0
    try:
        for start in range(0, rows, step):
            end = min(start + step, rows)
            picked = [spans[i][1] for i in np.flatnonzero((lo < end) & (hi >= start))]
            if not picked:
                raise RuntimeError(f"job {job.id}: input rows {start}..{end - 1} have no final row")
            held = _Part(store, picked, start, end)
            con.register("unit_results", held.reader())
            con.execute("SET VARIABLE lo = ?", [start])
            con.execute("SET VARIABLE hi = ?", [end])
            _write_part(store, f"{tmp}/part-{part:05d}.parquet",
                        con.sql(query).to_arrow_reader(16384), held, start, end, job.id)
            del held
            part += 1
            failpoints.hit("during_finalize")
    except BaseException:
        store.remove(tmp)
        raise
    finally:
        con.close()
        spill.cleanup()
    old = f"results.old-{uuid.uuid4().hex[:8]}"
    if store.exists("results"):
        store.fs.mv(store.path("results"), store.path(old), recursive=True)
    store.fs.mv(store.path(tmp), store.path("results"), recursive=True)
    store.remove(old)
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
