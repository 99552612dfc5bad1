"""The durable manifest of a job (a JSON file in the job directory, never only in Redis) and the
lock that serialises its updates across worker processes and machines.

Lock: a Redis lock when the job runs on a Redis broker (works across machines sharing the job
directory); an fcntl lock on a file in the job directory otherwise (one machine).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time

from jobs.storage import Store

MANIFEST = "manifest.json"
_THREAD_LOCKS: dict[str, threading.RLock] = {}


@contextlib.contextmanager
def job_lock(store: Store, job_id: str, broker: str | None, timeout: float = 600):
    key = store.url
    tlock = _THREAD_LOCKS.setdefault(key, threading.RLock())
    with tlock:
        if broker and broker.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(broker)
            lock = client.lock(f"cascade:lock:{job_id}", timeout=timeout, blocking_timeout=timeout)
            if not lock.acquire():
                raise TimeoutError(f"job {job_id}: manifest lock not acquired in {timeout}s")
            try:
                yield
            finally:
                with contextlib.suppress(Exception):
                    lock.release()
        elif store.local:
            store.makedirs()
            fd = os.open(store.path(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                deadline = time.monotonic() + timeout
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() > deadline:
                            raise TimeoutError(f"job {job_id}: manifest lock not acquired") from None
                        time.sleep(0.01)
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        else:                       # one process on an in-memory or remote store without Redis
            yield


def load(store: Store) -> dict:
    return store.read_json(MANIFEST)


def save(store: Store, manifest: dict):
    manifest["updated"] = time.time()
    store.write_json(MANIFEST, manifest)
