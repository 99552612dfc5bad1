"""A job directory: its layout, opening it, and submitting a new job.

Job directory (local path or fsspec URL); the files are the durable truth of the job:
    job.json                    the validated spec, job id, broker, policy version
    submitted.json              written once every shard is written and the state loaded: until
                                then the directory is a submit in progress, never rebuilt from
    routed/s00000.arrow         input shards, each row with its input position and the tier it
                                starts on (metadata: rows per starting tier)
    work/t1/UNIT.arrow          input of a coalesced unit on tier 1 (metadata: its sources)
    tiers/0/UNIT.arrow          the committed result of a unit: its rows with their run on that
                                tier as column _t0 (metadata: rows escalated per tier, the span
                                of its input positions)
    results/part-00000.parquet  final rows, exactly one per input row, in input order
    finished.json               written after results/: the job is done (with its final status)
    cancelled                   present while the job is cancelled
    finalize_error.json         the last finalize failure, if any

The live coordination (unit states, leases, rows waiting per tier) is in a jobs.state store:
Redis for a job on a Redis broker, memory for `cascade run`. jobs/recovery.py rebuilds it from
the files above.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections import OrderedDict

import numpy as np
import pyarrow as pa

from jobs.broker import public, remember
from jobs import roots
from jobs.decide import make_policy
from jobs.inputs import InputReader
from jobs.spec import JobSpec
from jobs.storage import Store


# The layout of a job directory's unit files. A directory of another layout (written by another
# version of cascade) is refused with a clear error rather than misread.
LAYOUT = 3


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


log = logging.getLogger(__name__)
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


def new_epoch() -> str:
    """A fresh tag for the ids of units cut after a (re)load of the state, so ids never collide
    with units cut before it."""
    return uuid.uuid4().hex[:6]


def source_file(src: str) -> str:
    """Where a source of escalated rows lives: a routed shard or a unit's result."""
    if src.startswith("s"):
        return f"routed/{src}.arrow"
    return f"tiers/{src[1:src.index('-')]}/{src}.arrow"


def result_file(uid: str, tier: int) -> str:
    return f"tiers/{tier}/{uid}.arrow"


def result_tier(rel: str) -> int:
    """The tier of a result file (result_file's path)."""
    return int(rel.split("/")[1])


def targets_counted(codes: np.ndarray) -> dict[int, int]:
    """Rows per next tier, from integer next-tier codes (negative: the row stops)."""
    counts = np.bincount(codes[codes >= 0])
    return {int(k): int(counts[k]) for k in np.flatnonzero(counts)}


def submit(spec: JobSpec, *, broker: str | None = None, state=None, dispatch=None,
           overwrite: bool = False) -> Job:
    """Validate the input, write shards, load the state and enqueue the first units. `state` is
    the store to load (MemoryState for the embedded executor); a Redis broker gets RedisState."""
    from jobs import recovery

    remember(broker)                         # its credentials, for this process's connections
    policy = make_policy(spec)               # an artifact is loaded and checked (its weights'
    reader = InputReader(spec.input)         # checksum) and every input file's footer, text
                                             # and ids: errors come before anything is written
    store = Store(spec.output)
    if store.exists("job.json"):
        if not overwrite and not store.exists("submitted.json"):
            raise FileExistsError(f"{spec.output}: a submit of a job here did not finish (no "
                                  f"submitted.json); submit again with --overwrite")
        if not overwrite:
            raise FileExistsError(f"{spec.output}: a job already lives here; `cascade resume "
                                  f"{spec.output}` it, or submit again with --overwrite")
        try:
            old = Job(spec.output)
        except ValueError:        # another version's layout: its state is not this version's
            old = None
        if old is not None:                   # the old job's live state is retired with it
            _retire(old)
        store.remove("")
    store.makedirs()
    try:
        return _submit_into(spec, store, reader, policy, broker, state, dispatch)
    except BaseException:
        # Nothing half-made stays behind: the next submit needs no --overwrite. (A submit killed
        # outright leaves a directory without submitted.json, which nothing runs or rebuilds.)
        if store.exists("job.json"):
            try:
                _retire(Job(spec.output))
            except Exception as exc:             # the state may be unreachable: say so, go on
                log.warning("submit of %s failed; its live state could not be removed: %s",
                            spec.output, exc)
        with _OPEN_LOCK:
            _OPEN.pop(spec.output, None)
        store.remove("")
        raise


def _retire(job: Job):
    """Delete a job's live state and take it out of the registries reconcilers read."""
    from jobs import recovery

    live = recovery.live_state(job)
    if live is not None:
        live.delete()
    recovery.forget(job.id, live)


def _submit_into(spec: JobSpec, store: Store, reader: InputReader, policy, broker, state, dispatch) -> Job:
    from jobs import recovery

    job_id = f"{spec.name}-{uuid.uuid4().hex[:8]}"
    store.write_json("job.json", {"job_id": job_id, "layout": LAYOUT, "spec": spec.to_dict(),
                                  "broker": public(broker),     # never its credentials
                                  "created": time.time(), "rows": reader.rows,
                                  "policy_version": spec.policy.version(),
                                  "columns": reader.schema.names,
                                  # each input file and its rows, in input order: a row's
                                  # source_file follows from its input position
                                  "inputs": [[f, n] for f, n in zip(reader.files, reader.counts)]})
    job = Job(spec.output)
    job._policy = policy
    with _OPEN_LOCK:
        _OPEN[job.dir] = job                  # this process's cache now knows the new job
    shards = _write_shards(job, reader)
    snap = recovery.fresh_snapshot(job, shards)
    recovery.load(job, state if state is not None else recovery.live_state(job), snap, dispatch)
    store.write_json("submitted.json", {"submitted": time.time(), "shards": len(shards)})
    if job.broker:                            # a cluster job: found again after a Redis loss
        roots.register(job)
    return job


def _write_shards(job: Job, reader: InputReader) -> list[tuple[str, dict[int, int]]]:
    """The input as routed shards of shard_rows rows, each row with its input position and the
    tier it starts on (its runs come with its tiers)."""
    n = job.spec.shard_rows
    shards, pos = [], 0
    no_tier = pa.nulls(n, pa.int32())            # kept_tier: no answer yet; built once, sliced
    for k, shard in enumerate(reader.shards(n)):
        m = shard.num_rows
        start = np.asarray(job.policy.start(shard), np.int32)
        shard = pa.Table.from_arrays(
            [*shard.columns, pa.array(np.arange(pos, pos + m, dtype=np.int64)), pa.array(start),
             no_tier.slice(0, m)],
            names=[*shard.column_names, "_row", "next_tier", "kept_tier"])
        pos += m
        sid = f"s{k:05d}"
        targets = targets_counted(start)
        job.store.write_arrow(source_file(sid), shard, {"targets": targets})
        shards.append((sid, targets))
    return shards
