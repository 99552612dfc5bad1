"""What follows a transition of a job's state, on the happy path: loading a state (a submit's,
or a rebuild's), and after each commit writing the inputs of the units it cut, recording them as
queued and sending them, and finalizing when nothing is left. Recovery (jobs/recovery.py) calls
these too; nothing here recovers.
"""

from __future__ import annotations

import logging
import time

from jobs import failpoints, finalize, roots, workfiles
from jobs.layout import new_epoch, source_file
from jobs.state import FINALIZE, Advance, heartbeat, unit_record

log = logging.getLogger(__name__)
DONE_TTL = 3600                    # a finished job's Redis keys go after an hour (status reads
                                   # finished.json; a late duplicate message finds nothing to do)


def blank_snapshot(job, epoch: str | None = None) -> dict:
    """A job's state with no units and nothing waiting, in a fresh epoch."""
    n = job.n_tiers
    return {"job_id": job.id, "job_dir": job.dir, "epoch": epoch or new_epoch(), "state": "running",
            "rows": job.meta["rows"], "tiers": n, "batch": job.spec.coalesce_rows,
            "max_attempts": job.spec.max_attempts, "units": [], "waiting": [[] for _ in range(n)],
            "escalated": [0] * n}


def fresh_snapshot(job, shards: list[tuple[str, dict[int, int]]]) -> dict:
    """The state of a job just submitted: one tier-0 unit per shard; rows that start above tier 0
    wait for their tier."""
    snap = blank_snapshot(job)
    for sid, targets in shards:
        if targets.get(0):
            snap["units"].append(unit_record(f"t0-{sid}", 0, source_file(sid), targets[0]))
        for k, rows in sorted(targets.items()):
            if k > 0:
                snap["waiting"][k].append((sid, rows))
    return snap


def load(job, state, snap: dict, dispatch):
    """Replace the job's state with a snapshot, send its queued units, and cut what it allows."""
    now = time.time()
    state.load(snap, now)
    state.register(job.dir)
    if snap["state"] != "running":
        return
    queued = [u for u in snap["units"] if u["state"] == "queued"]
    if queued and dispatch:
        dispatch(job.dir, queued)
    follow(job, state, state.advance(now), dispatch)


def follow(job, state, adv: Advance, dispatch):
    """After a transition: write the inputs of the units it cut, record them as queued, send
    them; finalize if it said so."""
    ready = workfiles.materialize_all(job, adv.cuts, state)
    if ready:
        state.queued([u["id"] for u in ready], time.time())
        failpoints.hit("before_dispatch")
        if dispatch:
            dispatch(job.dir, ready)
    if adv.finalize:
        with heartbeat(state, FINALIZE):          # a long finalize keeps its lease
            after = finalize.run(job, state)
        if after == "done":
            forget(job.id, state)
            state.expire(DONE_TTL)


def forget(job_id: str, state):
    """Take a job out of what makes reconcilers look after it: the state store's registry of
    running jobs (a cluster's) and the jobs root's index. For a finished job, a retired
    (overwritten) one and a submit that failed."""
    if state is not None:
        state.unregister()
    try:
        roots.unregister(job_id)
    except OSError as exc:                  # a reconciler pass removes the entry later
        log.warning("job %s: its jobs-index entry stays for now: %s", job_id, exc)
