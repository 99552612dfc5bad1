"""A job's life: submit, run units on tiers, coalesce escalations, finalize; status, resume, cancel.

Job directory layout (local path or fsspec URL):
    job.json                      the validated spec, job id, broker, policy version
    manifest.json                 every unit and its state; the outbox of committed escalations
    routed/s00000.parquet         input shards, each row with the tier it starts on
    work/t1/u00000.parquet        coalesced input of a unit on tier 1 (escalated rows)
    tiers/0/s00000.parquet        the committed result of unit s00000 on tier 0
    results/part-00000.parquet    final rows, exactly one per input row

A unit is run by `run_unit(job_dir, unit_id)`, the one task function that both the Celery tier
workers and the embedded executor call. It commits its result atomically at a path fixed by
(tier, unit), then, under the manifest lock, records it and cuts units for later tiers from the
outbox once enough rows wait for a tier (or nothing more can arrive for it). Running a unit twice
leaves one result and enqueues its escalations once.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
import zlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs import manifest as mf
from jobs.decide import make_policy
from jobs.inputs import read_inputs
from jobs.spec import JobSpec
from jobs.storage import Store

log = logging.getLogger(__name__)
Dispatch = Callable[[str, list[dict]], None]     # (job_dir, units) -> None


class Job:
    """A job directory opened for reading or running."""

    def __init__(self, job_dir: str):
        self.dir = job_dir
        self.store = Store(job_dir)
        if not self.store.exists("job.json"):
            raise FileNotFoundError(f"{job_dir}: not a job directory (no job.json)")
        meta = self.store.read_json("job.json")
        self.meta = meta
        self.id = meta["job_id"]
        self.broker = meta.get("broker")
        self.spec = JobSpec.from_dict(meta["spec"])
        self._policy = None

    @property
    def policy(self):
        if self._policy is None:
            self._policy = make_policy(self.spec)
        return self._policy

    def lock(self):
        return mf.job_lock(self.store, self.id, self.broker)

    def manifest(self) -> dict:
        return mf.load(self.store)


# ---------------------------------------------------------------- submit

def submit(spec: JobSpec, *, broker: str | None = None, dispatch: Dispatch | None = None,
           overwrite: bool = False) -> Job:
    """Validate the input, write shards and the manifest, and enqueue the first units."""
    table = read_inputs(spec.input)
    store = Store(spec.output)
    if store.exists("job.json"):
        if not overwrite:
            raise FileExistsError(f"{spec.output}: a job already lives here; `cascade resume` it, or "
                                  f"pass --overwrite to start again")
        store.remove("")
    store.makedirs()
    job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
    store.write_json("job.json", {"job_id": job_id, "spec": spec.to_dict(), "broker": broker,
                                  "created": time.time(), "rows": table.num_rows,
                                  "policy_version": spec.policy.version(),
                                  "columns": table.column_names})
    job = Job(spec.output)
    manifest = {"job_id": job_id, "state": "running", "units": {}, "outbox": {},
                "rows": table.num_rows, "created": time.time()}
    n = spec.shard_rows
    for k, start in enumerate(range(0, table.num_rows, n)):
        shard = table.slice(start, n)
        first = job.policy.start(shard)
        shard = shard.append_column("trace", pa.array(["[]"] * shard.num_rows, pa.string()))
        shard = shard.append_column("next_tier", pa.array(first, pa.int32()))
        name = f"routed/s{k:05d}.parquet"
        store.write_table(name, shard)
        manifest["outbox"][f"s{k:05d}"] = {"file": name, "targets": _targets(first)}
    with job.lock():
        mf.save(store, manifest)
        new = _cut_units(job, manifest)
        mf.save(store, manifest)
    if dispatch:
        dispatch(job.dir, new)
    return job


def _targets(next_tiers) -> dict:
    vals, counts = np.unique(np.asarray([t for t in next_tiers if t is not None], dtype=np.int64),
                             return_counts=True)
    return {str(int(v)): int(c) for v, c in zip(vals, counts)}


# ---------------------------------------------------------------- coalescing

def _open_below(manifest: dict, tier: int) -> bool:
    """Can rows still arrive for `tier`? True while a unit of an earlier tier is unfinished or
    an outbox entry still holds rows for an earlier tier."""
    for u in manifest["units"].values():
        if u["tier"] < tier and u["state"] != "done":
            return True
    for src in manifest["outbox"].values():
        if any(int(t) < tier for t in src["targets"]):
            return True
    return False


def _cut_units(job: Job, manifest: dict) -> list[dict]:
    """Cut new units from the outbox, lowest tier first. Tier 0 takes each routed shard as is;
    later tiers gather rows from many sources until `batch_rows` wait, or flush what is left
    once nothing more can arrive. Returns the new units (already recorded as queued)."""
    spec, store = job.spec, job.store
    new = []
    for tier in range(len(spec.tiers)):
        pending = [(sid, src) for sid, src in manifest["outbox"].items() if str(tier) in src["targets"]]
        if not pending:
            continue
        target = spec.shard_rows if tier == 0 else spec.coalesce_rows
        groups, acc, size = [], [], 0
        for sid, src in pending:
            acc.append(sid)
            size += src["targets"][str(tier)]
            if size >= target or tier == 0:
                groups.append(acc)
                acc, size = [], 0
        if acc and not _open_below(manifest, tier):
            groups.append(acc)
        for group in groups:
            k = sum(1 for u in manifest["units"].values() if u["tier"] == tier)
            uid = group[0] if tier == 0 else f"t{tier}-u{k:05d}"
            if tier == 0:
                file = manifest["outbox"][group[0]]["file"]
                nrows = manifest["outbox"][group[0]]["targets"]["0"]
            else:
                parts = []
                for sid in group:
                    t = store.read_table(manifest["outbox"][sid]["file"])
                    parts.append(t.filter(pc.equal(t.column("next_tier"), tier)))
                table = pa.concat_tables(parts, promote_options="permissive")
                file = f"work/t{tier}/u{k:05d}.parquet"
                store.write_table(file, table)
                nrows = table.num_rows
            unit = {"id": uid, "tier": tier, "file": file, "rows": nrows, "sources": group,
                    "state": "queued", "attempts": 0, "error": None,
                    "result": f"tiers/{tier}/{uid}.parquet", "queued": time.time()}
            manifest["units"][uid] = unit
            new.append(unit)
            for sid in group:
                targets = manifest["outbox"][sid]["targets"]
                targets.pop(str(tier))
                if not targets:
                    manifest["outbox"].pop(sid)
    return new


# ---------------------------------------------------------------- running a unit

def _audit(row_id: str, tier: int, share: float) -> bool:
    return share > 0 and (zlib.crc32(f"{row_id}|{tier}".encode()) % 1_000_000) < share * 1_000_000


def execute(job: Job, unit: dict, engine) -> pa.Table:
    """Run one unit's rows on its tier: one batched engine call, features, policy decisions.
    Returns the result table (every column of the unit's rows plus the updated trace)."""
    spec = job.spec
    tier = unit["tier"]
    ts = spec.tiers[tier]
    table = job.store.read_table(unit["file"])
    table = table.filter(pc.equal(table.column("next_tier"), tier))   # a routed shard may hold
    rows = table.to_pylist()                                           # rows starting elsewhere
    prompts: list[str | None] = []
    errors: list[str | None] = []
    for r in rows:
        try:
            text = r.get("prompt")
            if text is None and r.get("messages"):
                text = engine.render(r["messages"])
            if text is None or not str(text).strip():
                prompts.append(None)
                errors.append("empty prompt")
                continue
            prompts.append(str(text))
            errors.append(None)
        except Exception as exc:           # a chat the template rejects: that row only
            prompts.append(None)
            errors.append(f"cannot render messages on tier {ts.name}: {exc}")
    live = [i for i, p in enumerate(prompts) if p is not None]
    counts = engine.count_tokens([prompts[i] for i in live]) if live else []
    ok = []
    for i, n in zip(live, counts):
        if n + ts.sampling.max_tokens > engine.context_length:
            errors[i] = (f"prompt has {n} tokens; with max_tokens {ts.sampling.max_tokens} it exceeds "
                         f"tier {ts.name}'s context of {engine.context_length}")
        else:
            ok.append(i)
    t0 = time.perf_counter()
    gens = engine.generate([prompts[i] for i in ok], ts.sampling) if ok else []
    seconds = time.perf_counter() - t0
    per_row = seconds / max(len(ok), 1)
    by_row = dict(zip(ok, gens))

    for i, r in enumerate(rows):
        r["trace"] = json.loads(r["trace"])
        g = by_row.get(i)
        if g is None:
            rec = {"tier": tier, "name": ts.name, "status": "error", "error": errors[i],
                   "response": None, "finish_reason": None, "prompt_tokens": 0, "output_tokens": 0,
                   "features": {}, "seconds": 0.0, "cost": 0.0}
        else:
            cost = ts.cost.per_input_token * g.prompt_tokens + ts.cost.per_output_token * g.output_tokens
            rec = {"tier": tier, "name": ts.name, "status": "ok", "error": None, "response": g.text,
                   "finish_reason": g.finish_reason, "prompt_tokens": g.prompt_tokens,
                   "output_tokens": g.output_tokens, "features": g.features(),
                   "seconds": per_row, "cost": cost}
        r["trace"].append(rec)

    good = [i for i in range(len(rows)) if rows[i]["trace"][-1]["status"] == "ok"]
    decisions = job.policy.decide(tier, [rows[i] for i in good]) if good else []
    next_tier = [None] * len(rows)
    kept = [None] * len(rows)
    for i, d in zip(good, decisions):
        rec = rows[i]["trace"][-1]
        rec["p_quality"] = d.p_quality
        nxt, audit = d.next_tier, False
        if nxt is None and tier < len(spec.tiers) - 1 and _audit(rows[i]["id"], tier, spec.audit_share):
            nxt, audit = tier + 1, True
        rec["decision"] = "stop" if nxt is None else f"escalate:{nxt}"
        rec["audit"] = audit
        rec["kept"] = d.kept
        next_tier[i] = nxt
        kept[i] = d.kept
    for i in set(range(len(rows))) - set(good):
        # An error on this tier ends the row; it keeps an earlier answer if it has one.
        earlier = [x["tier"] for x in rows[i]["trace"][:-1] if x["status"] == "ok"]
        kept[i] = earlier[-1] if earlier else None
        rows[i]["trace"][-1].update(decision="error", audit=False, kept=kept[i], p_quality=None)

    cols = {c: table.column(c) for c in table.column_names if c not in ("trace", "next_tier")}
    cols["trace"] = pa.array([json.dumps(r["trace"]) for r in rows], pa.string())
    cols["next_tier"] = pa.array(next_tier, pa.int32())
    cols["kept_tier"] = pa.array(kept, pa.int32())
    return pa.table(cols)


def run_unit(job_dir: str, unit_id: str, *, engine_factory=None, dispatch: Dispatch | None = None,
             worker: str | None = None) -> str:
    """The task function: run one unit (idempotent), commit it, then coalesce and enqueue
    escalations. Returns what happened: 'done', 'duplicate', 'cancelled' or 'failed'."""
    from workers.engines import get_engine

    job = Job(job_dir)
    worker = worker or socket.gethostname()
    with job.lock():
        manifest = job.manifest()
        unit = manifest["units"].get(unit_id)
        if unit is None:
            raise KeyError(f"job {job.id}: no unit {unit_id!r}")
        if manifest["state"] == "cancelled":
            return "cancelled"
        committed = job.store.exists(unit["result"])
        if unit["state"] == "done" and committed:
            return "duplicate"
        if not committed:
            unit.update(state="running", attempts=unit["attempts"] + 1, worker=worker,
                        started=time.time())
            mf.save(job.store, manifest)
    if not committed:
        try:
            engine = (engine_factory or get_engine)(job.spec.tiers[unit["tier"]])
            t0 = time.perf_counter()
            result = execute(job, unit, engine)
            wall = time.perf_counter() - t0
            job.store.write_table(unit["result"], result)       # the commit
        except Exception as exc:
            log.exception("unit %s of job %s failed", unit_id, job.id)
            with job.lock():
                manifest = job.manifest()
                manifest["units"][unit_id].update(state="failed", error=f"{type(exc).__name__}: {exc}")
                mf.save(job.store, manifest)
            raise
    else:
        wall = None
    return commit(job, unit_id, dispatch=dispatch, wall=wall)


def _advance(job: Job, manifest: dict) -> list[dict]:
    """Under the manifest lock: cut the units the outbox allows, save the manifest, and write
    the results when every unit is done and nothing waits. Returns the new units."""
    running = manifest["state"] == "running"
    new = _cut_units(job, manifest) if running else []
    finished = (running and not manifest["outbox"]
                and all(u["state"] == "done" for u in manifest["units"].values()))
    mf.save(job.store, manifest)
    if finished:
        finalize(job)
        manifest["state"] = "done"
        manifest["finished"] = time.time()
        mf.save(job.store, manifest)
    return new


def commit(job: Job, unit_id: str, *, dispatch: Dispatch | None = None, wall: float | None = None) -> str:
    """Record a unit whose result file exists; move its escalations to the outbox; cut and
    enqueue new units; finalize the job when nothing is left."""
    with job.lock():
        manifest = job.manifest()
        unit = manifest["units"][unit_id]
        status = "duplicate" if unit["state"] == "done" else "done"
        if status == "done":
            result = job.store.read_table(unit["result"])
            targets = _targets(result.column("next_tier").to_pylist())
            unit.update(state="done", finished=time.time(), error=None,
                        escalated=sum(targets.values()))
            if wall is not None:
                unit["seconds"] = wall
            if targets:
                manifest["outbox"][unit_id] = {"file": unit["result"], "targets": targets}
        new = _advance(job, manifest)
    if new and dispatch:
        dispatch(job.dir, new)
    return status


# ---------------------------------------------------------------- final output

TIER_STRUCT = pa.struct([
    ("tier", pa.int32()), ("name", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("response", pa.string()), ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()),
    ("output_tokens", pa.int32()), ("first_logprob", pa.float64()), ("mean_logprob", pa.float64()),
    ("min_logprob", pa.float64()), ("p_quality", pa.float64()), ("decision", pa.string()),
    ("audit", pa.bool_()), ("seconds", pa.float64()), ("cost", pa.float64()),
])


_TRACE_JSON = json.dumps([{
    "tier": "INTEGER", "name": "VARCHAR", "status": "VARCHAR", "error": "VARCHAR",
    "response": "VARCHAR", "finish_reason": "VARCHAR", "prompt_tokens": "INTEGER",
    "output_tokens": "INTEGER", "features": {"first_logprob": "DOUBLE", "mean_logprob": "DOUBLE",
                                              "min_logprob": "DOUBLE"},
    "p_quality": ["DOUBLE"], "decision": "VARCHAR", "audit": "BOOLEAN", "kept": "INTEGER",
    "seconds": "DOUBLE", "cost": "DOUBLE"}])

_FINAL_SQL = """
WITH term AS (
  SELECT * EXCLUDE (next_tier), from_json(trace, $spec) AS tr
  FROM read_parquet($results, union_by_name = true) WHERE next_tier IS NULL
),
ord AS (
  SELECT id AS oid, regexp_extract(filename, 's([0-9]+)[.]parquet$', 1)::BIGINT AS shard,
         file_row_number AS pos
  FROM read_parquet($routed, filename = true, file_row_number = true)
)
SELECT term.id, term.prompt,
       list_filter(tr, lambda x: x.tier = term.kept_tier)[1].response AS response,
       term.kept_tier AS final_tier,
       $names[term.kept_tier + 1] AS final_tier_name,
       list_transform(tr, lambda x: x.tier) AS tiers_run,
       list_transform(tr, lambda x: {
         'tier': x.tier, 'name': x.name, 'status': x.status, 'error': x.error,
         'response': x.response, 'finish_reason': x.finish_reason,
         'prompt_tokens': x.prompt_tokens, 'output_tokens': x.output_tokens,
         'first_logprob': x.features.first_logprob, 'mean_logprob': x.features.mean_logprob,
         'min_logprob': x.features.min_logprob, 'p_quality': x.p_quality[x.tier + 1],
         'decision': x.decision, 'audit': coalesce(x.audit, false), 'seconds': x.seconds,
         'cost': x.cost}) AS tiers,
       CASE WHEN tr[-1].status = 'ok' THEN 'ok' ELSE 'error' END AS status,
       tr[-1].error AS error,
       list_sum(list_transform(tr, lambda x: x.cost))::DOUBLE AS cost,
       list_sum(list_transform(tr, lambda x: x.seconds))::DOUBLE AS seconds,
       $version AS policy_version, $job_id AS job_id,
       term.* EXCLUDE (id, prompt, trace, kept_tier, source_file, tr),
       term.source_file
FROM term JOIN ord ON term.id = ord.oid
ORDER BY ord.shard, ord.pos
"""


def finalize(job: Job):
    """Write results/: the terminal row of every input row (the one with no next tier), with its
    lineage, in input order, exactly once each. DuckDB does the work (filtering, parsing the
    lineage JSON, joining to the input order, sorting) out of core; the rows stream to Parquet
    parts, so memory does not grow with the job."""
    import duckdb

    store, manifest = job.store, job.manifest()
    results = [store.uri(u["result"]) for u in sorted(manifest["units"].values(),
                                                       key=lambda u: (u["tier"], u["id"]))]
    routed = [store.uri(r) for r in store.glob("routed/*.parquet")]
    con = duckdb.connect()
    if not store.local:
        con.register_filesystem(store.fs)
    params = {"spec": _TRACE_JSON, "results": results, "routed": routed,
              "names": [t.name for t in job.spec.tiers], "version": job.meta["policy_version"],
              "job_id": job.id}
    n, distinct = con.execute(
        "SELECT count(*), count(DISTINCT id) FROM read_parquet($results, union_by_name = true) "
        "WHERE next_tier IS NULL", {"results": results}).fetchall()[0]
    if n != manifest["rows"] or distinct != n:
        raise RuntimeError(f"job {job.id}: {n} terminal rows ({distinct} distinct) for "
                           f"{manifest['rows']} input rows")
    reader = con.sql(_FINAL_SQL, params=params).to_arrow_reader(65536)
    store.remove("results")
    step = max(job.spec.shard_rows * 16, 65536)
    pending, size, part = [], 0, 0

    def flush():
        nonlocal pending, size, part
        table = pa.Table.from_batches(pending)
        table = table.set_column(table.column_names.index("tiers"), "tiers",
                                 table.column("tiers").cast(pa.list_(TIER_STRUCT)))
        store.write_table(f"results/part-{part:05d}.parquet", table)
        pending, size, part = [], 0, part + 1

    for batch in reader:
        pending.append(batch)
        size += batch.num_rows
        if size >= step:
            flush()
    if pending:
        flush()


# ---------------------------------------------------------------- control

def status(job_dir: str) -> dict:
    job = Job(job_dir)
    manifest = job.manifest()
    tiers = []
    for i, t in enumerate(job.spec.tiers):
        units = [u for u in manifest["units"].values() if u["tier"] == i]
        by = {}
        for u in units:
            s = by.setdefault(u["state"], {"shards": 0, "rows": 0})
            s["shards"] += 1
            s["rows"] += u["rows"]
        waiting = sum(src["targets"].get(str(i), 0) for src in manifest["outbox"].values())
        done = [u for u in units if u["state"] == "done"]
        tiers.append({"tier": i, "name": t.name, "states": by, "waiting_rows": waiting,
                      "escalated": sum(u.get("escalated", 0) for u in done),
                      "rows_done": sum(u["rows"] for u in done)})
    failed = [{"unit": u["id"], "error": u["error"]} for u in manifest["units"].values()
              if u["state"] == "failed"]
    return {"job_id": job.id, "state": manifest["state"], "rows": manifest["rows"], "tiers": tiers,
            "failed": failed, "dir": job.dir}


def cancel(job_dir: str) -> dict:
    job = Job(job_dir)
    with job.lock():
        manifest = job.manifest()
        if manifest["state"] == "running":
            manifest["state"] = "cancelled"
            mf.save(job.store, manifest)
    return status(job_dir)


def resume(job_dir: str, dispatch: Dispatch) -> list[dict]:
    """Rebuild the queues from the manifest after a crash or cancel: units whose result is
    committed are recorded; every other unfinished unit is enqueued again."""
    job = Job(job_dir)
    committed = []
    with job.lock():
        manifest = job.manifest()
        if manifest["state"] == "done":
            return []
        manifest["state"] = "running"
        todo = []
        for uid, u in manifest["units"].items():
            if u["state"] == "done":
                continue
            if job.store.exists(u["result"]):
                committed.append(uid)
            else:
                u.update(state="queued", error=None)
                todo.append(u)
        mf.save(job.store, manifest)
    for uid in committed:
        commit(job, uid, dispatch=dispatch)
    with job.lock():                      # nothing committed: the outbox may still hold rows
        new = _advance(job, job.manifest())
    units = todo + new
    if units:
        dispatch(job.dir, units)
    return units
