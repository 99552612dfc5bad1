"""The reconciler thread of a tier worker: every few seconds, one pass of jobs/recovery.py's
`reconcile` over every unfinished job the cluster knows, so that a job finishes with nobody
watching (a worker died, Redis restarted empty, a message was lost). It runs in a daemon
thread because the worker's main thread may be inside an engine call for minutes; per job, a
short claim in the state store lets one worker at a time do the pass.
"""

from __future__ import annotations

import logging
import os
import socket
import threading

import redis

from jobs import recovery
from jobs.job import Job, live_state
from jobs.roots import indexed_jobs, refusal, unregister
from jobs.state import Registry, connect, lease_seconds

log = logging.getLogger(__name__)


class Reconciler(threading.Thread):
    """Runs `reconcile` over the known jobs every `every` seconds (default a quarter lease).
    `queue_len(tier name)` is the number of messages waiting in that tier's queue."""

    def __init__(self, broker: str, dispatch, queue_len, every: float | None = None,
                 tier: str | None = None, name: str | None = None):
        super().__init__(name="cascade-reconciler", daemon=True)
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
        registry = Registry(connect(self.broker))
        if self.tier:
            registry.worker_heartbeat(self.tier, self.worker)
        index = indexed_jobs()              # read once per pass
        for job_dir in recovery.known_jobs(registry, index):
            try:
                self.visit(registry, job_dir, index)
            except redis.exceptions.ConnectionError:
                raise                       # Redis away: the whole pass waits for the next tick
            except Exception as exc:        # this job only: every other job still heals
                log.exception("reconciler: job directory %s: %s: %s", job_dir, type(exc).__name__, exc)
                try:
                    registry.record_error(job_dir, f"{type(exc).__name__}: {exc}")
                except Exception as again:  # Redis away: the next tick tries everything again
                    log.warning("reconciler: cannot record the error of %s: %s", job_dir, again)

    def visit(self, registry: Registry, job_dir: str, index: dict[str, str]):
        if refusal(job_dir):
            log.error("reconciler: %s", refusal(job_dir))
            return
        try:
            job = Job(job_dir)          # not the cache: the directory may hold a new job
        except FileNotFoundError:
            job = None
        if job is None or job.finished():
            recovery.SEEN.discard(job_dir)
            for jid, d in index.items():
                if d == job_dir:            # finished or gone: no entry for this directory stays
                    unregister(jid)
            registry.drop_dir(job_dir)
            return
        state = live_state(job)
        if state is None or not state.claim_pass(self.every * 0.9):
            return
        recovery.reconcile(job, state, self.dispatch,
                           lambda k, job=job: self.queue_len(job.spec.tiers[k].name))
