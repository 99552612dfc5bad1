"""Finalize: the job's results/ from its units' results, as a step of its own.

Whoever commits the last unit is told to finalize (the state moves the job to `finalizing`, with
a lease); if that worker dies, the lease expires and the reconciler finalizes again. Finalize is
idempotent: the parts are written to a fresh directory that replaces results/ at the end, then
finished.json marks the job done. A failure is recorded (state, `cascade status`, and
finalize_error.json) and retried with backoff up to the spec's max_attempts.

Part by part (a range of input positions, _Part): Arrow picks each position's final row from
the unit results and derives what follows from its runs, DuckDB shapes the rows
(sql/finalize.sql), and they stream to a Parquet part with their lineage; memory holds one part,
whatever the size of the job.
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
import pyarrow.parquet as pq

from jobs import failpoints
from jobs.layout import EMBEDDING, LINEAGE_NAME, result_tier, tier_column
from jobs.progress import live_status
from jobs.state import backoff

log = logging.getLogger(__name__)
SQL = Path(__file__).resolve().parent.parent / "sql" / "finalize.sql"
PART_ROWS = 65536          # an output part holds at least this many rows,
PART_SHARDS = 16           # and at least this many shards' worth


class _Part:
    """One output part: the final rows of input positions [start, end), from the unit results
    with rows there. Arrow picks each position's terminal row (the one with no next tier) and
    orders them by position, checking that every position has exactly one; it gathers each
    row's runs from every tier's results (column _t<tier>) into the output's `tiers` list, and
    derives from them what the job never carried per row: the cost and seconds (sums over the
    runs), the status and error (the last run's), the answer (the run of the tier it keeps) and
    the input file (from the position). DuckDB (sql/finalize.sql) shapes the rows; the lineage
    is most of a row's bytes and does not go through it (its conversion of nested columns in
    and out cost more than the rest of finalize)."""

    def __init__(self, job, files: list[str], start: int, end: int, inputs: "_Inputs"):
        tables = [job.store.read_arrow(f) for f in files]
        tiers = [result_tier(f) for f in files]
        pos = np.concatenate([t.column("_row").to_numpy() for t in tables])
        tier = np.repeat(np.asarray(tiers, np.int64), [t.num_rows for t in tables])
        records = pa.concat_arrays([c for t, k in zip(tables, tiers)
                                    for c in t.column(tier_column(k)).chunks])
        inside = (pos >= start) & (pos < end)
        order = np.flatnonzero(inside)
        order = order[np.lexsort((tier[order], pos[order]))]         # by position, then tier
        runs = np.bincount(pos[order] - start, minlength=end - start)
        if not runs.all():
            missing = start + int(np.argmin(runs))
            raise RuntimeError(f"job {job.id}: input row {missing} has no final row")
        offsets = np.zeros(end - start + 1, np.int64)
        np.cumsum(runs, out=offsets[1:])
        values = records.take(pa.array(order))
        self.tiers = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values)

        # The terminal rows (no next tier), by position: exactly one per position.
        first = tables[0].schema.remove_metadata()
        names = [f.name for f in first if not LINEAGE_NAME.fullmatch(f.name) and f.name != EMBEDDING]
        stops = np.concatenate([t.column("next_tier").is_null().to_numpy(zero_copy_only=False)
                                for t in tables])
        pick = np.flatnonzero(stops & inside)
        pick = pick[np.argsort(pos[pick], kind="stable")]
        where = pos[pick]
        if len(where) != end - start or where[0] != start or where[-1] != end - 1 or \
                (len(where) > 1 and not (np.diff(where) == 1).all()):
            dup = np.flatnonzero(np.bincount(where - start, minlength=end - start) > 1)
            raise RuntimeError(f"job {job.id}: input row {start + int(dup[0])} has more than one "
                               f"final row" if len(dup) else
                               f"job {job.id}: {end - start - len(where)} of input rows "
                               f"{start}..{end - 1} have no final row")
        final = pa.concat_tables([t.select(names) for t in tables]).take(pa.array(pick))

        # What follows from the runs. A row's last run is the tier it stopped on.
        last = pa.array(offsets[1:] - 1)
        reused = values.field("reused").fill_null(False).to_numpy(zero_copy_only=False)
        cost = values.field("cost").to_numpy(zero_copy_only=False)
        seconds = np.where(reused, 0.0, values.field("seconds").to_numpy(zero_copy_only=False))
        saved = np.where(reused, cost, 0.0)
        cost = np.where(reused, 0.0, cost)
        kept = final.column("kept_tier").to_numpy(zero_copy_only=False)  # float, NaN: none
        run_tier = values.field("tier").to_numpy(zero_copy_only=False)
        answer = offsets[1:] - 1
        if not np.array_equal(run_tier[answer], kept):       # some keep an earlier answer
            row = np.repeat(np.arange(end - start), runs)
            hit = run_tier == kept[row]
            answer = answer.copy()
            answer[row[hit]] = np.flatnonzero(hit)
        response = values.field("response").take(pa.array(answer, mask=np.isnan(kept)))
        source = inputs.files(start, end)
        self.final = final.append_column("_cost", pa.array(np.add.reduceat(cost, offsets[:-1]))) \
            .append_column("_seconds", pa.array(np.add.reduceat(seconds, offsets[:-1]))) \
            .append_column("_saved", pa.array(np.add.reduceat(saved, offsets[:-1]))) \
            .append_column("_response", response) \
            .append_column("_status", values.field("status").take(last)) \
            .append_column("_error", values.field("error").take(last)) \
            .append_column("source_file", source)
        self.start = start

    def reader(self) -> pa.RecordBatchReader:
        return pa.RecordBatchReader.from_batches(self.final.schema, self.final.to_batches(16384))

    def lineage(self, lo: int, hi: int) -> pa.ListArray:
        """The `tiers` lists of input positions lo..hi-1: each row's runs in tier order."""
        return self.tiers.slice(lo - self.start, hi - lo)


class _Inputs:
    """The job's input files in input order (job.json's "inputs"): which one holds a position."""

    def __init__(self, job):
        inputs = job.meta["inputs"]
        self.ends = np.cumsum([n for _, n in inputs])
        self.names = pa.array([f for f, _ in inputs], pa.string())

    def files(self, start: int, end: int) -> pa.Array:
        """The input file of each position in [start, end)."""
        return self.names.take(pa.array(np.searchsorted(self.ends, np.arange(start, end), side="right")))


def _write_part(store, rel: str, reader: pa.RecordBatchReader, part: _Part, start: int, end: int,
                job_id: str):
    """Stream one part's rows, as the query shaped them, to Parquet with their lineage, checking
    that their input positions run start, start+1, ... end-1 (the query kept the order)."""
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
    import duckdb    # only finalize and reports use DuckDB: a worker that never finalizes skips it

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
    rows, step = job.meta["rows"], max(job.spec.shard_rows * PART_SHARDS, PART_ROWS)
    tmp = f"results.tmp-{uuid.uuid4().hex[:8]}"
    store.makedirs(tmp)
    part, inputs = 0, _Inputs(job)
    try:
        for start in range(0, rows, step):
            end = min(start + step, rows)
            picked = [spans[i][1] for i in np.flatnonzero((lo < end) & (hi >= start))]
            if not picked:
                raise RuntimeError(f"job {job.id}: input rows {start}..{end - 1} have no final row")
            held = _Part(job, picked, start, end, inputs)
            con.register("unit_results", held.reader())
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
    try:
        parts = write_results(job)
        st = live_status(job, state)
        st["state"] = "done"
        job.store.write_json("finished.json", {"finished": time.time(), "parts": parts, "status": st})
        job.store.remove("finalize_error.json")
        state.finalized()
        return "done"
    except Exception as exc:
        err = f"{type(exc).__name__}: {exc}"
        log.error("finalize of job %s failed: %s", job.id, err)
        after = state.finalize_failed(err, time.time() + backoff(state.job()["finalize_attempts"] + 1))
        job.store.write_json("finalize_error.json", {"error": err, "at": time.time(), "state": after,
                                                     "traceback": traceback.format_exc()})
        return after
