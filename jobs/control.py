"""What `cascade status`, `cancel` and `resume` do, on a job directory."""

from __future__ import annotations

import time

from jobs import recovery
from jobs.job import Job
from jobs.state import MemoryState, RedisState, lease_seconds


def live_status(job, state) -> dict:
    """Units and rows per tier and state, from a state store's counters (O(tiers))."""
    raw, meta = state.status(), state.job()
    tiers = []
    for k, t in enumerate(job.spec.tiers):
        s = raw["tiers"][k]
        tiers.append({"tier": k, "name": t.name, "states": s["states"],
                      "waiting_rows": s["waiting_rows"], "escalated": s["escalated"],
                      "rows_done": s["states"].get("done", {}).get("rows", 0)})
    out = {"job_id": job.id, "state": meta["state"], "rows": job.meta["rows"], "tiers": tiers,
           "failed": raw["failing"], "finalize_error": meta.get("finalize_error"),
           "dir": job.dir, "live": True}
    if isinstance(state, RedisState):       # who serves each tier, and what waits on whom
        now = time.time()
        alive_within = max(3 * lease_seconds() / 4, 5.0)      # three reconciler passes
        out["reconciler_errors"] = recovery.reconciler_errors(state.r, job.dir)
        expired = state.lease_expired(now)
        for t in tiers:
            w = recovery.tier_workers(state.r, t["name"], now, alive_within)
            t["workers"], t["worker_last_seen_s"] = len(w["alive"]), w["last_seen_s"]
            t["lease_expired_units"] = expired.get(t["tier"], 0)
            waiting = sum(v["units"] for k, v in t["states"].items() if k in ("queued", "retry", "running"))
            if meta["state"] == "running" and waiting and not w["alive"]:
                since = ("no worker has ever served it" if w["last_seen_s"] is None else
                         f"no worker has served it for {w['last_seen_s']:.0f} s")
                out.setdefault("waiting_for", []).append(
                    f"tier {t['tier']} ({t['name']}): {waiting} unit(s) wait and {since}; start "
                    f"`cascade worker --tier {t['name']}`")
    return out


def status(job_dir: str) -> dict:
    """The job's status: from finished.json once it is done, from its live state while it runs
    on Redis, else rebuilt from the job directory (an embedded job seen from another process,
    or a job whose Redis state is gone)."""
    job = Job(job_dir)
    if job.finished():
        st = job.store.read_json("finished.json")["status"]
        return {**st, "dir": job.dir, "live": False}
    if not job.submitted():
        raise ValueError(f"{job_dir}: the submit of this job did not finish (no submitted.json), so "
                         f"nothing runs it; submit it again with --overwrite")
    state = recovery.live_state(job)
    if state is not None and state.exists():
        return live_status(job, state)
    mem = MemoryState()
    mem.load(recovery.snapshot(job), time.time())
    st = live_status(job, mem)
    st["live"] = False
    if job.store.exists("finalize_error.json"):
        st["finalize_error"] = job.store.read_json("finalize_error.json")["error"]
    return st


def cancel(job_dir: str) -> dict:
    job = Job(job_dir)
    if not job.finished():
        recovery.cancel(job, recovery.live_state(job))
    return status(job_dir)


def resume(job_dir: str, dispatch, state=None) -> list[dict]:
    job = Job(job_dir)
    return recovery.resume(job, state if state is not None else recovery.live_state(job), dispatch)
