"""The embedded executor (`cascade run`): an in-process executor that runs units through the same task code
as the Celery workers (`run_units`, of which `run_unit` is the one-unit case), lowest tier first,
so escalated rows coalesce into full batches and each model loads once. It takes up to BATCH
queued units of a tier at a time: each unit is still its own engine call, attempt and commit,
and their bookkeeping (features, decisions, result tables) is one pass over all their rows. Its state store is in memory (jobs.state.MemoryState); the job
directory holds the truth as for any job, so `cascade resume` finishes a run that was killed.
No broker, no server, no polling: on one machine a broker would only add serialization and
latency. Its writes to the job directory go through a background writer (jobs.storage.
WriteBehind: synced before visible, in order, read-your-writes), so units compute while the
disk syncs. (On a cluster, `cascade submit` + `cascade worker`, one Celery task runs per unit on
the queue of its tier: workers/celery_app.py.)
"""

from __future__ import annotations

import heapq
import logging
import time

from jobs import control, recovery
from jobs.job import Job, open_job
from jobs.progress import live_status
from jobs.state import MemoryState
from jobs.storage import write_behind
from jobs.submit import submit
from jobs.units import run_units

log = logging.getLogger(__name__)


class LocalExecutor:
    def __init__(self, engine_factory=None, progress=None):
        self.heap: list[tuple[int, int, str, str]] = []
        self.count = 0
        self.engine_factory = engine_factory
        self.progress = progress
        self.state = embedded_state()
        self.timings: list[dict] = []

    def dispatch(self, job_dir: str, units: list[dict]):
        for u in units:
            heapq.heappush(self.heap, (u["tier"], self.count, job_dir, u["id"]))
            self.count += 1

    BATCH = 16

    def drain(self):
        """Run units until none is left; a unit whose engine failed runs again when its
        backoff is due."""
        while True:
            while self.heap:
                tier, _, job_dir, uid = heapq.heappop(self.heap)
                uids = [uid]
                while (self.heap and len(uids) < self.BATCH and self.heap[0][0] == tier
                       and self.heap[0][2] == job_dir):
                    uids.append(heapq.heappop(self.heap)[3])
                t0 = time.perf_counter()
                verdicts = run_units(job_dir, uids, state=self.state,
                                     engine_factory=self.engine_factory, dispatch=self.dispatch,
                                     worker="embedded", job_id=self.state.job()["job_id"])
                spent = time.perf_counter() - t0
                rows = [self.state.units.get(u, {}).get("rows", 0) for u in uids]
                for u, verdict, r in zip(uids, verdicts, rows):  # the batch's time, by rows
                    self.timings.append({"unit": u, "tier": tier, "state": verdict,
                                         "seconds": spent * r / max(sum(rows), 1)})
                if self.progress:
                    self.progress(live_status(open_job(job_dir), self.state))
            due = self.state.next_due()
            if due is None or not self.state.exists():
                return
            time.sleep(max(0.0, due - time.time()))
            job_dir = self.state.job()["job_dir"]
            recovery.reconcile(open_job(job_dir), self.state, self.dispatch)


def embedded_state() -> MemoryState:
    """The embedded executor's store: one process, so no lease can expire under it."""
    return MemoryState(lease=float("inf"))


def run_embedded(spec, *, engine_factory=None, progress=None, overwrite=False) -> Job:
    ex = LocalExecutor(engine_factory, progress)
    with write_behind(spec.output):
        job = submit(spec, broker=None, state=ex.state, dispatch=ex.dispatch,
                            overwrite=overwrite)
        ex.drain()
    return job


def resume_embedded(job_dir: str, *, engine_factory=None, progress=None):
    ex = LocalExecutor(engine_factory, progress)
    with write_behind(job_dir):
        control.resume(job_dir, ex.dispatch, state=ex.state)
        ex.drain()
