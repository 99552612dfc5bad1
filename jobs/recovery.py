"""Keeping a job moving with nobody watching: rebuilding its state from its directory, the
reconciler's pass over a job, and the manual levers (resume, cancel). The happy path (a unit
runs, commits, and what it cut is written and sent: jobs/units.py, jobs/scheduling.py) never
comes here.

The state store is never the truth; the job directory is. `snapshot(job)` reads it back:
- routed shards (their metadata: rows per starting tier) give the tier-0 units and the rows
  that start above tier 0;
- work files (metadata: their sources) give the cut units of later tiers, and which sources'
  rows are taken for which tier;
- result files (metadata: rows escalated per tier) say which units are done, and what they
  escalated;
- whatever a source escalated to a tier that no work file took is waiting for that tier.
A cut whose work file was never written is therefore simply not there: its rows wait again.

The reconciler (`reconcile`, run every few seconds by a thread in every worker, workers/
reconciler.py, and guarded so that one worker at a time does it per job) needs no person:
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

import logging
import time
from pathlib import Path

from jobs import failpoints
from jobs.layout import new_epoch, source_file, unit_tier
from jobs.roots import indexed_jobs, jobs_root
from jobs.scheduling import blank_snapshot, follow, load
from jobs.state import Advance, unit_record

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- snapshots

def snapshot(job) -> dict:
    """The job's state, rebuilt from its directory alone (reads file footers, not rows)."""
    store = job.store
    snap = blank_snapshot(job, new_epoch())
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
        tier = unit_tier(uid)
        snap["escalated"][tier] += sum(targets.values())
        sources.append((uid, tier, targets))
    for src, _, targets in sources:
        for k, rows in sorted(targets.items()):
            if rows and src not in taken[k]:
                snap["waiting"][k].append((src, rows))
    return snap


# ---------------------------------------------------------------- rebuilding and reconciling

def ensure_state(job, state, dispatch) -> bool:
    """Make sure the job has a live state, rebuilding it from the job directory if it is gone.
    One process rebuilds (a lock that expires after one lease); returns False to the others."""
    if state.exists():
        return True
    if job.finished() or not job.submitted():     # done, or its submit is still writing shards
        return False
    with state.rebuild_lock() as mine:
        if not mine:
            return False
        if not state.exists():
            failpoints.hit("holding_rebuild_lock")
            log.warning("job %s: no live state (Redis lost it?); rebuilding from %s", job.id, job.dir)
            load(job, state, snapshot(job), dispatch)
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


# ---------------------------------------------------------------- which jobs to look after

SEEN: set[str] = set()             # job directories this process has run units of


def known_jobs(registry, index: dict[str, str] | None = None) -> set[str]:
    """Unfinished jobs a reconciler looks after: those in the cluster's registry of running
    jobs, those this process has seen, and every job in the jobs root's index (`index`, read
    here if not given; see jobs/roots.py) and directly under the root."""
    index = indexed_jobs() if index is None else index
    dirs = registry.job_dirs() | SEEN | set(index.values())
    root = jobs_root()
    if root:
        dirs |= {str(p.parent) for p in Path(root).glob("*/submitted.json")
                 if not (p.parent / "finished.json").exists()}
    return dirs
