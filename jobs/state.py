"""A job's live coordination state: which units exist and in which state, which rows wait for
which tier, leases of running units, the job's own state. Every operation costs O(1) per unit
(cutting a unit reads only the sources waiting for its tier), whatever the size of the job.

Two stores with one contract (tests/test_state.py runs the same checks on both):
- `MemoryState`: the embedded executor's (`cascade run`, one process).
- `RedisState`: a cluster's. Each transition is one Lua script, so it is atomic without a lock:
  no worker ever waits on another, and a worker killed mid-call leaves nothing half-done.

Neither is the truth. The job directory is (jobs/layout.py): committed result files, the
work files of cut units and the markers of a finished or cancelled job. Either store can be
rebuilt from it at any time, which is how a Redis that restarted empty is healed.

Unit states: `cutting` (rows chosen for it, its input file not yet written), `queued`, `running`
(holds a lease, renewed by a heartbeat), `retry` (its engine failed; due again at a time),
`done` (its result is committed). Job states: `running`, `finalizing`, `done`, `cancelled`,
`failed` (finalize failed every attempt).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FINALIZE = "__finalize__"          # the lease and retry entry of the finalize step
ACTIVE = ("cutting", "queued", "running", "retry")


def lease_seconds() -> float:
    """How long a running unit (or a finalize) may go without a heartbeat before it is presumed
    dead and run again (env CASCADE_LEASE_SECONDS, default 60)."""
    return float(os.environ.get("CASCADE_LEASE_SECONDS", "60"))


def backoff(attempt: int) -> float:
    """Seconds before the retry after failed attempt `attempt`: exponential backoff with full
    jitter (uniform in [0, base * 2^(attempt-1)], as Celery's retry_backoff), base
    CASCADE_RETRY_BACKOFF (default 2 s), capped at 10 minutes."""
    base = float(os.environ.get("CASCADE_RETRY_BACKOFF", "2"))
    return random.uniform(0, min(600.0, base * 2 ** (attempt - 1)))


@contextlib.contextmanager
def heartbeat(state, uids: str | list[str]):
    """Renew the leases of units (or the finalize) every quarter lease while the block runs (a
    thread: the engine call holds the main one)."""
    if not state.needs_heartbeat:
        yield
        return
    uids = [uids] if isinstance(uids, str) else list(uids)
    stop = threading.Event()

    def beat():
        while not stop.wait(state.lease / 4):
            for uid in uids:
                try:
                    state.heartbeat(uid, time.time())
                except Exception as exc:      # Redis away: the next beat tries again
                    log.warning("heartbeat of %s failed: %s", uid, exc)

    t = threading.Thread(target=beat, name=f"heartbeat-{uids[0]}", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()


@dataclass
class Advance:
    """What a commit (or a reconcile) decided: the units it cut, and whether the caller must
    finalize the job now."""
    status: str = "done"                   # done | duplicate | unknown
    cuts: list[dict] = field(default_factory=list)
    finalize: bool = False


@dataclass
class Reaped:
    requeued: list[dict] = field(default_factory=list)   # lease expired or retry due: send again
    cuts: list[dict] = field(default_factory=list)       # cut, never materialized: do it
    stale: list[dict] = field(default_factory=list)      # queued long ago: message maybe lost
    finalize: bool = False                               # the finalize lease expired / retry due


def unit_record(uid: str, tier: int, file: str, rows: int, state: str = "queued",
                sources: list[str] | None = None) -> dict:
    return {"id": uid, "tier": tier, "file": file, "rows": rows, "state": state,
            "sources": sources or [], "attempts": 0, "error": None, "worker": None}


def _blank_status(n_tiers: int) -> dict:
    return {"tiers": [{"states": {}, "waiting_rows": 0, "escalated": 0} for _ in range(n_tiers)]}


class MemoryState:
    """The state in this process's memory: for the embedded executor."""

    needs_heartbeat = False       # one process: nobody else can take a unit from it
    registry = None               # no cluster: no registry of jobs and workers

    def __init__(self, lease: float | None = None):
        self.lease = lease or lease_seconds()
        self.meta: dict = {}
        self.units: dict[str, dict] = {}
        self.waiting: list[OrderedDict] = []       # per tier: source -> rows, in arrival order
        self.waitrows: list[int] = []
        self.active: list[int] = []
        self.escalated: list[int] = []
        self.counts: dict[tuple[int, str], list[int]] = {}   # (tier, state) -> [units, rows]
        self.leases: dict[str, float] = {}
        self.retry: dict[str, float] = {}
        self.queued_at: dict[str, float] = {}

    # ------------------------------------------------------------ life cycle
    def exists(self) -> bool:
        return bool(self.meta)

    def load(self, snap: dict, now: float):
        n = snap["tiers"]
        self.__init__(self.lease)
        self.meta = {k: snap[k] for k in ("job_id", "job_dir", "epoch", "state", "rows", "tiers",
                                          "batch", "max_attempts")}
        self.meta.update(seq=[0] * n, finalize_error=None, finalize_attempts=0)
        self.waiting = [OrderedDict() for _ in range(n)]
        self.waitrows, self.active, self.escalated = [0] * n, [0] * n, list(snap["escalated"])
        for u in snap["units"]:
            rec = dict(u)
            self.units[rec["id"]] = rec
            self._count(rec, +1)
            if rec["state"] == "queued":
                self.queued_at[rec["id"]] = now
        for k, items in enumerate(snap["waiting"]):
            for src, rows in items:
                self.waiting[k][src] = rows
                self.waitrows[k] += rows

    def delete(self):
        self.__init__(self.lease)

    # One process owns this state: no registry to join or leave, no other rebuilder or
    # reconciler to exclude, nothing to expire.
    def register(self, job_dir: str):
        pass

    def unregister(self):
        pass

    def expire(self, seconds: int):
        pass

    @contextlib.contextmanager
    def rebuild_lock(self):
        yield True

    def claim_pass(self, seconds: float) -> bool:
        return True

    def job(self) -> dict:
        return dict(self.meta)

    def set_state(self, state: str):
        self.meta["state"] = state

    # ------------------------------------------------------------ bookkeeping
    def _count(self, rec: dict, sign: int):
        c = self.counts.setdefault((rec["tier"], rec["state"]), [0, 0])
        c[0] += sign
        c[1] += sign * rec["rows"]
        if rec["state"] in ACTIVE:
            self.active[rec["tier"]] += sign

    def _move(self, rec: dict, state: str):
        self._count(rec, -1)
        rec["state"] = state
        self._count(rec, +1)

    # ------------------------------------------------------------ transitions
    def start(self, uid: str, worker: str, now: float) -> tuple[str, dict | None]:
        """Take a unit to run it: ('run', record) or why not ('done', 'busy', 'cancelled',
        'unknown')."""
        if self.meta.get("state") == "cancelled":
            return "cancelled", None
        rec = self.units.get(uid)
        if rec is None:
            return "unknown", None
        if rec["state"] == "done":
            return "done", None
        if rec["state"] == "cutting" or (rec["state"] == "running" and self.leases.get(uid, 0) > now):
            return "busy", None
        self._move(rec, "running")
        rec["attempts"] += 1
        rec["worker"] = worker
        self.leases[uid] = now + self.lease
        self.queued_at.pop(uid, None)
        self.retry.pop(uid, None)
        return "run", dict(rec)

    def heartbeat(self, uid: str, now: float):
        if uid in self.leases:
            self.leases[uid] = now + self.lease

    def fail(self, uid: str, error: str, due: float):
        rec = self.units.get(uid)
        if rec is None or rec["state"] != "running":
            return
        self._move(rec, "retry")
        rec["error"] = error
        self.leases.pop(uid, None)
        self.retry[uid] = due

    def done(self, uid: str, targets: dict[int, int], now: float) -> Advance:
        rec = self.units.get(uid)
        if rec is None:
            return Advance("unknown")
        if rec["state"] == "done":
            return self.advance(now, "duplicate")
        self._move(rec, "done")
        rec["error"] = None
        for d in (self.leases, self.retry, self.queued_at):
            d.pop(uid, None)
        for k, n in targets.items():
            if n:
                self.waiting[k][uid] = n
                self.waitrows[k] += n
                self.escalated[rec["tier"]] += n
        return self.advance(now)

    def advance(self, now: float, status: str = "done") -> Advance:
        """Cut units for every tier where enough rows wait (or nothing more can arrive), lowest
        tier first; if nothing is active or waiting anywhere, move the job to finalizing."""
        out = Advance(status)
        if self.meta.get("state") != "running":
            return out
        batch, open_below = self.meta["batch"], False
        for k in range(self.meta["tiers"]):
            waiting = self.waiting[k]
            while self.waitrows[k] > 0 and (self.waitrows[k] >= batch or not open_below):
                sources, rows = [], 0
                while rows < batch and waiting:
                    src, n = waiting.popitem(last=False)
                    sources.append(src)
                    rows += n
                self.waitrows[k] -= rows
                self.meta["seq"][k] += 1
                uid = f"t{k}-{self.meta['epoch']}-{self.meta['seq'][k]:05d}"
                rec = unit_record(uid, k, f"work/t{k}/{uid}.arrow", rows, "cutting", sources)
                self.units[uid] = rec
                self._count(rec, +1)
                self.leases[uid] = now + self.lease
                out.cuts.append(dict(rec))
            open_below = open_below or self.active[k] > 0 or self.waitrows[k] > 0
        if not open_below:
            self.meta["state"] = "finalizing"
            self.leases[FINALIZE] = now + self.lease
            out.finalize = True
        return out

    def queued(self, uids: list[str], now: float):
        """Units whose message was (about to be) sent: cut units now materialized, or units sent
        again. Records the time, which the reconciler uses to find lost messages."""
        for uid in uids:
            rec = self.units.get(uid)
            if rec is None or rec["state"] == "done":
                continue
            if rec["state"] == "cutting":
                self._move(rec, "queued")
                self.leases.pop(uid, None)
            if rec["state"] == "queued":
                self.queued_at[uid] = now

    def reap(self, now: float, stale_after: float) -> Reaped:
        out = Reaped()

        def requeue(rec):
            self._move(rec, "queued")
            self.queued_at[rec["id"]] = now
            out.requeued.append(dict(rec))

        def take_finalize():
            out.finalize = True
            self.leases[FINALIZE] = now + self.lease

        for uid, deadline in list(self.leases.items()):
            if deadline > now:
                continue
            if uid == FINALIZE:
                take_finalize()
            elif self.units[uid]["state"] == "running":
                del self.leases[uid]
                requeue(self.units[uid])
            elif self.units[uid]["state"] == "cutting":
                self.leases[uid] = now + self.lease
                out.cuts.append(dict(self.units[uid]))
        for uid, due in list(self.retry.items()):
            if due > now:
                continue
            del self.retry[uid]
            if uid == FINALIZE:
                take_finalize()
            elif self.units[uid]["state"] == "retry":
                requeue(self.units[uid])
        out.stale = [dict(self.units[u]) for u, t in self.queued_at.items() if t <= now - stale_after]
        return out

    def next_due(self) -> float | None:
        """The earliest retry time (the embedded executor sleeps until then)."""
        return min(self.retry.values(), default=None)

    def finalized(self):
        self.meta["state"] = "done"
        self.leases.pop(FINALIZE, None)

    def finalize_failed(self, error: str, due: float) -> str:
        self.meta["finalize_error"] = error
        self.meta["finalize_attempts"] += 1
        self.leases.pop(FINALIZE, None)
        if self.meta["finalize_attempts"] >= self.meta["max_attempts"]:
            self.meta["state"] = "failed"
        else:
            self.retry[FINALIZE] = due
        return self.meta["state"]

    # ------------------------------------------------------------ reading
    def status(self) -> dict:
        st = _blank_status(self.meta["tiers"])
        for (k, state), (units, rows) in self.counts.items():
            if units:
                st["tiers"][k]["states"][state] = {"units": units, "rows": rows}
        for k, t in enumerate(st["tiers"]):
            t["waiting_rows"] = self.waitrows[k]
            t["escalated"] = self.escalated[k]
        st["failing"] = [{"unit": uid, "error": self.units[uid]["error"],
                          "attempts": self.units[uid]["attempts"]}
                         for uid in self.retry if uid in self.units]
        return st


@functools.cache
def _lua(name: str) -> str:
    """One section of state.lua, with the shared `lib` section in front."""
    text = Path(__file__).with_name("state.lua").read_text()
    section = text.split(f"-- @{name}\n", 1)[1].split("\n-- @", 1)[0]
    return section if name == "lib" else _lua("lib") + "\n" + section


class RedisState:
    """The same state in Redis, under keys `cascade:job:<job id>:*`. Each method is one Lua
    script (jobs/state.lua), so transitions are atomic and need no lock."""

    SCRIPTS = ("start", "heartbeat", "fail", "done", "advance", "queued", "reap", "finalized",
               "finalize_failed")
    needs_heartbeat = True

    def __init__(self, client, job_id: str, lease: float | None = None):
        self.r = client
        self.job_id = job_id
        self.p = f"cascade:job:{job_id}:"
        self.lease = lease or lease_seconds()
        self.fn = {n: client.register_script(_lua(n)) for n in self.SCRIPTS}
        self.registry = Registry(client)

    def _call(self, name: str, *args):
        out = self.fn[name](keys=[], args=[self.p, self.lease, *args])
        return json.loads(out) if out else None

    # ------------------------------------------------------------ life cycle
    def exists(self) -> bool:
        """A complete state is loaded (a script run on a Redis that restarted empty never leaves a
        partial one, but a whole load is what counts)."""
        return bool(self.r.hexists(self.p + "meta", "job_id"))

    def load(self, snap: dict, now: float):
        """Replace the job's state with a snapshot, in one MULTI/EXEC."""
        n = snap["tiers"]
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(*self._keys(n))
        stats: dict[str, int] = {}
        units = {}
        for u in snap["units"]:
            units[u["id"]] = json.dumps(u)
            for key, val in ((f"{u['tier']}:{u['state']}:u", 1), (f"{u['tier']}:{u['state']}:r", u["rows"])):
                stats[key] = stats.get(key, 0) + val
            if u["state"] in ACTIVE:
                stats[f"active:{u['tier']}"] = stats.get(f"active:{u['tier']}", 0) + 1
        for k, items in enumerate(snap["waiting"]):
            if items:
                pipe.zadd(self.p + f"wait:{k}", {src: i for i, (src, _) in enumerate(items)})
                pipe.hset(self.p + f"waitn:{k}", mapping={src: rows for src, rows in items})
                pipe.set(self.p + f"wseq:{k}", len(items))
            stats[f"waitrows:{k}"] = sum(rows for _, rows in items)
            stats[f"escalated:{k}"] = snap["escalated"][k]
        if units:
            for chunk in _chunks(list(units.items()), 5000):
                pipe.hset(self.p + "units", mapping=dict(chunk))
        queued = {u["id"]: now for u in snap["units"] if u["state"] == "queued"}
        for chunk in _chunks(list(queued.items()), 5000):
            pipe.zadd(self.p + "queued", dict(chunk))
        pipe.hset(self.p + "stats", mapping=stats)
        meta = {k: snap[k] for k in ("job_id", "epoch", "state", "rows", "tiers", "batch",
                                     "max_attempts")}
        meta.update(finalize_attempts=0, job_dir=snap["job_dir"])
        pipe.hset(self.p + "meta", mapping=meta)
        pipe.execute()

    def _keys(self, n: int) -> list[str]:
        keys = [self.p + k for k in ("meta", "units", "stats", "leases", "retry", "queued")]
        for k in range(n):
            keys += [self.p + f"wait:{k}", self.p + f"waitn:{k}", self.p + f"wseq:{k}"]
        return keys

    def delete(self):
        n = int(self.r.hget(self.p + "meta", "tiers") or 0)
        self.r.delete(*self._keys(max(n, 8)))

    def expire(self, seconds: int):
        n = int(self.r.hget(self.p + "meta", "tiers") or 0)
        pipe = self.r.pipeline(transaction=False)
        for key in self._keys(n):
            pipe.expire(key, seconds)
        pipe.execute()

    def register(self, job_dir: str):
        """Put the job in the registry of running jobs that every worker's reconciler reads."""
        self.r.hset(JOBS_KEY, self.job_id, job_dir)

    def unregister(self):
        self.r.hdel(JOBS_KEY, self.job_id)

    @contextlib.contextmanager
    def rebuild_lock(self):
        """Yields whether this process may rebuild the state: one at a time, under a lock that
        expires after one lease (a rebuilder that dies frees it)."""
        import redis    # only a cluster's state gets here; `cascade run` never imports redis

        lock = self.r.lock(self.p + "rebuild", timeout=self.lease, blocking=False)
        if not lock.acquire():
            yield False
            return
        try:
            yield True
        finally:
            try:
                lock.release()
            except redis.exceptions.LockError:  # held past its timeout: someone may have rebuilt too
                log.warning("job %s: the rebuild took longer than its lock's timeout (%.0f s, one "
                            "lease), so another worker may have rebuilt the state at the same time; "
                            "the rebuild is idempotent, but a lease this short for the job's size "
                            "makes it repeat (CASCADE_LEASE_SECONDS)", self.job_id, self.lease)

    def claim_pass(self, seconds: float) -> bool:
        """Whether this process does the job's next reconciler pass: one per `seconds`."""
        return bool(self.r.set(self.p + "reconciling", "1", nx=True, px=int(seconds * 1000)))

    def job(self) -> dict:
        m = {k.decode(): v.decode() for k, v in self.r.hgetall(self.p + "meta").items()}
        for k in ("rows", "tiers", "batch", "max_attempts", "finalize_attempts"):
            if k in m:
                m[k] = int(m[k])
        return m

    def set_state(self, state: str):
        self.r.hset(self.p + "meta", "state", state)

    # ------------------------------------------------------------ transitions
    def start(self, uid: str, worker: str, now: float) -> tuple[str, dict | None]:
        out = self._call("start", uid, worker, now)
        return out["verdict"], out.get("unit")

    def heartbeat(self, uid: str, now: float):
        self._call("heartbeat", uid, now)

    def fail(self, uid: str, error: str, due: float):
        self._call("fail", uid, error, due)

    def done(self, uid: str, targets: dict[int, int], now: float) -> Advance:
        out = self._call("done", uid, json.dumps({str(k): v for k, v in targets.items() if v}), now)
        return Advance(out["status"], _list(out.get("cuts")), bool(out.get("finalize")))

    def advance(self, now: float) -> Advance:
        out = self._call("advance", now)
        return Advance(out["status"], _list(out.get("cuts")), bool(out.get("finalize")))

    def queued(self, uids: list[str], now: float):
        if uids:
            self._call("queued", now, *uids)

    def reap(self, now: float, stale_after: float) -> Reaped:
        out = self._call("reap", now, stale_after)
        return Reaped(_list(out.get("requeued")), _list(out.get("cuts")), _list(out.get("stale")),
                      bool(out.get("finalize")))

    def finalized(self):
        self._call("finalized")

    def finalize_failed(self, error: str, due: float) -> str:
        return self._call("finalize_failed", error, due)["state"]

    # ------------------------------------------------------------ reading
    def lease_expired(self, now: float) -> dict[int, int]:
        """Per tier, running units whose lease has expired (their worker is presumed dead; the
        reconciler will send them again): O(expired units), read from the lease index."""
        uids = [u.decode() for u in self.r.zrangebyscore(self.p + "leases", "-inf", now)]
        out: dict[int, int] = {}
        if not uids:
            return out
        for raw in self.r.hmget(self.p + "units", uids):
            if raw:
                u = json.loads(raw)
                if u["state"] == "running":
                    out[u["tier"]] = out.get(u["tier"], 0) + 1
        return out

    def status(self) -> dict:
        n = int(self.r.hget(self.p + "meta", "tiers") or 0)
        st = _blank_status(n)
        for key, val in self.r.hgetall(self.p + "stats").items():
            parts, val = key.decode().split(":"), int(val)
            if len(parts) == 3 and val:
                k, state, what = int(parts[0]), parts[1], parts[2]
                s = st["tiers"][k]["states"].setdefault(state, {"units": 0, "rows": 0})
                s["units" if what == "u" else "rows"] = val
            elif parts[0] == "waitrows":
                st["tiers"][int(parts[1])]["waiting_rows"] = val
            elif parts[0] == "escalated":
                st["tiers"][int(parts[1])]["escalated"] = val
        retry = [m.decode() for m in self.r.zrange(self.p + "retry", 0, 99)]
        recs = self.r.hmget(self.p + "units", retry) if retry else []
        st["failing"] = [{"unit": u["id"], "error": u["error"], "attempts": u["attempts"]}
                         for u in (json.loads(x) for x in recs if x)]
        return st


JOBS_KEY = "cascade:jobs"          # Redis hash: job id -> job directory, while a job runs
# Redis hash: job directory -> {"count", "last", "at"} of reconciler passes over it that raised
RECONCILER_ERRORS = "cascade:reconciler:errors"
WORKERS_KEY = "cascade:workers:"     # + tier name: hash worker -> last heartbeat (unix time)


class Registry:
    """What a cluster's Redis knows beyond one job's state: the running jobs, the workers alive
    per tier, and the reconciler's failures per job directory."""

    def __init__(self, client):
        self.r = client

    def job_dirs(self) -> set[str]:
        """The directories of the jobs registered as running."""
        return {v.decode() for v in self.r.hvals(JOBS_KEY)}

    def drop_dir(self, job_dir: str):
        """Forget a finished or vanished job directory: its registry entries and its errors."""
        stale = [k for k, v in self.r.hgetall(JOBS_KEY).items() if v.decode() == job_dir]
        if stale:
            self.r.hdel(JOBS_KEY, *stale)
        self.r.hdel(RECONCILER_ERRORS, job_dir)

    def worker_heartbeat(self, tier: str, worker: str, now: float | None = None):
        """A worker says it is alive and serving `tier` (its reconciler does, every pass)."""
        self.r.hset(WORKERS_KEY + tier, worker, now or time.time())

    def tier_workers(self, tier: str, now: float, alive_within: float) -> dict:
        """{"alive": workers heard from within `alive_within` s, "last_seen_s": seconds since any
        worker of the tier was heard from (None: never)}; entries older than a day are dropped."""
        beats = {k.decode(): float(v) for k, v in self.r.hgetall(WORKERS_KEY + tier).items()}
        old = [k for k, t in beats.items() if now - t > 86400]
        if old:
            self.r.hdel(WORKERS_KEY + tier, *old)
        alive = sorted(k for k, t in beats.items() if now - t <= alive_within)
        last = max(beats.values(), default=None)
        return {"alive": alive, "last_seen_s": None if last is None else round(now - last, 1)}

    def record_error(self, job_dir: str, error: str):
        """Count a failed reconciler pass over a job directory, with the last error and its time
        (`cascade status` shows them)."""
        raw = self.r.hget(RECONCILER_ERRORS, job_dir)
        count = json.loads(raw)["count"] + 1 if raw else 1
        self.r.hset(RECONCILER_ERRORS, job_dir,
                    json.dumps({"count": count, "last": error, "at": time.time()}))

    def errors(self, job_dir: str) -> dict | None:
        raw = self.r.hget(RECONCILER_ERRORS, job_dir)
        return json.loads(raw) if raw else None

    def queue_length(self, queue: str) -> int:
        """Messages waiting in a broker queue (Celery's Redis transport keeps a list per queue)."""
        return self.r.llen(queue)


def _list(v) -> list:
    return v if isinstance(v, list) else []     # cjson encodes an empty array as {}


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


_CLIENTS: dict[str, object] = {}


def connect(url: str):
    """A Redis client for a broker URL (one per process and URL). Commands retry with
    exponential backoff for about half a minute (redis-py's Retry), so a Redis restart or a
    network blip is ridden out instead of failing the unit."""
    client = _CLIENTS.get(url)
    if client is None:
        import redis    # only a cluster connects; `cascade run` never imports redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry

        client = redis.Redis.from_url(
            url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=15,
            retry=Retry(ExponentialBackoff(cap=4, base=0.1), 12),
            retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
        _CLIENTS[url] = client
    return client
