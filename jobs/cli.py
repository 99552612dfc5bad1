"""The `cascade` command (the console script points here): the one root group, with every
command registered explicitly at the end of this module: the policy commands (calibrate,
replay, eval; cascade/commands.py) and the job commands (run, submit, worker, status, resume,
cancel, report, logs, export) defined here. Each command imports what it runs, so that
`cascade --help` loads no engine, Celery, DuckDB or torch."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import click

from cascade.commands import calibrate, evaluate_cmd, fail, replay, rollback
from cascade.errors import CascadeError
from jobs.export import FORMATS

USER_ERRORS = (CascadeError, FileNotFoundError, FileExistsError, KeyError, ValueError)


@click.group()
def main():
    """Batch LLM cascades: run jobs over Parquet on a ladder of models, report on them, and
    calibrate, replay and evaluate the stopping policy that decides who answers each row."""


def render_status(st: dict) -> str:
    """The status as plain text: what `cascade status` prints where there is no terminal (CI,
    pipes, log files), and its JSON-free summary."""
    lines = [f"job {st['job_id']}  state {st['state']}  rows {st['rows']}  dir {st['dir']}"]
    for t in st["tiers"]:
        states = ", ".join(f"{k} {v['units']} units/{v['rows']} rows" for k, v in sorted(t["states"].items()))
        lines.append(f"  tier {t['tier']} {t['name']:<14} {_detail(t, states)}")
    lines += _alerts(st)
    return "\n".join(lines)


def _detail(t: dict, states: str | None = None) -> str:
    if states is None:
        states = ", ".join(f"{k} {v['units']}u/{v['rows']}r" for k, v in sorted(t["states"].items()))
    return (f"{states or 'no units'}; waiting to coalesce {t['waiting_rows']} rows; "
            f"escalated {t['escalated']}")


def _alerts(st: dict) -> list[str]:
    out = [f"  RETRYING {f['unit']} (attempt {f['attempts']} failed): {f['error']}" for f in st["failed"]]
    if st.get("finalize_error"):
        out.append(f"  FINALIZE FAILED: {st['finalize_error']}")
    for line in st.get("waiting_for", []):
        out.append(f"  WAITING: {line}")
    for t in st["tiers"]:
        if t.get("lease_expired_units"):
            out.append(f"  tier {t['tier']}: {t['lease_expired_units']} running unit(s) past their lease "
                       f"(worker presumed dead; the reconciler sends them again)")
    if st.get("reconciler_errors"):
        e = st["reconciler_errors"]
        out.append(f"  RECONCILER FAILED {e['count']} time(s) on this job, last: {e['last']}")
    return out


class StatusView:
    """A job's status as it changes. On a terminal: one rich progress bar per tier (rows done of
    the rows that reached the tier), redrawn in place. Elsewhere (CI, pipes, log files): a
    plain-text block per refresh, at most every `every` seconds and always at the end."""

    def __init__(self, stderr: bool = False, every: float = 5.0):
        from rich.console import Console

        self.console = Console(stderr=stderr, highlight=False)
        self.tty = self.console.is_terminal
        self.every, self.last = every, -float("inf")
        self.progress, self.tasks, self.shown = None, {}, set()

    def update(self, st: dict):
        if not self.tty:
            now = time.monotonic()
            if st["state"] == "running" and now - self.last < self.every:
                return
            self.last = now
            self.console.out(render_status(st), highlight=False)
            return
        if self.progress is None:
            self.console.print(f"job {st['job_id']}  rows {st['rows']}  dir {st['dir']}")
            self.progress = status_bars(self.console)
            self.progress.start()
        for t in st["tiers"]:
            total = sum(v["rows"] for v in t["states"].values()) + t["waiting_rows"]
            if t["tier"] not in self.tasks:
                self.tasks[t["tier"]] = self.progress.add_task(t["name"], total=0, tier=t["tier"], detail="")
            self.progress.update(self.tasks[t["tier"]], total=total, completed=t["rows_done"],
                                 detail=_detail(t))
        for line in _alerts(st):
            if line not in self.shown:
                self.shown.add(line)
                self.progress.console.print(line)
        if st["state"] != "running":
            self.close(f"state {st['state']}")

    def close(self, last: str | None = None):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            if last:
                self.console.print(last)


def status_bars(console):
    """One line per tier: name, a bar of fixed width and the row counts keep their room on a
    narrow terminal; the unit detail takes what is left and is cut with an ellipsis."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    from rich.table import Column

    return Progress(
        TextColumn("tier {task.fields[tier]} {task.description:<14}", table_column=Column(min_width=21, no_wrap=True)),
        BarColumn(bar_width=20, table_column=Column(min_width=20, no_wrap=True)),
        MofNCompleteColumn(table_column=Column(min_width=11, no_wrap=True)),
        TextColumn("{task.fields[detail]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)),
        console=console, expand=True)


def _load(spec_path, output=None, engine=None, date=None):
    from jobs.spec import load_spec

    overrides = {k: v for k, v in (("output", output), ("engine", engine)) if v}
    return load_spec(spec_path, overrides=overrides or None, date=date and date.date())


ENGINE_OPTION = click.option("--engine", default=None,
                             help="Run every tier on this engine (e.g. vllm), whatever the spec says.")
DATE_OPTION = click.option("--date", type=click.DateTime(formats=["%Y-%m-%d"]), default=None,
                           help="The run's date, YYYY-MM-DD (default: today): fills {date} in the "
                                "spec's input and output, and orders `report --history`.")


@click.command()
@click.argument("spec_path", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@click.option("--output", default=None, help="Override the spec's output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing job in the output directory.")
@click.option("--quiet", is_flag=True)
@ENGINE_OPTION
@DATE_OPTION
def run(spec_path, output, overwrite, quiet, engine, date):
    """Run a job on this machine, no server needed (embedded executor), then print its report.

    Example: cascade run examples/demo/job.yaml
    """
    from jobs import report
    from jobs.embedded import run_embedded

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    view = None if quiet else StatusView(stderr=True)
    try:
        spec = _load(spec_path, output, engine, date)
        job = run_embedded(spec, progress=view and view.update, overwrite=overwrite)
    except USER_ERRORS as exc:
        if view:
            view.close()
        fail(exc)
    if view:
        view.close()
    click.echo(f"job {job.id} done in {time.perf_counter() - t0:.1f}s; results in {job.dir}/results/")
    if not quiet:
        click.echo(report.text_report(job.dir))


@click.command()
@click.argument("spec_path", metavar="JOB.yaml", type=click.Path(dir_okay=False))
@click.option("--broker", envvar="CASCADE_BROKER", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--output", default=None, help="Override the spec's output directory.")
@click.option("--overwrite", is_flag=True)
@ENGINE_OPTION
@DATE_OPTION
def submit(spec_path, broker, output, overwrite, engine, date):
    """Validate and shard a job, and enqueue its first units on the tier queues of a broker.

    Example: cascade submit job.yaml --broker redis://redis:6379/0
    """
    from jobs import broker as brokers
    from jobs.submit import submit as submit_job
    from workers.celery_app import celery_dispatcher

    try:
        spec = _load(spec_path, output, engine, date)
        brokers.check(broker, who="cascade submit")       # before anything is written
        job = submit_job(spec, broker=broker, dispatch=celery_dispatcher(broker), overwrite=overwrite)
    except USER_ERRORS as exc:
        fail(exc)
    click.echo(job.dir)


@click.command()
@click.option("--tier", required=True, help="Tier name: the worker consumes queue cascade.<tier>.")
@click.option("--broker", envvar="CASCADE_BROKER", default="redis://127.0.0.1:6379/0", show_default=True)
@click.option("--loglevel", default="INFO", show_default=True)
@click.option("--hostname", default=None, help="Celery node name (default <tier>@<host>).")
def worker(tier, broker, loglevel, hostname):
    """Serve one tier: solo pool, one unit at a time, prefetch 1, late acks.

    Example: CUDA_VISIBLE_DEVICES=0 cascade worker --tier qwen7b
    """
    from workers.celery_app import start_worker

    start_worker(tier, broker, loglevel, hostname)


BROKER_CREDENTIALS = click.option(
    "--broker", envvar="CASCADE_BROKER", default=None,
    help="The job's broker with its credentials (job directories record it without them).")


@click.command()
@click.argument("job_dir", metavar="JOB")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--watch", type=float, default=0, help="Refresh every N seconds until the job ends.")
@BROKER_CREDENTIALS
def status(job_dir, as_json, watch, broker):
    """Rows and units per tier and state.

    Example: cascade status runs/demo --watch 2
    """
    from jobs import broker as brokers
    from jobs import control

    brokers.remember(broker)
    view = None if as_json else StatusView(every=0)
    while True:
        try:
            st = control.status(job_dir)
        except USER_ERRORS as exc:
            if view:
                view.close()
            fail(exc)
        if view:
            view.update(st)
        else:
            click.echo(json.dumps(st, indent=1))
        if not watch or st["state"] != "running":
            if view:
                view.close()
            return
        time.sleep(watch)


@click.command()
@click.argument("job_dir", metavar="JOB")
@click.option("--broker", envvar="CASCADE_BROKER", default=None,
              help="Re-enqueue on this broker, with its credentials (default: the job's own; "
                   "embedded jobs run here).")
def resume(job_dir, broker):
    """Rebuild the job's state from its directory and send every unfinished unit: after a
    cancel, or to finish an embedded run that was killed. Worker and Redis crashes heal by
    themselves (leases and the reconciler); they do not need this.

    Example: cascade resume runs/demo
    """
    from jobs import broker as brokers
    from jobs import control
    from jobs.embedded import resume_embedded
    from jobs.job import Job

    try:
        job = Job(job_dir)
        brokers.remember(broker)
        broker = broker or brokers.credentials_for(job.broker)
        if broker:
            from workers.celery_app import celery_dispatcher

            brokers.check(broker, who="cascade resume")
            units = control.resume(job_dir, celery_dispatcher(broker))
            click.echo(f"re-enqueued {len(units)} units on {brokers.redact(broker)}")
        else:
            view = StatusView(stderr=True)
            try:
                resume_embedded(job_dir, progress=view.update)
            finally:
                view.close()
            click.echo(f"job {job.id}: {control.status(job_dir)['state']}")
    except USER_ERRORS as exc:
        fail(exc)


@click.command()
@click.argument("job_dir", metavar="JOB")
@BROKER_CREDENTIALS
def cancel(job_dir, broker):
    """Stop a job: queued units are skipped by the workers; `resume` starts it again.

    Example: cascade cancel runs/nightly-2026-11-28
    """
    from jobs import broker as brokers
    from jobs import control

    brokers.remember(broker)
    try:
        st = control.cancel(job_dir)
    except USER_ERRORS as exc:
        fail(exc)
    click.echo(render_status(st))


@click.command()
@click.argument("job_dir", metavar="JOB")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Write report.md, report.html, PNG plots and summary.json here.")
@click.option("--history", is_flag=True,
              help="JOB is a directory with job directories below it, at any depth: trends across "
                   "runs by date, policy versions, and drift tests.")
@click.option("--fail-on-drift", is_flag=True,
              help="With --history: exit with status 1 when a drift test is flagged (after "
                   "printing a short summary; with --out also written to drift.txt).")
def report(job_dir, out_dir, history, fail_on_drift):
    """Report on a job (the DuckDB queries in sql/), or on a history of nightly jobs.

    \b
    Examples:
      cascade report runs/demo --out runs/demo/report
      cascade report --history runs/nightly --out runs/nightly/trends --fail-on-drift
    """
    from jobs import report as rep

    try:
        if history:                       # each report is built once, then printed and saved
            doc, summary = rep.history(job_dir)
            said = rep.drift_summary(summary)
            if out_dir:
                rep.save(doc, summary, out_dir, stem="history")
                Path(out_dir, "drift.txt").write_text(said + "\n")
            click.echo(doc.markdown())
            click.echo(said, err=bool(summary["drift"]))
            if summary["drift"] and fail_on_drift:
                sys.exit(1)
            return
        doc, summary = rep.build(job_dir)
        if out_dir:
            rep.save(doc, summary, out_dir)
        click.echo(doc.markdown())
        if out_dir:
            click.echo(f"wrote {out_dir}/report.md, report.html, *.png, summary.json")
    except Exception as exc:      # a missing or unfinished job, unreadable Parquet
        fail(exc)


@click.command()
@click.argument("job_dir", metavar="JOB")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False),
              help="LOGS.parquet in the replay format (for cascade calibrate).")
def logs(job_dir, out_path):
    """Export the job's rows on which every tier ran as replay-format logs, with quality from
    the references: run a calibration job (rule threshold 0) on labelled rows, then calibrate.

    Example: cascade logs runs/demo-calibration --out logs.parquet && cascade calibrate logs.parquet --out policy/
    """
    from jobs import report as rep

    try:
        info = rep.export_logs(job_dir, out_path)
    except Exception as exc:
        fail(exc)
    click.echo(f"wrote {info['rows']} rows x {info['tiers']} tiers to {out_path}"
               + ("" if info["quality"] else " (no references: no quality column)"))


@click.command()
@click.argument("job_dir", metavar="JOB")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="openai",
              show_default=True, help="openai: OpenAI Batch API output lines; the others: the result table.")
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="The file to write.")
def export(job_dir, fmt, out_path):
    """Write a finished job's results to one file: OpenAI Batch output JSONL (one line per input
    row, custom_id = the row's id), or the result table as Parquet, CSV or JSON lines.

    Example: cascade export runs/demo --format openai --out answers.jsonl
    """
    from jobs.export import export as write

    try:
        rows = write(job_dir, out_path, fmt)
    except Exception as exc:      # an unfinished or missing job, an unwritable path
        fail(exc)
    click.echo(f"wrote {rows} rows ({fmt}) to {out_path}")


@click.command()
@click.argument("root", metavar="ROOT", type=click.Path(file_okay=False, exists=True))
@click.option("--keep-days", type=click.FloatRange(min=0), required=True,
              help="Remove job directories that finished more than this many days ago.")
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
def gc(root, keep_days, dry_run):
    """Retention for a root of job directories: remove finished jobs' unit files (routed/,
    work/, tiers/; results/, job.json and finished.json stay), and whole job directories that
    finished more than --keep-days ago. Unfinished jobs are never touched.

    Example: cascade gc /jobs/runs --keep-days 30 --dry-run
    """
    from jobs.retention import gc as collect

    out = collect(root, keep_days, dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for d in out["jobs_removed"]:
        click.echo(f"{verb} job {d}")
    for d in out["unit_files_removed"]:
        click.echo(f"{verb} unit files {d}")
    click.echo(f"{verb} {len(out['jobs_removed'])} job(s) and the unit files of "
               f"{len(out['unit_files_removed'])} director(ies): {out['bytes'] / 2**20:.1f} MiB")


@click.command()
@click.argument("path", metavar="ANSWERS")
@click.option("--keep-days", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Also drop answers older than this many days.")
@click.option("--dry-run", is_flag=True, help="Count what compaction would keep; change nothing.")
def compact(path, keep_days, dry_run):
    """Compact an answer store (a spec's `answers:`): one segment per tier, no duplicate
    answers, none older than --keep-days. Safe while jobs read and add to it.

    Example: cascade compact /jobs/answers --keep-days 90
    """
    from jobs.answers import compact as merge

    try:
        out = merge(path, keep_days, dry_run=dry_run)
    except (OSError, ValueError) as exc:
        fail(exc)
    click.echo(f"{'would keep' if dry_run else 'kept'} {out['answers_after']} of "
               f"{out['answers_before']} answers of {out['tiers']} tier(s) "
               f"({out['segments_before']} segments before)")


@click.command()
@click.argument("job_dir", metavar="JOB")
@click.option("--registry", required=True, type=click.Path(file_okay=False),
              help="The policy registry (created on first use) the job's policy comes from.")
@click.option("--lam", type=float, default=0.1, show_default=True,
              help="For a new registry: quality per unit of cost (the best tier's mean cost = 1) "
                   "that versions are judged by.")
def learn(job_dir, registry, lam):
    """After a night: add its fully-run rows (audits) to the registry's calibration pool, fit a
    challenger, and promote it only if it beats the champion on held-out pool rows.

    Example: cascade learn /jobs/runs/nightly/2026-12-01 --registry /jobs/policies/nightly
    """
    from cascade.registry import Objective, Registry
    from jobs import report as rep

    try:
        rep.require_finished(job_dir)
        meta = json.loads(Path(job_dir, "job.json").read_text())
        night = (meta.get("spec") or {}).get("date") or meta["job_id"]
        try:
            frame = rep.replay_logs(job_dir)
        except ValueError as exc:            # no row ran every tier: the pool gets nothing
            click.echo(f"no pool rows from {job_dir}: {exc}", err=True)
            frame = None
        if frame is not None and "quality" not in frame.columns:
            fail(ValueError(f"{job_dir}: no `reference` column, so its rows' quality is unknown "
                            f"and they cannot join the calibration pool"))
        entry = Registry(registry, Objective(lam=lam)).learn(f"{night}-{meta['job_id']}", frame,
                                                             log=lambda m: click.echo(m, err=True))
    except USER_ERRORS as exc:
        fail(exc)
    verdict = (f"promoted {entry['version']}" if entry.get("promote") else
               f"kept {entry.get('champion_after') or 'the safe default'}")
    click.echo(f"{night}: {verdict}: {entry.get('reason')}")


for command in (run, submit, worker, status, resume, cancel, report, logs, export, gc, compact,
                learn, calibrate, replay, evaluate_cmd, rollback):
    main.add_command(command)


def entry():
    """The `cascade` console script: the CLI, then a hard exit with its status once everything
    is flushed. Native thread pools (Arrow's, DuckDB's) could abort the process at interpreter
    teardown, after the command had finished and printed its result ("terminate called without
    an active exception", SIGABRT, exit -6 where a script expects 2); the command's work is
    complete by then, so the process skips that teardown, after closing its engines."""
    try:
        main(standalone_mode=True)
        code = 0
    except SystemExit as exc:
        if isinstance(exc.code, str):
            click.echo(exc.code, err=True)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    from workers.engines.base import close_engines

    close_engines()          # os._exit runs no atexit handler: stop engine processes (vLLM) now
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
