"""What `cascade status`, `cancel` and `resume` do, on a job directory."""

from __future__ import annotations

import time

from jobs import recovery
from jobs.job import Job, live_state
from jobs.progress import live_status
from jobs.state import MemoryState


def status(job_dir: str) -> dict:
    """The job's status: from finished.json once it is done, from its live state while it runs
    on Redis, else rebuilt from the job directory (an embedded job seen from another process,
    or a job whose Redis state is gone)."""
    job = Job(job_dir)
    st = _status(job, job_dir)
    if job.submitted():       # what encoding the prompts cost, for a policy that reads embeddings
        embedding = job.store.read_json("submitted.json").get("embedding")
        if embedding:
            st["embedding"] = embedding
    return st


def _status(job: Job, job_dir: str) -> dict:
    if job.finished():
        st = job.store.read_json("finished.json")["status"]
        return {**st, "dir": job.dir, "live": False}
    if not job.submitted():
        raise ValueError(f"{job_dir}: the submit of this job did not finish (no submitted.json), so "
                         f"nothing runs it; submit it again with --overwrite")
    state = live_state(job)
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
        recovery.cancel(job, live_state(job))
    return status(job_dir)


def resume(job_dir: str, dispatch, state=None) -> list[dict]:
    job = Job(job_dir)
    return recovery.resume(job, state if state is not None else live_state(job), dispatch)
