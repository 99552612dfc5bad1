"""Where job directories live: CASCADE_JOBS_ROOT, the directory shared by every worker. Workers
accept units only of job directories under it (`refusal`), and its index of unfinished jobs
(`register`, `indexed_jobs`) is how a worker finds every job again after Redis lost its state
and every worker restarted."""

from __future__ import annotations

import logging
import os
import posixpath
import time
from pathlib import Path

from jobs.storage import Store

log = logging.getLogger(__name__)


def jobs_root() -> str | None:
    return os.environ.get("CASCADE_JOBS_ROOT") or None


# Under CASCADE_JOBS_ROOT: one small file per unfinished job, naming its directory, at any depth
# below the root. Written by submit and by the first worker to run one of the job's units;
# removed once the job has finished. It is how jobs are found again after Redis lost everything
# and every worker restarted, at a cost per reconciler pass of one listing of running jobs
# (never a walk of the job directories' files).
INDEX = ".cascade-jobs"


def register(job) -> bool:
    """Record an unfinished job in the jobs root's index (once per process and job)."""
    root = jobs_root()
    if not root or job.id in _REGISTERED or refusal(job.dir):
        return False
    Store(root).write_json(f"{INDEX}/{job.id}.json", {"dir": job.dir, "registered": time.time()})
    _REGISTERED.add(job.id)
    return True


def unregister(job_id: str):
    root = jobs_root()
    if root:
        Store(root).remove(f"{INDEX}/{job_id}.json")
    _REGISTERED.discard(job_id)


_REGISTERED: set[str] = set()


def indexed_jobs() -> dict[str, str]:
    """job id -> job directory of every job in the jobs root's index."""
    root = jobs_root()
    if not root:
        return {}
    store = Store(root)
    out = {}
    for rel in store.glob(f"{INDEX}/*.json"):
        try:
            out[rel.rsplit("/", 1)[-1][:-5]] = store.read_json(rel)["dir"]
        except (FileNotFoundError, ValueError, KeyError) as exc:    # removed meanwhile, or torn
            log.warning("jobs index entry %s unreadable: %s", rel, exc)
    return out


def walk_jobs(root: str):
    """Every job directory (one holding job.json) below `root`, at any depth, in a stable order.
    The walk does not descend into a job directory: its unit files may be millions."""
    for here, subdirs, files in os.walk(root):
        if "job.json" in files:
            subdirs.clear()
            yield Path(here)
        subdirs.sort()


def refusal(job_dir: str) -> str | None:
    """Why a job directory is refused (None: accepted): outside CASCADE_JOBS_ROOT, when set."""
    root = jobs_root()
    if not root:
        return None
    if "://" in root or "://" in job_dir:
        scheme, _, path = job_dir.partition("://")
        ok = f"{scheme}://{posixpath.normpath(path)}".startswith(root.rstrip("/") + "/")
    else:
        ok = Path(job_dir).resolve().is_relative_to(Path(root).resolve())
    return None if ok else f"job directory {job_dir} is not under CASCADE_JOBS_ROOT={root}"
