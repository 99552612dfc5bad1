"""Integration: real Redis, real Celery worker processes (one per tier, solo pool), the job
system end to end through the broker. Engines are the scripted test double (tests/doubles.py),
loaded into the workers with CASCADE_PLUGINS; the real models are covered by test_e2e_models.

Fault tests start their own redis-server on other ports, kill it or the workers, and check that
`resume` rebuilds the queues from the on-disk manifest with no row lost or duplicated."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import redis

import tests.doubles  # noqa: F401  (registers the scripted engine for spec validation)
from jobs import core
from jobs.spec import parse_spec
from workers.celery_app import celery_dispatcher

pytestmark = pytest.mark.redis
ROOT = Path(__file__).resolve().parent.parent
MAIN_REDIS = "redis://127.0.0.1:6379/15"


def redis_up(url: str) -> bool:
    try:
        return redis.Redis.from_url(url, socket_timeout=1).ping()
    except redis.exceptions.ConnectionError:
        return False


def start_worker(tier: str, broker: str, log: Path, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "CASCADE_PLUGINS": "tests.doubles", "CASCADE_SCRIPTED_DELAY": str(delay),
           "CASCADE_VISIBILITY_TIMEOUT": "3600", "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.cli", "worker", "--tier", tier, "--broker", broker,
         "--loglevel", "WARNING", "--hostname", f"{tier}@{uuid.uuid4().hex[:6]}"],
        cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def wait_done(job_dir: str, timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = core.status(job_dir)
        if st["state"] == "done":
            return st
        time.sleep(0.2)
    raise AssertionError(f"job not done in {timeout}s: {st}")


def make_spec(tmp_path, n_rows: int, tiers: list[str]):
    pd.DataFrame({"prompt": [f"item {i} w{i}" for i in range(n_rows)],
                  "reference": [f"x{i}" for i in range(n_rows)]}).to_parquet(tmp_path / "in.parquet")
    return parse_spec({
        "name": "celery", "input": str(tmp_path / "in.parquet"), "output": str(tmp_path / "job"),
        "shard_rows": 10, "batch_rows": 12,
        "tiers": [{"name": t, "model": "scripted", "engine": "scripted", "cost": {"per_token": 1 + i}}
                  for i, t in enumerate(tiers)],
        "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}})


def check_results(job_dir: str, n_rows: int) -> pd.DataFrame:
    out = pd.read_parquet(f"{job_dir}/results")
    assert len(out) == n_rows and out.id.is_unique
    assert (out.status == "ok").all()
    for ts in out.tiers:           # the decision rule holds on every row's lineage
        assert all(t["first_logprob"] < -0.5 for t in ts[:-1])
        assert ts[-1]["first_logprob"] >= -0.5 or ts[-1]["tier"] == len(ts) - 1
    return out


@pytest.fixture
def tier_names():
    tag = uuid.uuid4().hex[:6]
    return [f"a{tag}", f"b{tag}"]


@pytest.mark.skipif(not redis_up(MAIN_REDIS), reason="no Redis at 127.0.0.1:6379")
def test_job_through_redis_and_celery_workers(tmp_path, tier_names):
    workers = [start_worker(t, MAIN_REDIS, tmp_path / f"{t}.log") for t in tier_names]
    try:
        spec = make_spec(tmp_path, 60, tier_names)
        job = core.submit(spec, broker=MAIN_REDIS, dispatch=celery_dispatcher(MAIN_REDIS))
        st = wait_done(job.dir)
        out = check_results(job.dir, 60)
        units = core.Job(job.dir).manifest()["units"]
        workers_seen = {u["worker"].split("@")[0] for u in units.values()}
        assert workers_seen == set(tier_names)          # each tier ran on its own worker
        assert st["tiers"][1]["rows_done"] == (out.tiers_run.map(len) == 2).sum() > 0
    finally:
        for w in workers:
            stop(w)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def own_redis(tmp_path):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server not installed")
    port = free_port()
    procs = []

    def start():
        p = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, start_new_session=True)
        procs.append(p)
        for _ in range(100):
            if redis_up(f"redis://127.0.0.1:{port}/0"):
                return p
            time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    start()
    yield f"redis://127.0.0.1:{port}/0", start, procs
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_redis_restart_loses_queues_and_resume_rebuilds_them(tmp_path, tier_names, own_redis):
    url, start, procs = own_redis
    spec = make_spec(tmp_path, 40, tier_names)
    job = core.submit(spec, broker=url, dispatch=celery_dispatcher(url))   # no workers yet
    procs[-1].kill()                 # Redis dies with every queued message (it keeps nothing)
    procs[-1].wait()
    start()
    assert redis.Redis.from_url(url).llen(f"cascade.{tier_names[0]}") == 0
    workers = [start_worker(t, url, tmp_path / f"{t}.log") for t in tier_names]
    try:
        time.sleep(1.0)
        assert core.status(job.dir)["tiers"][0]["rows_done"] == 0      # nothing to do: queues lost
        core.resume(job.dir, celery_dispatcher(url))
        wait_done(job.dir)
        check_results(job.dir, 40)
    finally:
        for w in workers:
            stop(w)


def test_worker_killed_mid_unit_then_resume(tmp_path, tier_names, own_redis):
    url, _, _ = own_redis
    spec = make_spec(tmp_path, 40, tier_names)
    slow = start_worker(tier_names[0], url, tmp_path / "slow.log", delay=1.0)
    job = core.submit(spec, broker=url, dispatch=celery_dispatcher(url))
    deadline = time.time() + 30
    while time.time() < deadline:      # wait until the first unit is running, then kill -9
        if "running" in core.status(job.dir)["tiers"][0]["states"]:
            break
        time.sleep(0.05)
    stop(slow)
    st = core.status(job.dir)
    assert "running" in st["tiers"][0]["states"] and st["state"] == "running"
    workers = [start_worker(t, url, tmp_path / f"{t}.log") for t in tier_names]
    try:
        core.resume(job.dir, celery_dispatcher(url))   # re-enqueues the orphaned unit
        wait_done(job.dir)
        out = check_results(job.dir, 40)
        assert len(out) == 40
    finally:
        for w in workers:
            stop(w)


@pytest.mark.skipif(not redis_up(MAIN_REDIS), reason="no Redis at 127.0.0.1:6379")
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
        assert res.exit_code == 0 and "re-enqueued 3 units" in res.output
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
