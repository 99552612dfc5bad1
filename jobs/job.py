"""A job directory opened: its spec, metadata and policy, whether it is finished, and its live
state store. The directory's layout is in jobs/layout.py; submitting a job in jobs/submit.py.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

from jobs import broker
from jobs.layout import LAYOUT
from jobs.policies import make_policy
from jobs.spec import JobSpec
from jobs.state import RedisState, connect
from jobs.storage import Store


class Job:
    """A job directory opened for reading or running."""

    def __init__(self, job_dir: str):
        self.dir = job_dir
        self.store = Store(job_dir)
        if not self.store.exists("job.json"):
            raise FileNotFoundError(f"{job_dir}: not a job directory (no job.json)")
        meta = self.store.read_json("job.json")
        if meta.get("layout", 1) != LAYOUT:
            raise ValueError(f"{job_dir}: its unit files have layout {meta.get('layout', 1)}, written by "
                             f"another version of cascade (this one reads layout {LAYOUT}); run the "
                             f"job again with --overwrite")
        self.meta = meta
        self.id = meta["job_id"]
        self.broker = meta.get("broker")
        self.spec = JobSpec.from_dict(meta["spec"])
        self._policy = None
        self._seen: tuple | None = None

    @property
    def policy(self):
        if self._policy is None:
            self._policy = make_policy(self.spec)
        return self._policy

    @property
    def n_tiers(self) -> int:
        return len(self.spec.tiers)

    def current(self) -> bool:
        """Whether the directory still holds this job (a new job may have been submitted over
        it with --overwrite). On a local directory a stat of job.json says whether it changed
        since it last held this job; only a change costs a read."""
        key = None
        if self.store.local and self.store._pending("job.json") is None:
            try:
                st = os.stat(self.store.path("job.json"))
            except FileNotFoundError:
                return False
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
            if key == self._seen:
                return True
        try:
            same = self.store.read_json("job.json")["job_id"] == self.id
        except FileNotFoundError:
            return False
        if same:
            self._seen = key
        return same

    def finished(self) -> bool:
        return self.store.exists("finished.json")

    def submitted(self) -> bool:
        """Whether the submit finished (all shards written, the state loaded). A directory
        without it is a submit still running, or one that died: nothing may rebuild from it."""
        return self.store.exists("submitted.json")


_OPEN: OrderedDict[str, Job] = OrderedDict()
_OPEN_LOCK = threading.Lock()


def open_job(job_dir: str, job_id: str | None = None) -> Job:
    """The Job for a directory, cached per process (a worker opens each job once, not once per
    unit). `job_id` (from a task message) reloads it if the directory now holds another job."""
    with _OPEN_LOCK:
        job = _OPEN.get(job_dir)
        if job is None or (job_id and job.id != job_id):
            job = Job(job_dir)
            _OPEN[job_dir] = job
            while len(_OPEN) > 16:
                _OPEN.popitem(last=False)
        _OPEN.move_to_end(job_dir)
        return job


def forget_open(job_dir: str):
    """Drop a directory from this process's cache (its job was removed)."""
    with _OPEN_LOCK:
        _OPEN.pop(job_dir, None)


def remember_open(job: Job):
    """This process's cache now knows `job` (just submitted into its directory)."""
    with _OPEN_LOCK:
        _OPEN[job.dir] = job


def live_state(job: Job) -> RedisState | None:
    """The job's state store if it runs on a Redis broker, else None (an embedded job's state
    lives in the `cascade run` process)."""
    if job.broker and job.broker.startswith(("redis://", "rediss://", "unix://")):
        url = broker.check(broker.credentials_for(job.broker))
        return RedisState(connect(url), job.id)
    return None
