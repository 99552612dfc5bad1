"""Keeping a job moving with nobody watching: loading and rebuilding its state, following a
commit (writing and sending the units it cut, finalizing), and the reconciler.

The state store is never the truth; the job directory is. `snapshot(job)` reads it back:
- routed shards (their metadata: rows per starting tier) give the tier-0 units and the rows
  that start above tier 0;
- work files (metadata: their sources) give the cut units of later tiers, and which sources'
  rows are taken for which tier;
- result files (metadata: rows escalated per tier) say which units are done, and what they
  escalated;
- whatever a source escalated to a tier that no work file took is waiting for that tier.
A cut whose work file was never written is therefore simply not there: its rows wait again.

The reconciler (`reconcile`, run every few seconds by a thread in every worker and guarded so
that one worker at a time does it per job) needs no person:
- a job whose state is missing (Redis restarted empty) is rebuilt from its directory, under a
  lock that expires after one lease, and all its unfinished units are sent again;
- a running unit whose lease expired (its worker died) is sent again (an attempt);
- a unit whose engine failed is sent again when its backoff is due;
- a unit cut but never written (its cutter died) is written and sent;
- a unit queued long ago whose tier queue is empty (its message was lost) is sent again;
- a finalize whose lease expired, or whose retry is due, runs again.
Sending a unit twice is harmless: `start` lets one worker hold it, and results are write-once.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from jobs import coalesce, failpoints, finalize
from jobs.roots import indexed_jobs, jobs_root, refusal, unregister
from jobs.state import Advance, MemoryState, RedisState, connect, unit_record

log = logging.getLogger(__name__)
JOBS_KEY = "cascade:jobs"          # Redis hash: job id -> job directory, while a job runs
# Redis hash: job directory -> {"count", "last", "at"} of reconciler passes over it that raised
RECONCILER_ERRORS = "cascade:reconciler:errors"
DONE_TTL = 3600                    # a finished job's Redis keys go after an hour (status reads
                                   # finished.json; a late duplicate message finds nothing to do)


def live_state(job):
    """The job's state store if it runs on a Redis broker, else None (an embedded job's state
    lives in the `cascade run` process)."""
    if job.broker and job.broker.startswith(("redis://", "rediss://", "unix://")):
        from jobs import broker

        url = broker.check(broker.credentials_for(job.broker))
        return RedisState(connect(url), job.id)
    return None


# ---------------------------------------------------------------- snapshots

def _blank(job, epoch: str) -> dict:
    n = job.n_tiers
    return {"job_id": job.id, "job_dir": job.dir, "epoch": epoch, "state": "running",
            "rows": job.meta["rows"], "tiers": n, "batch": job.spec.coalesce_rows,
            "max_attempts": job.spec.max_attempts, "units": [], "waiting": [[] for _ in range(n)],
            "escalated": [0] * n}


def fresh_snapshot(job, shards: list[tuple[str, dict[int, int]]]) -> dict:
    """The state of a job just submitted: one tier-0 unit per shard; rows that start above tier 0
    wait for their tier."""
    from jobs.job import new_epoch, source_file

    snap = _blank(job, new_epoch())
    for sid, targets in shards:
        if targets.get(0):
            snap["units"].append(unit_record(f"t0-{sid}", 0, source_file(sid), targets[0]))
        for k, rows in sorted(targets.items()):
            if k > 0:
                snap["waiting"][k].append((sid, rows))
    return snap


def snapshot(job) -> dict:
    """The job's state, rebuilt from its directory alone (reads file footers, not rows)."""
    from jobs.job import new_epoch, source_file

    store = job.store
    snap = _blank(job, new_epoch())
    if store.exists("cancelled"):
        snap["state"] = "cancelled"
    elif store.exists("finalize_error.json") and store.read_json("finalize_error.json")["state"] == "failed":
        snap["state"] = "failed"            # finalize failed every attempt: a person must look
    done = {}
    for rel in store.glob("tiers/*/*.arrow"):
        meta = store.arrow_meta(rel)
        done[meta["unit"]] = {int(k): v for k, v in meta["targets"].items()}
    sources: list[tuple[str, int, dict[int, int]]] = []        # (source, its tier, targets)
    for rel in store.glob("routed/*.arrow"):
        sid = rel.rsplit("/", 1)[1][:-len(".arrow")]
        targets = {int(k): v for k, v in store.arrow_meta(rel)["targets"].items()}
        if targets.get(0):
            uid = f"t0-{sid}"
            snap["units"].append(unit_record(uid, 0, source_file(sid), targets[0],
                                             "done" if uid in done else "queued"))
        sources.append((sid, -1, {k: v for k, v in targets.items() if k > 0}))
    taken: list[set] = [set() for _ in range(job.n_tiers)]
    for rel in store.glob("work/t*/*.arrow"):
        meta = store.arrow_meta(rel)
        uid, tier = meta["unit"], meta["tier"]
        snap["units"].append(unit_record(uid, tier, rel, meta["rows"],
                                         "done" if uid in done else "queued", meta["sources"]))
        taken[tier].update(meta["sources"])
    for uid, targets in sorted(done.items()):
        tier = int(uid[1:uid.index("-")])
        snap["escalated"][tier] += sum(targets.values())
        sources.append((uid, tier, targets))
    for src, _, targets in sources:
        for k, rows in sorted(targets.items()):
            if rows and src not in taken[k]:
                snap["waiting"][k].append((src, rows))
    return snap


# ---------------------------------------------------------------- loading and following

def load(job, state, snap: dict, dispatch):
    """Replace the job's state with a snapshot, send its queued units, and cut what it allows."""
    now = time.time()
    state.load(snap, now)
    if isinstance(state, RedisState):
        state.r.hset(JOBS_KEY, job.id, job.dir)
    if snap["state"] != "running":
        return
    queued = [u for u in snap["units"] if u["state"] == "queued"]
    if queued and dispatch:
        dispatch(job.dir, queued)
    follow(job, state, state.advance(now), dispatch)


def follow(job, state, adv: Advance, dispatch):
    """After a transition: write the inputs of the units it cut, record them as queued, send
    them; finalize if it said so."""
    ready = coalesce.materialize_all(job, adv.cuts, state)
    if ready:
        state.queued([u["id"] for u in ready], time.time())
        failpoints.hit("before_dispatch")
        if dispatch:
            dispatch(job.dir, ready)
    if adv.finalize:
        from jobs.state import FINALIZE
        from jobs.units import heartbeat

        with heartbeat(state, FINALIZE):          # a long finalize keeps its lease
            after = finalize.run(job, state)
        if after == "done" and isinstance(state, RedisState):
            forget(job.id, state)
            state.expire(DONE_TTL)


def forget(job_id: str, state):
    """Take a job out of what makes reconcilers look after it: Redis's registry of running jobs
    (for a Redis state) and the jobs root's index. For a finished job, a retired (overwritten)
    one and a submit that failed."""
    if isinstance(state, RedisState):
        state.r.hdel(JOBS_KEY, job_id)
    try:
        unregister(job_id)
    except OSError as exc:                  # a reconciler pass removes the entry later
        log.warning("job %s: its jobs-index entry stays for now: %s", job_id, exc)


def ensure_state(job, state, dispatch) -> bool:
    """Make sure the job has a live state, rebuilding it from the job directory if it is gone.
    One process rebuilds (a lock that expires after one lease); returns False to the others."""
    if state.exists():
        return True
    if job.finished() or not job.submitted():     # done, or its submit is still writing shards
        return False
    if not isinstance(state, RedisState):
        load(job, state, snapshot(job), dispatch)
        return True
    import redis

    lock = state.r.lock(state.p + "rebuild", timeout=state.lease, blocking=False)
    if not lock.acquire():
        return False
    try:
        if not state.exists():
            failpoints.hit("holding_rebuild_lock")
            log.warning("job %s: no live state (Redis lost it?); rebuilding from %s", job.id, job.dir)
            load(job, state, snapshot(job), dispatch)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:  # held past its timeout: someone may have rebuilt too
            log.warning("job %s: the rebuild took longer than its lock's timeout (%.0f s, one "
                        "lease), so another worker may have rebuilt the state at the same time; "
                        "the rebuild is idempotent, but a lease this short for the job's size "
                        "makes it repeat (CASCADE_LEASE_SECONDS)", job.id, state.lease)
    return True


def reconcile(job, state, dispatch, queue_len=None):
    """One pass of the reconciler over a job (see the module docstring). `queue_len(tier)` gives
    the number of messages waiting in a tier's broker queue, where there is a broker."""
    if job.finished():
        return
    if not state.exists():
        ensure_state(job, state, dispatch)
        return
    if state.job().get("state") not in ("running", "finalizing"):
        return
    now = time.time()
    reaped = state.reap(now, stale_after=state.lease)
    if reaped.requeued:
        log.warning("job %s: sending %d units again (lease expired or retry due)", job.id,
                    len(reaped.requeued))
        if dispatch:
            dispatch(job.dir, reaped.requeued)
    follow(job, state, Advance(cuts=reaped.cuts), dispatch)
    if reaped.stale and queue_len is not None and dispatch:
        empty = {k: queue_len(k) == 0 for k in {u["tier"] for u in reaped.stale}}
        lost = [u for u in reaped.stale if empty[u["tier"]]]
        if lost:
            log.warning("job %s: %d queued units have no message in their queue; sending again",
                        job.id, len(lost))
            state.queued([u["id"] for u in lost], now)
            dispatch(job.dir, lost)
    follow(job, state, state.advance(now), dispatch)
    if reaped.finalize:
        follow(job, state, Advance(finalize=True), dispatch)


# ---------------------------------------------------------------- control

def resume(job, state, dispatch) -> list[dict]:
    """The manual lever: rebuild the state from the job directory and send every unfinished
    unit (after a cancel, or to force it; no crash needs it)."""
    if job.finished():
        return []
    if not job.submitted():
        raise ValueError(f"{job.dir}: its submit did not finish (no submitted.json); submit the "
                         f"job again with --overwrite")
    job.store.remove("cancelled")
    snap = snapshot(job)
    snap["state"] = "running"
    load(job, state, snap, dispatch)
    return [u for u in snap["units"] if u["state"] == "queued"]


def cancel(job, state):
    job.store.write_bytes("cancelled", b"")
    if state is not None and state.exists():
        state.set_state("cancelled")


# ---------------------------------------------------------------- the workers' reconciler

SEEN: set[str] = set()             # job directories this process has run units of


def known_jobs(client, index: dict[str, str] | None = None) -> set[str]:
    """Unfinished jobs a reconciler looks after: those registered in Redis, those this process
    has seen, and every job in the jobs root's index (`index`, read here if not given; see
    jobs/roots.py) and directly under the root."""
    index = indexed_jobs() if index is None else index
    dirs = {v.decode() for v in client.hvals(JOBS_KEY)} | SEEN | set(index.values())
    root = jobs_root()
    if root:
        dirs |= {str(p.parent) for p in Path(root).glob("*/submitted.json")
                 if not (p.parent / "finished.json").exists()}
    return dirs


WORKERS_KEY = "cascade:workers:"     # + tier name: hash worker -> last heartbeat (unix time)


def worker_heartbeat(client, tier: str, worker: str, now: float | None = None):
    """A worker says it is alive and serving `tier` (its reconciler does, every pass)."""
    client.hset(WORKERS_KEY + tier, worker, now or time.time())


def tier_workers(client, tier: str, now: float, alive_within: float) -> dict:
    """{"alive": workers heard from within `alive_within` s, "last_seen_s": seconds since any
    worker of the tier was heard from (None: never)}; entries older than a day are dropped."""
    beats = {k.decode(): float(v) for k, v in client.hgetall(WORKERS_KEY + tier).items()}
    old = [k for k, t in beats.items() if now - t > 86400]
    if old:
        client.hdel(WORKERS_KEY + tier, *old)
    alive = sorted(k for k, t in beats.items() if now - t <= alive_within)
    last = max(beats.values(), default=None)
    return {"alive": alive, "last_seen_s": None if last is None else round(now - last, 1)}


class Reconciler(threading.Thread):
    """Runs `reconcile` over the known jobs every `every` seconds (default a quarter lease), in a
    daemon thread of a worker: the worker's main thread may be inside an engine call for
    minutes. Per job, a short Redis key lets one worker at a time do the pass."""

    def __init__(self, broker: str, dispatch, queue_len, every: float | None = None,
                 tier: str | None = None, name: str | None = None):
        super().__init__(name="cascade-reconciler", daemon=True)
        import socket

        from jobs.state import lease_seconds

        self.broker, self.dispatch, self.queue_len = broker, dispatch, queue_len
        self.every = every or max(lease_seconds() / 4, 0.5)
        self.stopped = threading.Event()
        self.tier, self.worker = tier, name or f"{socket.gethostname()}:{os.getpid()}"

    def run(self):
        while not self.stopped.wait(self.every):
            try:
                self.tick()
            except Exception as exc:           # Redis away, a job directory gone: next tick
                log.warning("reconciler: %s: %s", type(exc).__name__, exc)

    def tick(self):
        import redis

        client = connect(self.broker)
        if self.tier:
            worker_heartbeat(client, self.tier, self.worker)
        index = indexed_jobs()              # read once per pass
        for job_dir in known_jobs(client, index):
            try:
                self.visit(client, job_dir, index)
            except redis.exceptions.ConnectionError:
                raise                       # Redis away: the whole pass waits for the next tick
            except Exception as exc:        # this job only: every other job still heals
                log.exception("reconciler: job directory %s: %s: %s", job_dir, type(exc).__name__, exc)
                try:
                    record_reconciler_error(client, job_dir, f"{type(exc).__name__}: {exc}")
                except Exception as again:  # Redis away: the next tick tries everything again
                    log.warning("reconciler: cannot record the error of %s: %s", job_dir, again)

    def visit(self, client, job_dir: str, index: dict[str, str]):
        from jobs.job import Job

        if refusal(job_dir):
            log.error("reconciler: %s", refusal(job_dir))
            return
        try:
            job = Job(job_dir)          # not the cache: the directory may hold a new job
        except FileNotFoundError:
            job = None
        if job is None or job.finished():
            SEEN.discard(job_dir)
            for jid, d in index.items():
                if d == job_dir:            # finished or gone: no entry for this directory stays
                    unregister(jid)
            stale = [k for k, v in client.hgetall(JOBS_KEY).items() if v.decode() == job_dir]
            if stale:
                client.hdel(JOBS_KEY, *stale)
            client.hdel(RECONCILER_ERRORS, job_dir)
            return
        state = live_state(job)
        if state is None:
            return
        if not state.r.set(state.p + "reconciling", "1", nx=True, px=int(self.every * 900)):
            return
        reconcile(job, state, self.dispatch,
                  lambda k, job=job: self.queue_len(job.spec.tiers[k].name))


def record_reconciler_error(client, job_dir: str, error: str):
    """Count a failed reconciler pass over a job directory, with the last error and its time
    (`cascade status` shows them)."""
    raw = client.hget(RECONCILER_ERRORS, job_dir)
    count = json.loads(raw)["count"] + 1 if raw else 1
    client.hset(RECONCILER_ERRORS, job_dir, json.dumps({"count": count, "last": error, "at": time.time()}))


def reconciler_errors(client, job_dir: str) -> dict | None:
    raw = client.hget(RECONCILER_ERRORS, job_dir)
    return json.loads(raw) if raw else None


def embedded_state() -> MemoryState:
    """The embedded executor's store: one process, so no lease can expire under it."""
    return MemoryState(lease=float("inf"))
