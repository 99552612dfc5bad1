"""Integration: real Redis, real Celery worker processes (solo pool), the job system end to end
through the broker. Engines are the scripted test double (tests/doubles.py), loaded into the
workers with CASCADE_PLUGINS; the real models are covered by test_e2e_models.

Fault tests start their own redis-server on another port, kill -9 workers (at random, and at each
named crash point, jobs/failpoints.py) and kill Redis and restart it empty, and check that the
job finishes by itself, with no `resume`, with exactly one result row per input row. A small
supervisor in the test restarts dead workers, as a container restart policy would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest
import redis

import tests.doubles  # noqa: F401  (registers the scripted engine for spec validation)
from jobs import control
from jobs.job import Job
from jobs.submit import submit
from jobs.spec import parse_spec
from tests.redis_server import free_port, start_redis_server
from tests.services import require_redis, require_redis_server
from workers.celery_app import celery_dispatcher

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent
MAIN_REDIS = "redis://127.0.0.1:6379/15"


LEASE = 2.0          # seconds; the fault tests expect recovery within a few leases


def start_worker(tier: str, broker: str, log: Path, delay: float = 0.0, **env) -> subprocess.Popen:
    """A worker process; its jobs root is the test's directory (the log's) unless env says."""
    env = {**os.environ, "CASCADE_JOBS_ROOT": str(Path(log).parent),
           "CASCADE_PLUGINS": "tests.doubles", "CASCADE_SCRIPTED_DELAY": str(delay),
           "CASCADE_VISIBILITY_TIMEOUT": "3600", "PYTHONPATH": str(ROOT),
           "CASCADE_LEASE_SECONDS": str(LEASE), "CASCADE_RETRY_BACKOFF": "0.2",
           **{k: str(v) for k, v in env.items()}}
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "worker", "--tier", tier, "--broker", broker,
         "--loglevel", "WARNING", "--hostname", f"{tier}@{uuid.uuid4().hex[:6]}"],
        cwd=ROOT, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_done(job_dir: str, timeout: float = 90, supervise=None) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if supervise:
            supervise()
        try:
            st = control.status(job_dir)
        except redis.exceptions.ConnectionError:      # Redis down in a fault test
            time.sleep(0.2)
            continue
        if st["state"] == "done":
            return st
        time.sleep(0.2)
    raise AssertionError(f"job not done in {timeout}s: {st}")


def make_spec(tmp_path, n_rows: int, tiers: list[str], shard_rows=10, batch_rows=12, **extra):
    pl.DataFrame({"prompt": [f"item {i} w{i}" for i in range(n_rows)],
                  "reference": [f"x{i}" for i in range(n_rows)]}).write_parquet(tmp_path / "in.parquet")
    return parse_spec({
        "name": "celery", "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "jobs" / "job"),
        "shard_rows": shard_rows, "batch_rows": batch_rows,
        "tiers": [{"name": t, "model": "scripted", "engine": "scripted", "cost": {"per_token": 1 + i}}
                  for i, t in enumerate(tiers)],
        "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}, **extra})


def check_results(job_dir: str, n_rows: int) -> pl.DataFrame:
    """Every row once, and every row's lineage follows the rule (escalate while first_logprob <
    -0.5): each run's decision names the next run, and a row whose last run is unconfident
    reached the job's last tier. A row whose escalation was lost (a crash between its unit's
    commit and the cut, a work file never sent) stops unconfident short of the last tier, and
    fails here."""
    import json

    last_tier = len(json.loads(Path(job_dir, "job.json").read_text())["spec"]["tiers"]) - 1
    out = pl.read_parquet(f"{job_dir}/results/*.parquet")
    assert len(out) == n_rows and out["id"].is_unique().all()
    assert (out["status"] == "ok").all()
    for rid, ts in zip(out["id"].to_list(), out["tiers"].to_list()):
        for t, nxt in zip(ts, ts[1:]):
            assert t["first_logprob"] < -0.5 and t["decision"] == f"escalate:{nxt['tier']}", (rid, ts)
        last = ts[-1]
        assert last["decision"] == "stop", (rid, ts)
        assert last["first_logprob"] >= -0.5 or last["tier"] == last_tier, (rid, ts)
    return out


@pytest.fixture
def main_redis():
    require_redis(MAIN_REDIS)


@pytest.fixture
def tier_names():
    tag = uuid.uuid4().hex[:6]
    return [f"a{tag}", f"b{tag}"]


@pytest.mark.usefixtures("main_redis")
def test_job_through_redis_and_celery_workers(tmp_path, tier_names):
    workers = [start_worker(t, MAIN_REDIS, tmp_path / f"{t}.log") for t in tier_names]
    try:
        spec = make_spec(tmp_path, 60, tier_names)
        job = submit(spec, broker=MAIN_REDIS, dispatch=celery_dispatcher(MAIN_REDIS))
        st = wait_done(job.dir)
        out = check_results(job.dir, 60)
        assert st["tiers"][1]["rows_done"] == (out["tiers_run"].list.len() == 2).sum() > 0
        assert st["tiers"][0]["states"]["done"]["units"] == 6
        # the job's Redis keys are its own and it left the registry of running jobs
        assert not redis.Redis.from_url(MAIN_REDIS).hexists("cascade:jobs", job.id)
    finally:
        for w in workers:
            stop(w)


@pytest.fixture
def own_redis(tmp_path):
    require_redis_server()
    port = free_port()
    procs = []

    def start():
        procs.append(start_redis_server(port))
        return procs[-1]

    start()
    yield f"redis://127.0.0.1:{port}/0", start, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


class Cluster:
    """Worker processes on their tiers, restarted when they die (a container restart policy)."""

    def __init__(self, tmp_path, url, tiers, delay=0.0, **env):
        self.tmp, self.url, self.delay = tmp_path, url, delay
        self.env = {"CASCADE_JOBS_ROOT": tmp_path / "jobs", **env}
        self.procs = {f"{t}-{i}": [t, None] for i, t in enumerate(tiers)}
        self.restarts = 0
        self.supervise()

    def supervise(self):
        for name, slot in self.procs.items():
            if slot[1] is None or slot[1].poll() is not None:
                self.restarts += slot[1] is not None
                slot[1] = start_worker(slot[0], self.url, self.tmp / f"{name}.log", self.delay, **self.env)

    def kill(self, rng):
        name = rng.choice(sorted(self.procs))
        stop(self.procs[name][1])

    def stop(self):
        for _, p in self.procs.values():
            stop(p)


def test_redis_restart_empty_heals_by_itself(tmp_path, tier_names, own_redis):
    """Redis dies with every queued message and all job state, and comes back empty: the
    workers' reconciler rebuilds the job's state from its directory and sends its units again;
    no `resume`."""
    url, start, procs = own_redis
    spec = make_spec(tmp_path, 40, tier_names)
    job = submit(spec, broker=url, dispatch=celery_dispatcher(url))   # no workers yet
    procs[-1].kill()
    procs[-1].wait()
    start()
    assert redis.Redis.from_url(url).dbsize() == 0
    cluster = Cluster(tmp_path, url, tier_names)
    try:
        wait_done(job.dir, 30, cluster.supervise)
        check_results(job.dir, 40)
    finally:
        cluster.stop()


def test_worker_killed_mid_unit_heals_by_itself(tmp_path, tier_names, own_redis):
    """kill -9 of a worker holding a unit: its lease expires and another worker runs the unit,
    long before the broker's visibility timeout (an hour here) would redeliver it."""
    url, _, _ = own_redis
    spec = make_spec(tmp_path, 40, tier_names)
    slow = start_worker(tier_names[0], url, tmp_path / "slow.log", delay=1.0)
    job = submit(spec, broker=url, dispatch=celery_dispatcher(url))
    deadline = time.time() + 30
    while time.time() < deadline:      # wait until the first unit is running, then kill -9
        if "running" in control.status(job.dir)["tiers"][0]["states"]:
            break
        time.sleep(0.05)
    stop(slow)
    st = control.status(job.dir)
    assert "running" in st["tiers"][0]["states"] and st["state"] == "running"
    cluster = Cluster(tmp_path, url, tier_names)
    try:
        t0 = time.time()
        wait_done(job.dir, 30, cluster.supervise)
        assert time.time() - t0 < 10 * LEASE
        check_results(job.dir, 40)
    finally:
        cluster.stop()


KILL_POINTS = ["before_result_write", "after_result_write", "after_state_update", "between_commit_and_cut",
               "before_dispatch",
               "holding_rebuild_lock", "during_finalize"]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_kill_at_each_point_heals_by_itself(tmp_path, tier_names, own_redis, point):
    """A worker is killed (SIGKILL) at a named point of the protocol; the job still finishes by
    itself within a few leases, every row exactly once."""
    url, _, _ = own_redis
    (tmp_path / "fp").mkdir()
    spec = make_spec(tmp_path, 60, tier_names)
    rebuild = point == "holding_rebuild_lock"
    # For the rebuild point the engine is slowed so that the state is lost mid-job, not after it.
    cluster = Cluster(tmp_path, url, tier_names, delay=0.2 if rebuild else 0.0, CASCADE_FAILPOINT=point,
                      CASCADE_FAILPOINT_DIR=tmp_path / "fp")
    try:
        time.sleep(1.0)                                 # workers up and their reconcilers too
        t0 = time.time()
        job = submit(spec, broker=url, dispatch=celery_dispatcher(url))
        if rebuild:                                     # lose the state so that one is rebuilt
            deadline = time.time() + 10 * LEASE
            while control.status(job.dir)["tiers"][0]["rows_done"] == 0 and time.time() < deadline:
                time.sleep(0.05)
            assert control.status(job.dir)["state"] == "running"
            redis.Redis.from_url(url).flushall()
        wait_done(job.dir, 20 * LEASE, cluster.supervise)
        assert time.time() - t0 < 10 * LEASE            # a few leases, worker restart included
        assert (tmp_path / "fp" / f"{point}.fired").exists()        # the kill happened
        assert cluster.restarts >= 1
        check_results(job.dir, 60)
    finally:
        cluster.stop()


def test_chaos_random_kills_and_a_redis_restart(tmp_path, own_redis):
    """Random kill -9 of workers throughout a 3-tier job, and Redis killed and restarted empty in
    the middle: the job finishes with no `resume`, exactly one result row per input row."""
    import random

    url, start, procs = own_redis
    rng = random.Random(7)
    tiers = [f"c{i}{uuid.uuid4().hex[:4]}" for i in range(3)]
    spec = make_spec(tmp_path, 1500, tiers, shard_rows=50, batch_rows=60, max_attempts=20)
    cluster = Cluster(tmp_path, url, [tiers[0], tiers[0], tiers[1], tiers[2]], delay=0.3)
    try:
        job = submit(spec, broker=url, dispatch=celery_dispatcher(url))
        kills = 0
        for step in range(12):
            time.sleep(rng.uniform(0.3, 1.2))
            if step == 5:
                assert not Job(job.dir).finished()       # the restart lands mid-job
                procs[-1].kill()
                procs[-1].wait()
                time.sleep(0.5)
                start()                                  # empty: no queue, no state
            else:
                cluster.kill(rng)
                kills += 1
            cluster.supervise()
        wait_done(job.dir, 120, cluster.supervise)
        assert kills == 11 and cluster.restarts >= 11
        out = check_results(job.dir, 1500)
        assert len(out) == 1500
    finally:
        cluster.stop()


@pytest.mark.usefixtures("main_redis")
def test_cli_submit_status_cancel_resume_report(tmp_path, tier_names, monkeypatch):
    import json as _json

    import yaml
    from click.testing import CliRunner

    from jobs.cli import main

    spec = make_spec(tmp_path, 30, tier_names)
    raw = {"name": "cli", "input": spec.input, "output": spec.output, "shard_rows": 10,
           "tiers": [{"name": t.name, "model": "scripted", "engine": "scripted"} for t in spec.tiers],
           "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("CASCADE_BROKER", MAIN_REDIS)
    run = CliRunner()
    res = run.invoke(main, ["submit", str(tmp_path / "job.yaml")])
    assert res.exit_code == 0, res.output
    job_dir = res.output.strip().splitlines()[-1]
    res = run.invoke(main, ["cancel", job_dir])            # before any worker runs
    assert res.exit_code == 0 and "state cancelled" in res.output
    workers = [start_worker(t, MAIN_REDIS, tmp_path / f"{t}.log") for t in tier_names]
    try:
        time.sleep(1.5)                                    # workers drain and skip the units
        st = _json.loads(run.invoke(main, ["status", job_dir, "--json"]).output)
        assert st["state"] == "cancelled" and st["tiers"][0]["rows_done"] == 0
        res = run.invoke(main, ["resume", job_dir])
        assert res.exit_code == 0 and "re-enqueued 3 units" in res.output, res.output
        wait_done(job_dir)
        res = run.invoke(main, ["status", job_dir])
        assert "state done" in res.output and "tier 0" in res.output
        res = run.invoke(main, ["report", job_dir])
        assert res.exit_code == 0 and "Escalation funnel" in res.output
        check_results(job_dir, 30)
    finally:
        for w in workers:
            stop(w)
    res = run.invoke(main, ["submit", str(tmp_path / "job.yaml")])
    assert res.exit_code == 2 and "a job already lives here" in res.output


def test_worker_with_a_wrong_password_fails_at_start_with_a_clear_message(tmp_path):
    require_redis_server()
    port = free_port()
    server = start_redis_server(port, password="s3cret")
    try:
        for k, (url, needle) in enumerate(((f"redis://:wrong@127.0.0.1:{port}/0", "refused the password"),
                                           (f"redis://127.0.0.1:{port}/0", "needs a password"))):
            w = start_worker("x", url, tmp_path / f"w{k}.log")
            assert w.wait(60) != 0
            text = (tmp_path / f"w{k}.log").read_text()
            assert needle in text, text
            assert ":wrong@" not in text                   # the password is not echoed
    finally:
        server.kill()
        server.wait()


def test_workers_refuse_job_directories_outside_the_jobs_root(tmp_path, tier_names, own_redis):
    url, _, _ = own_redis
    spec = make_spec(tmp_path, 20, tier_names)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    w = start_worker(tier_names[0], url, tmp_path / "w.log", CASCADE_JOBS_ROOT=elsewhere)
    try:
        job = submit(spec, broker=url, dispatch=celery_dispatcher(url))
        deadline = time.time() + 30
        while "refused unit" not in (tmp_path / "w.log").read_text() and time.time() < deadline:
            time.sleep(0.2)
        assert f"job directory {job.dir} is not under CASCADE_JOBS_ROOT={elsewhere}" in \
            (tmp_path / "w.log").read_text()
        assert control.status(job.dir)["tiers"][0]["rows_done"] == 0
    finally:
        stop(w)


@pytest.mark.usefixtures("main_redis")
def test_reconciler_goes_on_past_a_bad_job_and_counts_it_in_status(tmp_path, tier_names, monkeypatch):
    """One job directory whose pass raises (here: unreadable job.json; a job whose reconcile
    raises) ends neither the pass nor the reconciler: the other job is still reconciled, and the
    failures are logged and counted where `cascade status` shows them."""
    from jobs import recovery
    from jobs.cli import _alerts
    from jobs.job import live_state
    from jobs.state import JOBS_KEY, RECONCILER_ERRORS, Registry
    from workers.reconciler import Reconciler

    client = redis.Redis.from_url(MAIN_REDIS)
    jobs = []
    for k in range(2):
        (tmp_path / f"j{k}").mkdir()
        jobs.append(submit(make_spec(tmp_path / f"j{k}", 20, tier_names), broker=MAIN_REDIS,
                           dispatch=lambda *a, **kw: None))
    bad_dir = tmp_path / "corrupt"
    bad_dir.mkdir()
    (bad_dir / "job.json").write_text("{not json")
    client.hset(JOBS_KEY, "corrupt-" + tier_names[0], str(bad_dir))
    seen = []

    def reconcile(job, state, dispatch, queue_len=None):
        seen.append(job.dir)
        if job.dir == jobs[0].dir:
            raise RuntimeError("a unit file that cannot be read")

    monkeypatch.setattr(recovery, "reconcile", reconcile)
    rec = Reconciler(MAIN_REDIS, dispatch=None, queue_len=lambda tier: 0, every=0.5)
    try:
        for _ in range(2):
            rec.tick()
            for j in jobs:                                   # let the next pass visit both again
                client.delete(live_state(j).p + "reconciling")
        assert seen.count(jobs[1].dir) == 2 and seen.count(jobs[0].dir) == 2
        err = Registry(client).errors(str(bad_dir))
        assert err["count"] == 2 and "JSONDecodeError" in err["last"]
        st = control.status(jobs[0].dir)
        assert st["reconciler_errors"]["count"] == 2
        assert "RuntimeError: a unit file that cannot be read" in st["reconciler_errors"]["last"]
        assert any("RECONCILER FAILED 2 time(s)" in line for line in _alerts(st))
        assert control.status(jobs[1].dir)["reconciler_errors"] is None
    finally:
        client.hdel(JOBS_KEY, "corrupt-" + tier_names[0])
        client.hdel(RECONCILER_ERRORS, str(bad_dir), *(j.dir for j in jobs))
        for j in jobs:
            control.cancel(j.dir)


def test_check_results_catches_a_lost_escalation(tmp_path):
    """The result check every Redis and fault test uses sees a lost escalation: a row whose
    later runs never happened, its last run rewritten to look like a plain stop (what a row
    whose cut was lost would show), fails it; the untouched job passes."""
    from jobs.embedded import run_embedded
    from tests.doubles import scripted_factory

    job = run_embedded(make_spec(tmp_path, 40, ["a", "b"]), engine_factory=scripted_factory())
    out = check_results(job.dir, 40)
    rows = out.to_dicts()
    k = next(i for i, r in enumerate(rows) if len(r["tiers"]) == 2)
    lost = dict(rows[k]["tiers"][0], decision="stop")          # escalation lost: stops at tier 0
    rows[k] = {**rows[k], "tiers": [lost], "tiers_run": [0], "final_tier": 0}
    for p in Path(job.dir, "results").glob("*.parquet"):
        p.unlink()
    pl.DataFrame(rows, schema=out.schema).write_parquet(Path(job.dir, "results", "part-0.parquet"))
    with pytest.raises(AssertionError):
        check_results(job.dir, 40)


def cli(*args, env=None, timeout=60) -> tuple[int, str, float]:
    """`cascade ARGS` in a fresh process as a user runs it: (exit status, output, seconds)."""
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_BROKER"} | {
        "CASCADE_PLUGINS": "tests.doubles", "PYTHONPATH": str(ROOT)} | (env or {})
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    return out.returncode, (out.stdout + out.stderr).strip(), time.monotonic() - t0


def test_broker_mistakes_fail_in_seconds_with_one_line_and_nothing_written(tmp_path, tier_names):
    """submit, status and resume against a closed port, a wrong password and a missing one, and
    with a broker that is not Redis: exit 2 within 10 s, one line, no password echoed, and a
    failed submit leaves nothing. Job files never hold the password; status and resume take it
    from --broker (or CASCADE_BROKER), and resume prints the URL redacted."""
    import yaml

    require_redis_server()
    port, closed = free_port(), free_port()
    server = start_redis_server(port, password="s3cret")
    good = f"redis://:s3cret@127.0.0.1:{port}/0"
    spec = make_spec(tmp_path, 30, tier_names)
    raw = {"name": "b", "input": spec.input, "shard_rows": 10,
           "tiers": [{"name": t.name, "model": "scripted", "engine": "scripted"} for t in spec.tiers],
           "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({**raw, "output": str(tmp_path / "good")}))

    def one_line_failure(res, needle):
        code, text, seconds = res
        assert code == 2 and seconds < 10, res
        assert len(text.splitlines()) == 1 and text.startswith("error: ") and needle in text, res
        assert "s3cret" not in text and "wrong" not in text.replace(":***@", ""), res

    try:
        bad = {"closed": (f"redis://127.0.0.1:{closed}/0", "cannot reach the broker"),
               "wrong": (f"redis://:wrong@127.0.0.1:{port}/0", "refused the password"),
               "missing": (f"redis://127.0.0.1:{port}/0", "needs a password"),
               "amqp": ("amqp://guest@127.0.0.1:5672//", "is not a Redis URL")}
        for name, (url, needle) in bad.items():
            out = tmp_path / f"failed-{name}"
            one_line_failure(cli("submit", str(tmp_path / "job.yaml"), "--broker", url, "--output", str(out)), needle)
            assert not out.exists()

        code, text, _ = cli("submit", str(tmp_path / "job.yaml"), "--broker", good)
        assert code == 0, text
        job_dir = text.splitlines()[-1]
        for f in Path(job_dir).rglob("*"):
            if f.is_file():
                assert b"s3cret" not in f.read_bytes(), f
        assert json.loads(Path(job_dir, "job.json").read_text())["broker"] == f"redis://127.0.0.1:{port}/0"

        one_line_failure(cli("status", job_dir), "needs a password")
        one_line_failure(cli("status", job_dir, "--broker", bad["wrong"][0]), "refused the password")
        one_line_failure(cli("resume", job_dir, "--broker", bad["wrong"][0]), "refused the password")
        code, text, _ = cli("status", job_dir, "--json", env={"CASCADE_BROKER": good})
        assert code == 0 and json.loads(text)["state"] == "running", text
        code, text, _ = cli("resume", job_dir, "--broker", good)
        assert code == 0 and f"on redis://:***@127.0.0.1:{port}/0" in text and "s3cret" not in text, text
        server.kill()
        server.wait()
        one_line_failure(cli("status", job_dir, "--broker", good), "cannot reach the broker")
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_a_worker_started_while_redis_is_down_serves_once_it_is_up(tmp_path, tier_names):
    require_redis_server()
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    workers = [start_worker(t, url, tmp_path / f"{t}.log", CASCADE_BROKER_WAIT=60) for t in tier_names]
    server = None
    try:
        time.sleep(3.0)                                   # both started and waiting for Redis
        assert all(w.poll() is None for w in workers)
        server = start_redis_server(port)
        job = submit(make_spec(tmp_path, 30, tier_names), broker=url, dispatch=celery_dispatcher(url))
        wait_done(job.dir, 60)
        check_results(job.dir, 30)
        log = (tmp_path / f"{tier_names[0]}.log").read_text()
        assert "cannot reach the broker" in log and "trying again" in log, log
    finally:
        for w in workers:
            stop(w)
        if server is not None:
            server.kill()
            server.wait()


def test_job_deep_below_the_root_heals_after_redis_and_every_worker_restart(tmp_path, tier_names, own_redis):
    """A job two levels below the jobs root, submitted by a process that does not know the root;
    mid-job Redis dies and comes back empty, and every worker is killed and restarted while it is
    down. Nothing that ran before remembers the job; the jobs root's index (written by the first
    worker that ran one of its units) is how the new workers find it. It finishes by itself,
    every row exactly once."""
    url, start, procs = own_redis
    spec = make_spec(tmp_path, 60, tier_names, output=str(tmp_path / "jobs" / "nightly" / "2026-12-07"))
    cluster = Cluster(tmp_path, url, tier_names, delay=0.3, CASCADE_BROKER_WAIT=60)
    try:
        job = submit(spec, broker=url, dispatch=celery_dispatcher(url))
        deadline = time.time() + 30
        while control.status(job.dir)["tiers"][0]["rows_done"] == 0 and time.time() < deadline:
            time.sleep(0.05)
        assert control.status(job.dir)["state"] == "running"
        assert list((tmp_path / "jobs" / ".cascade-jobs").glob("*.json"))   # indexed by a worker
        procs[-1].kill()
        procs[-1].wait()
        cluster.stop()                                   # every worker dies ...
        cluster.supervise()                              # ... and restarts while Redis is down
        time.sleep(2.0)
        assert all(p.poll() is None for _, p in cluster.procs.values())     # waiting, not exited
        start()
        assert redis.Redis.from_url(url).dbsize() == 0
        wait_done(job.dir, 20 * LEASE, cluster.supervise)
        check_results(job.dir, 60)
        assert not list((tmp_path / "jobs" / ".cascade-jobs").glob("*.json"))   # done: unindexed
    finally:
        cluster.stop()


def test_a_worker_without_a_jobs_root_refuses_to_start_and_says_why(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CASCADE_JOBS_ROOT"}
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "worker", "--tier", "x", "--broker", MAIN_REDIS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "CASCADE_JOBS_ROOT is not set" in out.stderr, out.stderr


@pytest.mark.usefixtures("main_redis")
def test_status_says_what_a_job_waits_for(tmp_path, tier_names):
    """No worker for a tier whose units wait: status says so and names the command; a worker
    that starts is counted from its heartbeat; a worker for a tier no job has says so at start."""
    from jobs.cli import _alerts

    job = submit(make_spec(tmp_path, 30, tier_names), broker=MAIN_REDIS, dispatch=celery_dispatcher(MAIN_REDIS))
    stray = start_worker(f"nosuch{tier_names[0]}", MAIN_REDIS, tmp_path / "stray.log")
    try:
        st = control.status(job.dir)
        assert st["tiers"][0]["workers"] == 0 and st["tiers"][0]["worker_last_seen_s"] is None
        assert any(f"tier 0 ({tier_names[0]}): 3 unit(s) wait and no worker has ever served it; start "
                   f"`cascade worker --tier {tier_names[0]}`" in line for line in _alerts(st)), _alerts(st)
        control.cancel(job.dir)                      # the worker below drains without running
        w = start_worker(tier_names[0], MAIN_REDIS, tmp_path / "w.log")
        try:
            deadline = time.time() + 20
            while control.status(job.dir)["tiers"][0]["workers"] == 0 and time.time() < deadline:
                time.sleep(0.2)
            st = control.status(job.dir)
            assert st["tiers"][0]["workers"] == 1 and st["tiers"][0]["worker_last_seen_s"] < 5
        finally:
            stop(w)
        deadline = time.time() + 20
        while "no running job has a tier named" not in (tmp_path / "stray.log").read_text() and time.time() < deadline:
            time.sleep(0.2)
        assert f"no running job has a tier named 'nosuch{tier_names[0]}'" in (tmp_path / "stray.log").read_text()
        assert stray.poll() is None                  # and it keeps serving
    finally:
        stop(stray)


@pytest.mark.usefixtures("main_redis")
def test_overwrite_retires_the_old_jobs_live_state(tmp_path, tier_names, monkeypatch):
    from jobs import roots
    from jobs.state import JOBS_KEY

    monkeypatch.setenv("CASCADE_JOBS_ROOT", str(tmp_path))
    spec = make_spec(tmp_path, 30, tier_names)
    old = submit(spec, broker=MAIN_REDIS, dispatch=lambda *a: None)
    client = redis.Redis.from_url(MAIN_REDIS)
    assert client.keys(f"cascade:job:{old.id}:*") and client.hexists(JOBS_KEY, old.id)
    assert old.id in roots.indexed_jobs()
    new = submit(spec, broker=MAIN_REDIS, dispatch=lambda *a: None, overwrite=True)
    try:
        assert not client.keys(f"cascade:job:{old.id}:*") and not client.hexists(JOBS_KEY, old.id)
        assert set(roots.indexed_jobs()) == {new.id}
    finally:
        control.cancel(new.dir)
        client.hdel(JOBS_KEY, new.id)


@pytest.mark.usefixtures("main_redis")
def test_nightly_beat_schedule_and_task_submit_a_dated_job(tmp_path, tier_names, monkeypatch):
    """The scheduler service's beat entry comes from CASCADE_NIGHTLY_SPECS / CASCADE_NIGHTLY_AT;
    its task submits the spec for the night's date (filling {date}), and a second call for the
    same night submits nothing."""
    import json as _json

    from celery.schedules import crontab

    from workers import celery_app

    sched = celery_app.nightly_schedule({"CASCADE_NIGHTLY_SPECS": "/a.yaml, /b.yaml",
                                         "CASCADE_NIGHTLY_AT": "03:15"})
    assert sorted(sched) == ["nightly /a.yaml", "nightly /b.yaml"]
    entry = sched["nightly /a.yaml"]
    assert entry["schedule"] == crontab(hour=3, minute=15) and entry["args"] == ["/a.yaml"]
    assert entry["options"]["queue"] == celery_app.SCHEDULE_QUEUE
    with pytest.raises(ValueError, match="CASCADE_NIGHTLY_AT must be HH:MM"):
        celery_app.nightly_schedule({"CASCADE_NIGHTLY_SPECS": "/a.yaml", "CASCADE_NIGHTLY_AT": "3pm"})

    spec = make_spec(tmp_path, 20, tier_names)
    raw = {"name": "nightly", "input": spec.input, "output": str(tmp_path / "nightly" / "{date}"),
           "tiers": [{"name": t, "model": "scripted", "engine": "scripted"} for t in tier_names],
           "policy": {"rule": {"threshold": -0.5}}}
    (tmp_path / "nightly.yaml").write_text(_json.dumps(raw))
    monkeypatch.setattr(celery_app.app.conf, "broker_url", MAIN_REDIS)
    out = celery_app.submit_nightly.run(str(tmp_path / "nightly.yaml"), "2026-12-05")
    try:
        assert out == str(tmp_path / "nightly" / "2026-12-05")
        job = Job(out)
        assert job.submitted() and job.spec.date == "2026-12-05" and job.broker == MAIN_REDIS
        assert celery_app.submit_nightly.run(str(tmp_path / "nightly.yaml"), "2026-12-05") == out
        assert Job(out).id == job.id                     # the same night is not submitted twice
    finally:
        control.cancel(out)


@pytest.mark.usefixtures("main_redis")
def test_two_jobs_and_many_workers_share_an_answer_store(tmp_path, tier_names):
    """Concurrent writers: two jobs over the same rows, run at once by two worker processes per
    tier, add to one answer store. Every segment they wrote reads back; a third run over the
    same rows computes nothing (embedded, engine calls counted) and answers as the first;
    compaction leaves one answer per row and tier."""
    from jobs import answers
    from jobs.embedded import run_embedded
    from tests.doubles import scripted_factory

    store = tmp_path / "answers"
    workers = [start_worker(t, MAIN_REDIS, tmp_path / f"{t}-{i}.log", delay=0.05)
               for t in tier_names for i in range(2)]
    try:
        jobs = []
        for k in range(2):
            spec = make_spec(tmp_path, 80, tier_names, answers=str(store))
            spec.output = str(tmp_path / "jobs" / f"job{k}")
            jobs.append(submit(spec, broker=MAIN_REDIS, dispatch=celery_dispatcher(MAIN_REDIS)))
        for j in jobs:
            wait_done(j.dir)
            check_results(j.dir, 80)
    finally:
        for w in workers:
            stop(w)
    segments = sorted(store.rglob("*.arrow"))
    assert len(segments) >= 8                                   # units of both jobs wrote
    for f in segments:
        assert pa.ipc.open_file(pa.memory_map(str(f))).read_all().num_rows > 0
    first = pl.read_parquet(f"{jobs[0].dir}/results/*.parquet").sort("id")
    calls = []
    spec = make_spec(tmp_path, 80, tier_names, answers=str(store))
    spec.output = str(tmp_path / "jobs" / "again")
    again = pl.read_parquet(f"{run_embedded(spec, engine_factory=scripted_factory(calls)).dir}/results/*.parquet").sort("id")
    assert calls == []
    assert again["response"].to_list() == first["response"].to_list()
    assert again["final_tier"].to_list() == first["final_tier"].to_list()
    runs = again.select(pl.col("tiers").explode()).unnest("tiers")
    assert runs["reused"].all()
    answers._INDEXES.clear()
    out = answers.compact(str(store))
    assert out["answers_after"] == len(runs)                    # one per (row, tier) run
    assert out["answers_before"] >= out["answers_after"]
