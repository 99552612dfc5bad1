"""The state store contract, checked on both stores: MemoryState (embedded executor) and
RedisState (a real Redis, its Lua scripts). Same transitions, same answers."""

from __future__ import annotations

import uuid

import pytest
import redis

from jobs.state import MemoryState, RedisState, unit_record
from tests.services import require_redis

REDIS = "redis://127.0.0.1:6379/15"
LEASE = 10.0


@pytest.fixture(params=["memory", "redis"])
def state(request):
    if request.param == "memory":
        yield MemoryState(lease=LEASE)
        return
    require_redis(REDIS)
    st = RedisState(redis.Redis.from_url(REDIS), f"test-{uuid.uuid4().hex[:8]}", lease=LEASE)
    yield st
    st.delete()


def snapshot(units, waiting=None, tiers=3, batch=12):
    return {"job_id": "j", "job_dir": "/jobs/j", "epoch": "e0", "state": "running", "rows": 30,
            "tiers": tiers, "batch": batch, "max_attempts": 2, "units": units,
            "waiting": waiting or [[] for _ in range(tiers)], "escalated": [0] * tiers}


def counts(state, tier):
    return {k: (v["units"], v["rows"]) for k, v in state.status()["tiers"][tier]["states"].items()}


def test_units_leases_retries_cuts_and_finalize(state):
    t0 = 1000.0
    state.load(snapshot([unit_record(f"t0-s{i}", 0, f"routed/s{i}.arrow", 10) for i in range(3)]), t0)
    assert state.exists() and state.job()["state"] == "running"
    assert counts(state, 0) == {"queued": (3, 30)}

    verdict, rec = state.start("t0-s0", "w1", t0)
    assert verdict == "run" and rec["attempts"] == 1 and rec["worker"] == "w1"
    assert state.start("t0-s0", "w2", t0 + 1)[0] == "busy"          # held under a live lease
    assert state.start("nope", "w2", t0)[0] == "unknown"

    adv = state.done("t0-s0", {1: 5}, t0 + 2)
    assert adv.status == "done" and adv.cuts == [] and not adv.finalize  # 5 < 12, more may come
    assert state.start("t0-s0", "w2", t0 + 3)[0] == "done"
    state.start("t0-s1", "w1", t0 + 3)
    adv = state.done("t0-s1", {1: 8}, t0 + 4)
    assert [(c["tier"], c["rows"], c["sources"], c["state"]) for c in adv.cuts] == \
        [(1, 13, ["t0-s0", "t0-s1"], "cutting")]
    cut = adv.cuts[0]["id"]
    assert cut.startswith("t1-e0-") and adv.cuts[0]["file"] == f"work/t1/{cut}.arrow"
    assert state.done("t0-s1", {1: 8}, t0 + 5).status == "duplicate"   # recorded once
    assert state.status()["tiers"][1]["waiting_rows"] == 0
    assert state.status()["tiers"][0]["escalated"] == 13

    # an engine failure: retry when due, not before
    state.start("t0-s2", "w1", t0 + 5)
    state.fail("t0-s2", "boom", t0 + 50)
    assert state.status()["failing"] == [{"unit": "t0-s2", "error": "boom", "attempts": 1}]
    assert state.reap(t0 + 6, stale_after=100).requeued == []
    reaped = state.reap(t0 + 51, stale_after=100)
    assert [u["id"] for u in reaped.requeued] == ["t0-s2"]
    # the cut was never written: its lease expires and the reconciler is told to write it
    assert [u["id"] for u in reaped.cuts] == [cut]

    # a worker dies holding t0-s2: its lease expires and it is queued again (attempt 2 next)
    assert state.start("t0-s2", "w3", t0 + 52)[1]["attempts"] == 2
    assert state.reap(t0 + 52 + LEASE / 2, stale_after=100).requeued == []
    state.heartbeat("t0-s2", t0 + 52 + LEASE / 2)                   # renewed: still alive
    assert state.reap(t0 + 52 + LEASE + 1, stale_after=100).requeued == []
    reaped = state.reap(t0 + 52 + 1.5 * LEASE + 1, stale_after=100)
    assert [u["id"] for u in reaped.requeued] == ["t0-s2"]
    assert state.start("t0-s2", "w4", t0 + 70)[1]["attempts"] == 3

    state.queued([cut], t0 + 70)
    assert counts(state, 1) == {"queued": (1, 13)}
    # stale queued units are reported after stale_after
    assert [u["id"] for u in state.reap(t0 + 75, stale_after=3).stale] == [cut]

    # the last tier-0 unit: nothing can arrive for tier 1 any more, its 2 rows flush at once
    adv = state.done("t0-s2", {1: 2, 2: 1}, t0 + 80)
    assert [(c["tier"], c["rows"]) for c in adv.cuts] == [(1, 2)]
    assert state.status()["tiers"][2]["waiting_rows"] == 1             # tier 1 still active
    state.queued([c["id"] for c in adv.cuts], t0 + 80)
    small = adv.cuts[0]["id"]
    for uid, targets in ((cut, {2: 4}), (small, {})):
        state.start(uid, "w", t0 + 81)
        adv = state.done(uid, targets, t0 + 82)
    assert [(c["tier"], c["rows"], sorted(c["sources"])) for c in adv.cuts] == \
        [(2, 5, sorted(["t0-s2", cut]))]
    assert not adv.finalize
    last = adv.cuts[0]["id"]
    state.queued([last], t0 + 83)
    state.start(last, "w", t0 + 83)
    adv = state.done(last, {}, t0 + 84)
    assert adv.finalize and state.job()["state"] == "finalizing"
    assert counts(state, 0) == {"done": (3, 30)} and counts(state, 2) == {"done": (1, 5)}

    # finalize: a failure is recorded and retried when due; then done
    assert state.finalize_failed("disk full", t0 + 90) == "finalizing"
    assert state.job()["finalize_error"] == "disk full"
    assert not state.reap(t0 + 85, stale_after=100).finalize
    assert state.reap(t0 + 91, stale_after=100).finalize
    state.finalized()
    assert state.job()["state"] == "done"


def test_finalize_lease_expiry_and_last_attempt(state):
    state.load(snapshot([unit_record("t0-s0", 0, "routed/s0.arrow", 4)]), 0.0)
    state.start("t0-s0", "w", 0.0)
    assert state.done("t0-s0", {}, 1.0).finalize
    assert not state.reap(2.0, stale_after=100).finalize
    assert state.reap(1.0 + LEASE + 0.1, stale_after=100).finalize       # the finalizer died
    assert state.finalize_failed("x", 20.0) == "finalizing"
    assert state.finalize_failed("y", 30.0) == "failed"                  # max_attempts 2
    assert state.job()["state"] == "failed"


def test_cancelled_jobs_start_nothing_and_cut_nothing(state):
    state.load(snapshot([unit_record(f"t0-s{i}", 0, f"routed/s{i}.arrow", 10) for i in range(2)],
                        waiting=[[], [("s9", 3)], []]), 0.0)
    assert state.start("t0-s0", "w", 1.0)[0] == "run"
    state.set_state("cancelled")
    assert state.start("t0-s1", "w", 1.0)[0] == "cancelled"
    # A unit that was running when the job was cancelled commits its 10 escalated rows: with
    # 13 rows waiting for tier 1 (batch 12) a running job would cut, a cancelled one cuts nothing
    # and never moves to finalizing.
    adv = state.done("t0-s0", {1: 10}, 2.0)
    assert adv.cuts == [] and not adv.finalize
    assert state.job()["state"] == "cancelled"
    assert state.reap(1000.0, stale_after=1e9).cuts == []
    state.set_state("running")                     # the same commit on a running job does cut
    adv = state.advance(3.0)
    assert [(c["rows"], c["sources"]) for c in adv.cuts] == [(13, ["s9", "t0-s0"])]   # FIFO


def test_scripts_on_a_state_that_is_gone_change_nothing(state):
    """Redis restarted empty under a worker: its late calls find nothing and create nothing, so
    the rebuild from the job directory is not blocked by a half-made state."""
    assert not state.exists()
    assert state.start("t0-s0", "w", 1.0)[0] == "unknown"
    assert state.done("t0-s0", {1: 3}, 2.0).status == "unknown"
    state.fail("t0-s0", "x", 3.0)
    state.heartbeat("t0-s0", 3.0)
    state.queued(["t0-s0"], 3.0)
    if isinstance(state, RedisState):          # the finalizer's last calls (memory has no gap)
        state.finalized()
        assert state.finalize_failed("disk full", 9.0) == "running"
        assert state.r.keys(state.p + "*") == []
    assert not state.exists()


def test_a_running_unit_past_its_lease_is_reported_as_such():
    """Redis only: `cascade status` reads expired leases from the Redis lease index (a memory
    state lives in the one process that runs the job, where no lease expires)."""
    require_redis(REDIS)
    state = RedisState(redis.Redis.from_url(REDIS), f"test-{uuid.uuid4().hex[:8]}", lease=LEASE)
    state.load(snapshot([unit_record(f"t0-s{i}", 0, f"routed/s{i}.arrow", 10) for i in range(2)]), 0.0)
    state.start("t0-s0", "w", 1.0)
    state.start("t0-s1", "w", 5.0)
    assert state.lease_expired(1.0 + LEASE - 0.1) == {}
    assert state.lease_expired(1.0 + LEASE + 0.1) == {0: 1}
    assert state.lease_expired(5.0 + LEASE + 0.1) == {0: 2}
    state.delete()
