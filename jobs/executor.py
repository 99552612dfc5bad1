"""Where units run.

Embedded (`cascade run`): an in-process executor that calls the very same `run_unit` task
function as the Celery workers, lowest tier first, so escalated rows coalesce into full batches
and each model loads once. No broker, no server, no polling: on one machine a broker would only
add serialization and latency, and this executor exercises the same commit/coalesce/finalize code
and the same manifest as a cluster.

Cluster (`cascade submit` + `cascade worker`): one Celery task per unit on the queue of its tier.
"""

from __future__ import annotations

import heapq
import logging
import time

from jobs import core

log = logging.getLogger(__name__)


class LocalExecutor:
    def __init__(self, engine_factory=None, progress=None):
        self.heap: list[tuple[int, int, str, str]] = []
        self.count = 0
        self.engine_factory = engine_factory
        self.progress = progress
        self.timings: list[dict] = []

    def dispatch(self, job_dir: str, units: list[dict]):
        for u in units:
            heapq.heappush(self.heap, (u["tier"], self.count, job_dir, u["id"]))
            self.count += 1

    def drain(self):
        while self.heap:
            tier, _, job_dir, uid = heapq.heappop(self.heap)
            t0 = time.perf_counter()
            state = core.run_unit(job_dir, uid, engine_factory=self.engine_factory,
                                  dispatch=self.dispatch, worker="embedded")
            self.timings.append({"unit": uid, "tier": tier, "state": state,
                                 "seconds": time.perf_counter() - t0})
            if self.progress:
                self.progress(core.status(job_dir))


def run_embedded(spec, *, engine_factory=None, progress=None, overwrite=False) -> core.Job:
    ex = LocalExecutor(engine_factory, progress)
    job = core.submit(spec, broker=None, dispatch=ex.dispatch, overwrite=overwrite)
    ex.drain()
    return job


def resume_embedded(job_dir: str, *, engine_factory=None, progress=None):
    ex = LocalExecutor(engine_factory, progress)
    core.resume(job_dir, ex.dispatch)
    ex.drain()
