"""The Celery app: one queue per tier (`cascade.<tier name>`), JSON only, late acks, prefetch 1.

A tier worker is `cascade worker --tier NAME` (solo pool, one task at a time, and a reconciler
thread: workers/reconciler.py), or equivalently
`celery -A workers.celery_app worker -Q cascade.NAME --pool solo --prefetch-multiplier 1`
(without the reconciler: run at least one `cascade worker`).
The broker URL comes from CASCADE_BROKER (default redis://127.0.0.1:6379/0); put the Redis
password in it (redis://:PASSWORD@HOST:6379/0).

Workers run units only of job directories under CASCADE_JOBS_ROOT when it is set; a message for
any other path is refused and logged.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys

from celery import Celery
from celery.schedules import crontab

from jobs import broker as brokers
from jobs.job import Job, open_job
from jobs.recovery import SEEN, ensure_state, known_jobs
from jobs.roots import jobs_root, refusal, register
from jobs.spec import load_spec
from jobs.state import Registry, connect
from jobs.submit import submit
from jobs.units import run_unit
from workers.reconciler import Reconciler

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
log = logging.getLogger(__name__)


def broker_url() -> str:
    return os.environ.get("CASCADE_BROKER", DEFAULT_BROKER)


def make_app(broker: str | None = None) -> Celery:
    app = Celery("cascade", broker=broker or broker_url())
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_ignore_result=True,
        task_acks_late=True,                  # a unit is acked after its result is committed
        task_reject_on_worker_lost=True,      # a killed worker's unit is redelivered
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,   # ride out a Redis restart, however long
        broker_transport_options={"visibility_timeout": int(os.environ.get(
            "CASCADE_VISIBILITY_TIMEOUT", 6 * 3600))},
        task_default_queue="cascade.default",
        worker_hijack_root_logger=False,
    )
    return app


app = make_app()


def queue_name(tier_name: str) -> str:
    return f"cascade.{tier_name}"


@app.task(name="cascade.run_unit", bind=True)
def run_unit_task(self, job_dir: str, unit_id: str, job_id: str | None = None):
    refused = refusal(job_dir)
    if refused:
        log.error("refused unit %s: %s", unit_id, refused)
        return "refused"

    def dispatch(jd, units):
        send_units(jd, units, client=self.app, job_id=job_id)

    if job_dir not in SEEN:
        SEEN.add(job_dir)
        try:                    # a job submitted without the root in its environment
            register(open_job(job_dir, job_id))
        except Exception as exc:
            log.warning("could not record job %s in the jobs root's index: %s", job_dir, exc)
    # A job whose state Redis lost is rebuilt here at once (one worker, under a lock) rather
    # than on the reconciler's next pass.
    return run_unit(job_dir, unit_id, dispatch=dispatch, worker=self.request.hostname, job_id=job_id,
                    rebuild=ensure_state)


# Nightly runs (Celery beat): CASCADE_NIGHTLY_SPECS names job specs (comma-separated), submitted
# every day at CASCADE_NIGHTLY_AT (HH:MM, UTC; default 02:00) with that day's --date, by the
# compose `scheduler` service: `celery -A workers.celery_app worker --beat -Q cascade.schedule`.
SCHEDULE_QUEUE = "cascade.schedule"


def nightly_schedule(env=os.environ) -> dict:
    """The beat schedule: one entry per spec in CASCADE_NIGHTLY_SPECS."""
    specs = [s.strip() for s in env.get("CASCADE_NIGHTLY_SPECS", "").split(",") if s.strip()]
    at = env.get("CASCADE_NIGHTLY_AT", "02:00")
    try:
        hour, minute = (int(x) for x in at.split(":"))
    except ValueError:
        raise ValueError(f"CASCADE_NIGHTLY_AT must be HH:MM, got {at!r}") from None
    return {f"nightly {spec}": {"task": "cascade.submit_nightly", "args": [spec],
                                "schedule": crontab(hour=hour, minute=minute),
                                "options": {"queue": SCHEDULE_QUEUE}} for spec in specs}


app.conf.beat_schedule = nightly_schedule()
app.conf.timezone = "UTC"


@app.task(name="cascade.submit_nightly")
def submit_nightly(spec_path: str, date: str | None = None) -> str:
    """Submit a spec for a night (default: today, UTC) on this app's broker; returns its job
    directory. A night already submitted (its output exists) is not submitted again."""
    day = date or datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    spec = load_spec(spec_path, date=day)
    broker = app.conf.broker_url
    try:
        job = submit(spec, broker=broker, dispatch=celery_dispatcher(broker))
    except FileExistsError as exc:
        log.warning("nightly %s for %s: %s", spec_path, day, exc)
        return spec.output
    log.info("nightly %s for %s: submitted %s", spec_path, day, job.dir)
    return job.dir


def send_units(job_dir: str, units: list[dict], client: Celery | None = None,
               job_id: str | None = None):
    client = client or app
    job = open_job(job_dir, job_id)
    with client.producer_or_acquire() as producer:
        for u in units:
            client.send_task("cascade.run_unit", args=[job_dir, u["id"]], kwargs={"job_id": job.id},
                             queue=queue_name(job.spec.tiers[u["tier"]].name), producer=producer)


def celery_dispatcher(broker: str):
    client = make_app(broker)

    def dispatch(job_dir, units):
        send_units(job_dir, units, client=client)

    return dispatch


def warn_if_no_job_has(tier: str, client):
    """Say at start when no running job has a tier of this name (a typo would otherwise wait in
    silence); the worker serves anyway, for jobs submitted later."""
    names = set()
    for d in known_jobs(Registry(client)):
        try:
            names |= {t.name for t in Job(d).spec.tiers}
        except Exception as exc:            # a job directory gone or unreadable: not this one
            log.debug("tier check: %s: %s", d, exc)
    if tier not in names:
        log.warning("no running job has a tier named %r (running jobs' tiers: %s); serving queue "
                    "%s for jobs submitted later", tier, ", ".join(sorted(names)) or "none",
                    queue_name(tier))


def start_worker(tier: str, broker: str | None = None, loglevel: str = "INFO", hostname=None):
    if not jobs_root():
        sys.exit("cascade worker: CASCADE_JOBS_ROOT is not set. Set it to the directory, shared by "
                 "every worker, under which job directories live (any depth): after Redis loses its "
                 "state, the workers find every unfinished job there again and finish it; without "
                 "it a job can be left running with nobody working on it")
    broker = broker or broker_url()
    try:       # a broker that is down is waited for (CASCADE_BROKER_WAIT s); a wrong one is not
        brokers.check(broker, wait=brokers.worker_wait(), who="cascade worker")
    except brokers.BrokerError as exc:
        sys.exit(str(exc))
    app.conf.broker_url = broker
    client = make_app(broker)
    hostname = hostname or f"{tier}@%h"            # %h: Celery's own expansion, done here too
    warn_if_no_job_has(tier, connect(broker))
    Reconciler(broker, lambda jd, units: send_units(jd, units, client=client),
               lambda name: Registry(connect(broker)).queue_length(queue_name(name)), tier=tier,
               name=hostname.replace("%h", socket.gethostname())).start()
    argv = ["worker", "-Q", queue_name(tier), "--pool", "solo", "--concurrency", "1",
            "--prefetch-multiplier", "1", "--loglevel", loglevel, "-n", hostname,
            "--without-gossip", "--without-mingle"]
    app.worker_main(argv)
