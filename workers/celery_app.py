"""The Celery app: one queue per tier (`cascade.<tier name>`), JSON only, late acks, prefetch 1.

A tier worker is `cascade worker --tier NAME` (solo pool, one task at a time), or equivalently
`celery -A workers.celery_app worker -Q cascade.NAME --pool solo --prefetch-multiplier 1`.
The broker URL comes from CASCADE_BROKER (default redis://127.0.0.1:6379/0).
"""

from __future__ import annotations

import os

from celery import Celery

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"


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
def run_unit_task(self, job_dir: str, unit_id: str):
    from jobs import core

    def dispatch(jd, units):
        send_units(jd, units, client=self.app)

    return core.run_unit(job_dir, unit_id, dispatch=dispatch, worker=self.request.hostname)


def send_units(job_dir: str, units: list[dict], client: Celery | None = None):
    from jobs.core import Job

    client = client or app
    spec = Job(job_dir).spec
    for u in units:
        client.send_task("cascade.run_unit", args=[job_dir, u["id"]],
                      queue=queue_name(spec.tiers[u["tier"]].name))


def celery_dispatcher(broker: str):
    client = make_app(broker)

    def dispatch(job_dir, units):
        send_units(job_dir, units, client=client)

    return dispatch


def start_worker(tier: str, broker: str | None = None, loglevel: str = "INFO", hostname=None):
    if broker:
        app.conf.broker_url = broker
    argv = ["worker", "-Q", queue_name(tier), "--pool", "solo", "--concurrency", "1",
            "--prefetch-multiplier", "1", "--loglevel", loglevel, "-n", hostname or f"{tier}@%h",
            "--without-gossip", "--without-mingle"]
    app.worker_main(argv)
