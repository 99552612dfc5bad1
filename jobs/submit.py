"""Submitting a job: validate its input, write the routed shards, load the state and send the
first units. Nothing is written until the spec, the policy and every input file's footer, text
and ids have been checked; a submit that fails removes what it wrote.
"""

from __future__ import annotations

import logging
import socket
import time
import uuid

import numpy as np
import pyarrow as pa

from jobs import roots, scheduling
from jobs.broker import public, remember
from jobs.inputs import InputReader
from jobs.job import Job, forget_open, live_state, remember_open
from jobs.layout import LAYOUT, source_file, targets_counted
from jobs.policies import make_policy
from jobs.spec import JobSpec
from jobs.storage import Store

log = logging.getLogger(__name__)


def submit(spec: JobSpec, *, broker: str | None = None, state=None, dispatch=None,
           overwrite: bool = False) -> Job:
    """Validate the input, write shards, load the state and enqueue the first units. `state` is
    the store to load (MemoryState for the embedded executor); a Redis broker gets RedisState."""
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
            retire(old)
        store.remove("")
    store.makedirs()
    try:
        return _submit_into(spec, store, reader, policy, broker, state, dispatch)
    except BaseException:
        # Nothing half-made stays behind: the next submit needs no --overwrite. (A submit killed
        # outright leaves a directory without submitted.json, which nothing runs or rebuilds.)
        if store.exists("job.json"):
            try:
                retire(Job(spec.output))
            except Exception as exc:             # the state may be unreachable: say so, go on
                log.warning("submit of %s failed; its live state could not be removed: %s",
                            spec.output, exc)
        forget_open(spec.output)
        store.remove("")
        raise


def retire(job: Job):
    """Delete a job's live state and take it out of the registries reconcilers read."""
    live = live_state(job)
    if live is not None:
        live.delete()
    scheduling.forget(job.id, live)


def _submit_into(spec: JobSpec, store: Store, reader: InputReader, policy, broker, state, dispatch) -> Job:
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
    remember_open(job)
    shards = _write_shards(job, reader)
    snap = scheduling.fresh_snapshot(job, shards)
    scheduling.load(job, state if state is not None else live_state(job), snap, dispatch)
    done = {"submitted": time.time(), "shards": len(shards)}
    if getattr(policy, "embedded_rows", 0):         # what encoding the prompts cost, and where
        done["embedding"] = {"rows": policy.embedded_rows, "seconds": policy.embed_seconds,
                             "seconds_per_row": policy.embed_seconds / policy.embedded_rows,
                             "encoder": policy.policy.encoder, "host": socket.gethostname()}
    store.write_json("submitted.json", done)
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
        start, carried = job.policy.start(shard)
        start = np.asarray(start, np.int32)
        shard = pa.Table.from_arrays(
            [*shard.columns, *carried.values(), pa.array(np.arange(pos, pos + m, dtype=np.int64)),
             pa.array(start), no_tier.slice(0, m)],
            names=[*shard.column_names, *carried, "_row", "next_tier", "kept_tier"])
        pos += m
        sid = f"s{k:05d}"
        targets = targets_counted(start)
        job.store.write_arrow(source_file(sid), shard, {"targets": targets})
        shards.append((sid, targets))
    return shards
