"""Job system on the embedded executor with a scripted engine (a test double): spec and input
validation, sharding, coalescing, per-row errors, idempotent units, resume, cancel, reports."""

from __future__ import annotations

import heapq
import json
import random
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.doubles import scripted_factory
from jobs import control, report
from jobs.embedded import LocalExecutor, resume_embedded, run_embedded
from jobs.layout import result_file
from jobs.submit import submit
from jobs.units import execute, run_unit, write_result
from jobs.inputs import InputError
from jobs.spec import SpecError, load_spec, parse_spec

TIERS = [{"name": "small", "model": "m0", "cost": {"per_token": 1}},
         {"name": "mid", "model": "m1", "cost": {"per_token": 3}},
         {"name": "big", "model": "m2", "cost": {"per_token": 10}}]


def make_spec(tmp_path, inp, **kw):
    raw = {"name": "t", "input": str(inp), "output": str(tmp_path / "job"), "shard_rows": 8,
           "batch_rows": 10, "tiers": TIERS,
           "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}, **kw}
    return parse_spec(raw)


def write_input(path, n=50, **extra):
    df = pl.DataFrame({"prompt": [f"question {i} w{i}" for i in range(n)],
                       "reference": [f"big:w{i}" for i in range(n)], "extra": range(n), **extra})
    df.write_parquet(path)
    return path


def results(job_dir) -> pl.DataFrame:
    return pl.read_parquet(f"{job_dir}/results/*.parquet")


def by_id(out: pl.DataFrame) -> dict[str, dict]:
    return {r["id"]: r for r in out.iter_rows(named=True)}


def test_every_row_once_with_lineage_and_coalesced_batches(tmp_path):
    inp = write_input(tmp_path / "in.parquet")
    calls = []
    job = run_embedded(make_spec(tmp_path, inp), engine_factory=scripted_factory(calls))
    out = results(job.dir)
    assert sorted(out["id"]) == sorted(f"in:{i}" for i in range(50))
    assert out["extra"].to_list() == list(range(50))     # input order, pass-through kept
    # The rule, recomputed independently from the lineage: escalate while first_logprob < -0.5.
    for r in out.iter_rows(named=True):
        tiers = r["tiers"]
        for t in tiers[:-1]:
            assert t["first_logprob"] < -0.5 and t["decision"] == "escalate:%d" % (t["tier"] + 1)
        last = tiers[-1]
        assert last["decision"] == "stop" and (last["first_logprob"] >= -0.5 or last["tier"] == 2)
        assert r["final_tier"] == last["tier"] and r["response"] == last["response"]
        assert r["cost"] == pytest.approx(sum(t["cost"] for t in tiers))
    # Each tier's results hold that tier's runs only (a rule judges the current answer alone,
    # so rows go on without their earlier runs); finalize gathered the lineage above from all.
    for k in range(3):
        files = list((Path(job.dir) / "tiers" / str(k)).glob("*.arrow"))
        assert files and all([c for c in pa.ipc.open_file(f).schema.names if c.startswith("_t")] == [f"_t{k}"]
                             for f in files)
    # tier 0 runs shard by shard; later tiers get coalesced batches of >= batch_rows but the last
    by_tier = {}
    for name, n in calls:
        by_tier.setdefault(name, []).append(n)
    assert by_tier["small"] == [8] * 6 + [2]
    for name in ("mid", "big"):
        assert all(n >= 10 for n in by_tier[name][:-1])
        assert sum(by_tier[name]) == (out["tiers_run"].list.len() > ["mid", "big"].index(name) + 1).sum()


def test_per_row_errors_keep_the_other_rows(tmp_path):
    df = pl.DataFrame({"prompt": ["fine one", None, "", "   ", "word " * 70, "fine two"]})
    df.write_parquet(tmp_path / "in.parquet")
    job = run_embedded(make_spec(tmp_path, tmp_path / "in.parquet"), engine_factory=scripted_factory())
    out = results(job.dir)
    rows = by_id(out)
    assert len(out) == 6
    assert out["status"].to_list() == ["ok", "error", "error", "error", "error", "ok"]
    assert rows["in:1"]["error"] == "empty prompt"
    assert "exceeds tier small's context of 64" in rows["in:4"]["error"]
    assert rows["in:4"]["final_tier"] is None


def test_messages_rendered_with_the_tier_chat_template(tmp_path):
    msgs = [[{"role": "user", "content": "hello there"}], [{"role": "user", "content": "bye now"}]]
    pq.write_table(pa.table({"id": ["a", "b"], "messages": msgs}), tmp_path / "m.parquet")
    job = run_embedded(make_spec(tmp_path, tmp_path / "m.parquet"), engine_factory=scripted_factory())
    a = by_id(results(job.dir))["a"]
    assert a["response"].endswith(":there<assistant>")
    assert list(a["messages"][0].values()) == ["user", "hello there"]


@pytest.mark.parametrize("case,frame,needle", [
    ("no prompt column", pl.DataFrame({"text": ["a"]}), "needs a 'prompt' column"),
    ("prompt not text", pl.DataFrame({"prompt": [1, 2]}), "column 'prompt' must hold strings"),
    ("duplicate ids", pl.DataFrame({"id": ["x", "y", "x"], "prompt": ["a", "b", "c"]}), "duplicate id 'x'"),
    ("empty file", pl.DataFrame({"prompt": pl.Series([], dtype=pl.String)}), "has no rows"),
    ("reserved column", pl.DataFrame({"prompt": ["a"], "status": ["x"]}), "names the output uses"),
    ("lineage column name", pl.DataFrame({"prompt": ["a"], "_t1": ["x"]}), "_t1"),
])
def test_bad_input_is_rejected_at_submit_naming_the_file(tmp_path, case, frame, needle):
    path = tmp_path / "bad.parquet"
    frame.write_parquet(path)
    with pytest.raises(InputError, match=needle) as err:
        run_embedded(make_spec(tmp_path, path), engine_factory=scripted_factory())
    assert str(path) in str(err.value)
    assert not (tmp_path / "job" / "job.json").exists()


def test_bad_messages_type_and_unreadable_file(tmp_path):
    pq.write_table(pa.table({"messages": [["a", "b"]]}), tmp_path / "m.parquet")
    with pytest.raises(InputError, match="column 'messages' must be a list of"):
        run_embedded(make_spec(tmp_path, tmp_path / "m.parquet"), engine_factory=scripted_factory())
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match="junk.parquet: cannot be read as Parquet"):
        run_embedded(make_spec(tmp_path, tmp_path / "junk.parquet"), engine_factory=scripted_factory())
    with pytest.raises(InputError, match="no such file"):
        run_embedded(make_spec(tmp_path, tmp_path / "nope.parquet"), engine_factory=scripted_factory())


def test_directory_and_glob_inputs_get_stable_ids(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    write_input(d / "a.parquet", 5)
    write_input(d / "b.parquet", 4)
    for inp in (d, d / "*.parquet"):
        job = run_embedded(make_spec(tmp_path, inp), engine_factory=scripted_factory(), overwrite=True)
        out = results(job.dir)
        assert out["id"].to_list() == [f"a:{i}" for i in range(5)] + [f"b:{i}" for i in range(4)]
        # each row's file follows from its input position (job.json's "inputs")
        assert [Path(f).name for f in out["source_file"]] == ["a.parquet"] * 5 + ["b.parquet"] * 4


def test_a_job_directory_of_another_layout_is_refused_and_can_be_overwritten(tmp_path):
    """A job written by another version (its unit files laid out differently) is not misread:
    opening it names the layout and the way out; --overwrite starts it again."""
    from jobs.job import open_job

    spec = make_spec(tmp_path, write_input(tmp_path / "in.parquet", 10))
    job = run_embedded(spec, engine_factory=scripted_factory())
    meta = json.loads((Path(job.dir) / "job.json").read_text())
    del meta["layout"]                                       # as the versions before it wrote it
    (Path(job.dir) / "job.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="layout 1, written by another version.*--overwrite"):
        open_job(job.dir, meta["job_id"] + "-again")
    again = run_embedded(spec, engine_factory=scripted_factory(), overwrite=True)
    assert results(again.dir).height == 10


@pytest.mark.parametrize("patch,needle", [
    ({"tiers": []}, "tiers: must be a non-empty list"),
    ({"tiers": [{"name": "a"}]}, r"tiers\[0\].model: is required"),
    ({"tiers": [{"name": "a", "model": "m", "engine": "tgi"}]}, r"tiers\[0\].engine: must be one of"),
    ({"tiers": [{"name": "a", "model": "m", "sampling": {"max_tokens": 0}}]},
     r"tiers\[0\].sampling.max_tokens: must be >= 1"),
    ({"tiers": [{"name": "a", "model": "m", "cost": {"per_token": -1}}]}, r"tiers\[0\].cost.per_token"),
    ({"tiers": [{"name": "a", "model": "m"}, {"name": "b", "model": "n"}, {"name": "a", "model": "o"}]},
     r"^tiers\[2\]\.name: duplicate tier name 'a' \(tiers\[0\] has it too\)$"),
    ({"policy": {"rule": {"feature": "vibes", "threshold": 0}}}, "policy.rule.feature"),
    ({"policy": {"rule": {"thresholds": [0]}}}, "policy.rule.thresholds: must list one threshold"),
    ({"policy": {"artifact": "/nowhere"}}, "policy.artifact: no policy.json"),
    ({"shard_rows": "ten"}, "shard_rows: must be an integer"),
    ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
    ({"tiers": [{"name": "a", "model": "m", "sampling": {"topk": 3}}]},
     r"tiers\[0\].sampling: unknown field\(s\) \['topk'\]; allowed: \['max_tokens'"),
    ({"tiers": [{"name": "a", "model": "m", "cost": {"per_token": 1, "per_input_token": 2}}]},
     r"tiers\[0\].cost: give per_token, or per_input_token and per_output_token, not both"),
    ({"tiers": [{"name": "a", "model": "m", "device": "gpu"}]}, r"tiers\[0\].device: must be auto, cpu, cuda"),
    ({"tiers": [{"name": "a", "model": "m", "sampling": {"temperature": True}}]},
     r"tiers\[0\].sampling.temperature: must be a number, got True"),
    ({"policy": {"rule": {"threshold": 0}, "artifact": "p"}}, "policy: give exactly one of"),
    ({"audit_share": 2}, "audit_share: must be <= 1"),
    ({"choices": ["yes"]}, "choices: must list at least two different"),
])
def test_spec_errors_name_the_field(tmp_path, patch, needle):
    inp = write_input(tmp_path / "in.parquet", 3)
    with pytest.raises(SpecError, match=needle):
        make_spec(tmp_path, inp, **patch)


def test_yaml_spec_loads(tmp_path, monkeypatch):
    inp = write_input(tmp_path / "in.parquet", 3)
    (tmp_path / "job.yaml").write_text(
        f"input: {inp}\ntiers:\n  - {{name: a, model: m, sampling: {{max_tokens: 4, stop: \"\\n\"}}}}\n"
        "  - {name: b, model: n}\npolicy: {rule: {threshold: -1}}\n")
    monkeypatch.chdir(tmp_path)
    spec = load_spec(tmp_path / "job.yaml")
    assert spec.tiers[0].sampling.stop == ["\n"] and spec.output == str(tmp_path / "runs" / "in")
    (tmp_path / "bad.yaml").write_text("tiers: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_dated_runs_fill_date_and_run_placeholders(tmp_path):
    """{date} comes from --date (default today) and {run} is unique per run; an unknown
    placeholder or a malformed date names the field; the date is recorded for history."""
    import datetime

    inp = write_input(tmp_path / "in.parquet", 3)
    spec = make_spec(tmp_path, inp, output=str(tmp_path / "nightly" / "{date}"))
    assert spec.output == str(tmp_path / "nightly" / datetime.date.today().isoformat())
    raw = {"name": "t", "input": str(inp), "output": str(tmp_path / "n" / "{date}" / "{run}"),
           "tiers": TIERS, "policy": {"rule": {"threshold": -0.5}}}
    a, b = parse_spec(raw, date="2026-12-01"), parse_spec(raw, date="2026-12-01")
    assert a.date == "2026-12-01" and Path(a.output).parent == tmp_path / "n" / "2026-12-01"
    assert a.output != b.output                                   # {run}: one directory per run
    with pytest.raises(SpecError, match=r"^output: unknown placeholder \{night\}"):
        parse_spec({**raw, "output": "runs/{night}"})
    with pytest.raises(SpecError, match="^date: must be YYYY-MM-DD, got '12/01/2026'"):
        parse_spec(raw, date="12/01/2026")


def test_a_unit_run_twice_leaves_one_result_and_enqueues_once(tmp_path):
    import copy

    inp = write_input(tmp_path / "in.parquet", 20)
    ex = LocalExecutor(scripted_factory())
    job = submit(make_spec(tmp_path, inp), state=ex.state, dispatch=ex.dispatch)
    first = ex.heap[0][3]
    stale = copy.deepcopy(ex.state)            # the state as it was before the unit committed
    calls = []
    assert run_unit(job.dir, first, state=ex.state, engine_factory=scripted_factory(calls),
                    dispatch=ex.dispatch) == "done"
    queued = len(ex.heap)
    waiting = ex.state.status()["tiers"][1]["waiting_rows"]
    assert waiting > 0
    before = job.store.read_arrow(result_file(first, 0))
    # redelivery: the same unit again finds it done; nothing is run or enqueued twice
    assert run_unit(job.dir, first, state=ex.state, engine_factory=scripted_factory(calls),
                    dispatch=ex.dispatch) == "duplicate"
    assert len(ex.heap) == queued and ex.state.status()["tiers"][1]["waiting_rows"] == waiting
    # a re-run with its result committed but a stale state (the commit was never recorded):
    # the engine is not called again, the result is kept, its escalations are recorded once
    assert run_unit(job.dir, first, state=stale, engine_factory=scripted_factory(calls),
                    dispatch=None) == "done"
    assert len(calls) == 1
    assert stale.status()["tiers"][1]["waiting_rows"] == waiting
    assert job.store.read_arrow(result_file(first, 0)).equals(before)
    ex.drain()
    out = results(job.dir)
    assert len(out) == 20 and out["id"].is_unique().all()


def test_crash_after_commit_then_resume(tmp_path):
    """A run dies after writing a unit's result but before recording it: resume rebuilds the
    state from the job directory, records it, runs what is left, and the job completes with
    every row once (the committed unit is not run again)."""
    inp = write_input(tmp_path / "in.parquet", 30)
    ex = LocalExecutor(scripted_factory())
    job = submit(make_spec(tmp_path, inp), state=ex.state, dispatch=ex.dispatch)
    uid = ex.heap[0][3]
    unit = ex.state.units[uid]
    result = execute(job, unit, scripted_factory()(job.spec.tiers[0]))
    write_result(job, uid, 0, result)                  # committed, never recorded: "crash"
    assert control.status(job.dir)["tiers"][0]["rows_done"] == 8         # seen from the files
    calls = []
    resume_embedded(job.dir, engine_factory=scripted_factory(calls))
    out = results(job.dir)
    assert control.status(job.dir)["state"] == "done"
    assert len(out) == 30 and out["id"].is_unique().all()
    assert [n for name, n in calls if name == "small"] == [8, 8, 6]      # the committed 8 not rerun


def test_cancel_stops_and_resume_finishes(tmp_path):
    inp = write_input(tmp_path / "in.parquet", 30)
    ex = LocalExecutor(scripted_factory())
    job = submit(make_spec(tmp_path, inp), state=ex.state, dispatch=ex.dispatch)
    control.cancel(job.dir)
    ex.state.set_state("cancelled")            # the embedded store is this process's
    ex.drain()
    st = control.status(job.dir)
    assert st["state"] == "cancelled" and st["tiers"][0]["rows_done"] == 0
    assert not (tmp_path / "job" / "results").exists()
    resume_embedded(job.dir, engine_factory=scripted_factory())
    assert control.status(job.dir)["state"] == "done" and len(results(job.dir)) == 30


def test_backoff_is_exponential_with_full_jitter_and_capped(monkeypatch):
    from jobs.state import backoff

    monkeypatch.setenv("CASCADE_RETRY_BACKOFF", "3")
    random.seed(7)
    for attempt, cap in [(1, 3.0), (2, 6.0), (4, 24.0), (9, 600.0), (30, 600.0)]:
        waits = [backoff(attempt) for _ in range(4000)]
        assert 0 <= min(waits) and max(waits) <= cap
        # full jitter: uniform over [0, cap], so its mean is cap/2 and its spread reaches both ends
        assert abs(sum(waits) / len(waits) - cap / 2) < 0.05 * cap
        assert min(waits) < 0.05 * cap and max(waits) > 0.95 * cap


def test_engine_failures_are_retried_with_backoff_then_succeed(tmp_path, monkeypatch):
    # The jitter draws its upper end, so attempt k's retry waits exactly base * 2^(k-1).
    monkeypatch.setenv("CASCADE_RETRY_BACKOFF", "0.4")
    monkeypatch.setattr("jobs.state.random.uniform", lambda lo, hi: hi)
    inp = write_input(tmp_path / "in.parquet", 10)
    failures = {"left": 2}
    seen, calls = [], []

    def flaky(tier):
        calls.append(time.monotonic())
        if failures["left"]:
            failures["left"] -= 1
            raise MemoryError("engine out of memory")
        return scripted_factory()(tier)

    def progress(st):
        seen.extend(st["failed"])

    job = run_embedded(make_spec(tmp_path, inp, shard_rows=10), engine_factory=flaky, progress=progress)
    assert len(results(job.dir)) == 10 and (results(job.dir)["status"] == "ok").all()
    assert seen and "engine out of memory" in seen[0]["error"] and seen[0]["attempts"] == 1
    # one unit on tier 0: the second attempt came 0.4 s after the first failed, the third 0.8 s after the second
    assert len(calls) >= 3
    assert calls[1] - calls[0] >= 0.4 and calls[2] - calls[1] >= 0.8
    assert calls[2] - calls[0] < 5.0


def test_a_unit_out_of_attempts_becomes_per_row_errors_and_the_job_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("CASCADE_RETRY_BACKOFF", "0.01")
    inp = write_input(tmp_path / "in.parquet", 20)
    good = scripted_factory()

    def broken_mid(tier):
        if tier.name == "mid":
            raise RuntimeError("CUDA error: device lost")
        return good(tier)

    job = run_embedded(make_spec(tmp_path, inp, max_attempts=2), engine_factory=broken_mid)
    out = results(job.dir)
    assert len(out) == 20 and control.status(job.dir)["state"] == "done"
    failed = out.filter(pl.col("status") == "error")
    escalated = out["tiers"].list.len() > 1
    assert set(failed["id"]) == set(out.filter(escalated)["id"]) and len(failed) > 0
    for r in failed.iter_rows(named=True):
        assert "tier mid failed 2 times: RuntimeError: CUDA error: device lost" in r["error"]
        assert r["final_tier"] == 0 and r["response"] == r["tiers"][0]["response"]   # keeps tier 0's answer
    assert (out.filter(~escalated)["status"] == "ok").all()


def test_units_run_in_batches_give_what_units_run_one_at_a_time_give(tmp_path, monkeypatch):
    """The embedded executor takes several queued units of a tier at once: each is still its own
    engine call (the unit is the engine's batch), attempt and commit, and their features,
    decisions and result tables are one pass over all their rows. Every final row, its lineage
    and its errors are what running the units one at a time gives; an engine that fails on one
    unit of a batch costs that unit a retry, and no other."""
    monkeypatch.setenv("CASCADE_RETRY_BACKOFF", "0.01")
    prompts = [f"question {i} w{i}" for i in range(60)]
    prompts[7] = "   "                                       # a per-row error inside a batch
    inp = tmp_path / "in.parquet"
    pl.DataFrame({"prompt": prompts, "extra": range(60)}).write_parquet(inp)
    outs, calls = {}, {}
    for batch in (1, 16):
        monkeypatch.setattr(LocalExecutor, "BATCH", batch)
        calls[batch], made = [], {"n": 0}
        good = scripted_factory(calls[batch])

        def flaky(tier):                                     # the 2nd unit's first attempt fails
            made["n"] += 1
            if made["n"] == 2:
                raise MemoryError("engine out of memory")
            return good(tier)

        job = run_embedded(make_spec(tmp_path / f"b{batch}", inp), engine_factory=flaky)
        outs[batch] = results(job.dir).drop("seconds", "job_id")
    one, many = outs[1], outs[16]
    assert len(many) == 60 and many["extra"].to_list() == list(range(60))
    assert many.filter(pl.col("id") == "in:7")["error"].to_list() == ["empty prompt"]

    def runs(out):                     # lineage without the engine's measured seconds
        return [[{k: v for k, v in r.items() if k != "seconds"} for r in t] for t in out["tiers"].to_list()]

    assert runs(many) == runs(one)
    assert many.drop("tiers").equals(one.drop("tiers"))
    assert calls[16] == calls[1]            # the same engine calls, one per unit, in the same order


def test_audit_share_escalates_regardless(tmp_path):
    inp = write_input(tmp_path / "in.parquet", 200)
    spec = make_spec(tmp_path, inp, audit_share=0.25,
                     policy={"rule": {"feature": "first_logprob", "threshold": -2.0}})  # never escalates
    job = run_embedded(spec, engine_factory=scripted_factory())
    out = results(job.dir)
    audited = pl.Series([any(t["audit"] for t in ts) for ts in out["tiers"].to_list()])
    assert 0.15 < audited.mean() < 0.35
    assert (out.filter(~audited)["tiers_run"].list.len() == 1).all()
    assert (out.filter(audited)["tiers_run"].list.len() == 3).all()   # an audited row runs every tier


def test_reports_match_an_independent_count(tmp_path):
    inp = write_input(tmp_path / "in.parquet", 50)
    job = run_embedded(make_spec(tmp_path, inp), engine_factory=scripted_factory())
    out = results(job.dir)
    res = report.run_all(job.dir)
    cols, rows = res["selection"]
    got = {r[0]: r[2] for r in rows}
    assert got == dict(out["final_tier"].value_counts().iter_rows())
    cols, rows = res["cost"]
    cost = dict(zip(cols, rows[0]))
    assert cost["cost_total"] == pytest.approx(out["cost"].sum())
    ran_big = out["tiers_run"].list.contains(2)
    big, rest = out.filter(ran_big), out.filter(~ran_big)
    big_cost = sum(t[-1]["cost"] for t in big["tiers"].to_list())
    per_char = big_cost / big["prompt"].str.len_chars().sum()
    est = big_cost + per_char * rest["prompt"].str.len_chars().sum()
    assert cost["cost_if_last_tier"] == pytest.approx(est)
    cols, rows = res["quality"]
    overall = [r for r in rows if r[0] == "overall"][0]
    assert overall[5] == pytest.approx((out["response"] == out["reference"]).mean())
    funnel = {r[0]: r for r in res["funnel"][1]}
    assert funnel[0][2] == 50 and funnel[1][2] == (out["tiers_run"].list.len() > 1).sum()
    text = report.text_report(job.dir)
    assert "Escalation funnel" in text and "cost_if_last_tier" in text
    status = json.dumps(control.status(job.dir))
    assert '"state": "done"' in status


def test_fsspec_output_directory_and_report(tmp_path):
    """A job directory on another fsspec filesystem (memory:// here; s3:// and gs:// the same way)."""
    import fsspec

    inp = write_input(tmp_path / "in.parquet", 25)
    spec = make_spec(tmp_path, inp, output="memory://jobs/fs-test")
    job = run_embedded(spec, engine_factory=scripted_factory(), overwrite=True)
    fs = fsspec.filesystem("memory")
    parts = fs.glob("/jobs/fs-test/results/*.parquet")
    assert parts and not list((tmp_path / "job").glob("*"))
    with fs.open(parts[0], "rb") as f:
        out = pl.from_arrow(pq.read_table(f))
    assert len(out) == 25 and out["id"].is_unique().all()
    s = report.summarize(job.dir)
    assert s["rows"] == 25 and s["cost_total"] == pytest.approx(out["cost"].sum())


def calibrated_artifact(tmp_path, ladder, cal_rows: int, job_rows: int):
    """A policy calibrated on `cal_rows` rows of a synthetic ladder, saved to tmp_path/policy,
    and a job input of `job_rows` other rows (tmp_path/in.parquet). Returns (policy, the input's
    tier-0 log rows)."""
    from cascade.artifact import save_policy
    from cascade.calibrate import fit_policy
    from cascade.ladder import load_ladder

    policy, _ = fit_policy(load_ladder(ladder(cal_rows, seed=5), require_quality=True))
    save_policy(policy, tmp_path / "policy")
    logs = ladder(job_rows, seed=6)
    first = logs.filter(pl.col("tier") == 0)
    first.select(pl.col("row_id").alias("id"), "prompt", "category").write_parquet(tmp_path / "in.parquet")
    return policy, first


def test_artifact_policy_in_a_job_decides_exactly_as_offline_replay(tmp_path):
    """A calibrated artifact drives a job (start tier from the prompt, skips, kept answers); the
    same policy replayed offline on a log of the very outputs the engines give must choose the
    same tiers and the same kept answer for every row."""
    from cascade.ladder import load_ladder
    from cascade.runtime import replay
    from tests.doubles import ScriptedEngine
    from tests.synthetic import three_tier

    policy, first = calibrated_artifact(tmp_path, three_tier, 900, 120)
    spec = make_spec(tmp_path, tmp_path / "in.parquet", policy={"artifact": str(tmp_path / "policy")})
    job = run_embedded(spec, engine_factory=scripted_factory())
    out = results(job.dir)
    assert all(t["p_quality"] is not None for ts in out["tiers"].to_list() for t in ts)

    # The replay-format log of what each tier's engine answers for each row.
    rows = []
    for t, ts in enumerate(spec.tiers):
        engine = ScriptedEngine(ts)
        gens = engine.generate(first["prompt"].to_list(), ts.sampling)
        for rid, prompt, cat, g in zip(first["row_id"], first["prompt"], first["category"], gens):
            rows.append({"row_id": rid, "tier": t, "prompt": prompt, "output": g.text,
                         "cost": ts.cost.per_input_token * g.prompt_tokens + ts.cost.per_output_token * g.output_tokens,
                         "mean_logprob": g.features()["mean_logprob"], "category": cat})
    ladder = load_ladder(pl.DataFrame(rows), schema=policy.schema)
    offline = replay(policy, ladder, [policy.default_label])
    offline = out.select("id").join(offline.rename({"row_id": "id"}), on="id", how="left",
                                    maintain_order="left")
    assert offline["tiers_run"].to_list() == out["tiers_run"].to_list()
    assert offline["final_tier"].to_list() == out["final_tier"].to_list()
    runs = out["tiers_run"].to_list()
    assert sum(r[0] > 0 for r in runs) > 0                                   # started above tier 0
    assert sum(any(b - a > 1 for a, b in zip(r, r[1:])) for r in runs) > 0    # skipped


def test_fixed_tier_mix_point_in_a_job_sends_each_row_where_replay_does(tmp_path):
    """A fixed-tier mix point (what a cascade point becomes when it fails its do-no-harm check)
    in a job: each row runs exactly one tier, chosen by the hash of its id, as offline replay."""
    from cascade.artifact import save_policy
    from cascade.policy import OperatingPoint, row_hash
    from tests.synthetic import three_tier

    policy, first = calibrated_artifact(tmp_path, three_tier, 600, 200)
    policy.points.append(OperatingPoint(lam=float("nan"), betas={}, mix=(0, 2, 0.3),
                                        check={"fallback": True}, label="mix-0-2"))
    save_policy(policy, tmp_path / "policy")
    spec = make_spec(tmp_path, tmp_path / "in.parquet",
                     policy={"artifact": str(tmp_path / "policy"), "point": "mix-0-2"})
    out = results(run_embedded(spec, engine_factory=scripted_factory()).dir)
    expect = np.where(row_hash(out["id"].to_list()) < 0.3, 2, 0)
    assert out["tiers_run"].to_list() == [[int(t)] for t in expect]
    assert out["final_tier"].to_list() == expect.tolist()
    assert 0.2 < np.mean(expect == 2) < 0.4


def test_artifact_policy_starts_above_tier_0_skips_tier_1_and_keeps_an_earlier_answer(tmp_path):
    """On a ladder built for it (tests/synthetic.keeps_earlier), a calibrated policy in a job
    starts hard rows on tier 2, runs easy rows 0 -> 2 skipping tier 1, and keeps tier 0's answer
    when tier 2's confidence says it is unsure."""
    from tests.synthetic import keeps_earlier

    policy, first = calibrated_artifact(tmp_path, keeps_earlier, 3000, 300)
    point = policy.points[6].label
    spec = make_spec(tmp_path, tmp_path / "in.parquet",
                     policy={"artifact": str(tmp_path / "policy"), "point": point})
    out = results(run_embedded(spec, engine_factory=scripted_factory()).dir)
    category = dict(zip(first["row_id"], first["category"]))
    rows = list(out.iter_rows(named=True))
    started_high = [r for r in rows if r["tiers_run"][0] == 2]
    assert len(started_high) >= 30
    assert sum(category[r["id"]] == "hard" for r in started_high) / len(started_high) > 0.9
    skipped = [r for r in rows if r["tiers_run"] == [0, 2]]
    assert len(skipped) >= 100
    kept_earlier = [r for r in rows if r["final_tier"] != r["tiers_run"][-1]]
    assert len(kept_earlier) >= 30 and all(r["final_tier"] == 0 for r in kept_earlier)
    for r in kept_earlier:                                    # the kept answer is tier 0's, and
        assert r["response"] == r["tiers"][0]["response"]    # tier 2 was the unsure one
    agree = [(r["final_tier"] != r["tiers_run"][-1]) == (r["tiers"][-1]["mean_logprob"] < -0.3)
             for r in skipped]
    assert sum(agree) / len(agree) > 0.9


def test_calibration_loop_job_to_logs_to_artifact_to_job(tmp_path):
    """A job that runs every tier on labelled rows -> `cascade logs` -> calibrate -> a job with
    the artifact. The logs carry the run-time log-probability features as output columns."""
    from click.testing import CliRunner

    from cascade.artifact import load_policy
    from jobs.cli import main

    n = 300
    pl.DataFrame({"prompt": [f"question {i} w{i % 7}" for i in range(n)],
                  "reference": [f"big:w{i % 7}" if i % 3 else f"small:w{i % 7}" for i in range(n)]}
                 ).write_parquet(tmp_path / "cal.parquet")
    spec = make_spec(tmp_path, tmp_path / "cal.parquet", output=str(tmp_path / "cal-job"),
                     policy={"rule": {"feature": "first_logprob", "threshold": 0.0}})
    run_embedded(spec, engine_factory=scripted_factory())
    res = CliRunner().invoke(main, ["logs", str(tmp_path / "cal-job"), "--out", str(tmp_path / "logs.parquet")])
    assert res.exit_code == 0, res.output
    logs = pl.read_parquet(tmp_path / "logs.parquet")
    assert len(logs) == 3 * n and set(logs["tier"]) == {0, 1, 2}
    assert {"quality", "mean_logprob", "first_logprob", "cost"} <= set(logs.columns)
    import re

    refs = pl.read_parquet(tmp_path / "cal.parquet")["reference"].to_list()
    reference = {f"cal:{i}": ref.replace(":", " ") for i, ref in enumerate(refs)}
    expect = [float(re.sub(r"[^a-z0-9]+", " ", out.lower()).strip() == reference[rid])
              for out, rid in zip(logs["output"], logs["row_id"])]
    assert logs["quality"].to_list() == expect
    res = CliRunner().invoke(main, ["calibrate", str(tmp_path / "logs.parquet"), "--out", str(tmp_path / "pol"),
                                    "--epochs", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    policy = load_policy(tmp_path / "pol")
    assert "mean_logprob" in policy.schema["output_num"]
    job = run_embedded(make_spec(tmp_path, tmp_path / "cal.parquet", output=str(tmp_path / "art-job"),
                                 policy={"artifact": str(tmp_path / "pol")}),
                       engine_factory=scripted_factory())
    out = results(job.dir)
    assert len(out) == n and (out["status"] == "ok").all()
    assert all(t["p_quality"] is not None for ts in out["tiers"].to_list() for t in ts)
    # The artifact job decides, row by row, as the policy replayed on the calibration job's logs
    # (the same engines' answers to the same prompts), and it is a cascade, not one fixed tier.
    from cascade.ladder import load_ladder
    from cascade.runtime import replay

    offline = replay(policy, load_ladder(logs, schema=policy.schema), [policy.default_label])
    offline = out.select("id").join(offline.rename({"row_id": "id"}), on="id", how="left",
                                    maintain_order="left")
    assert offline["tiers_run"].to_list() == out["tiers_run"].to_list()
    assert offline["final_tier"].to_list() == out["final_tier"].to_list()
    assert out["final_tier"].n_unique() > 1


def test_state_rebuilt_from_the_job_directory_equals_the_live_state(tmp_path):
    """Mid-job, a state rebuilt from the files alone (as after Redis lost everything) has the
    same units per tier and state, rows waiting and escalations as the live one."""
    import time

    from jobs import recovery
    from jobs.state import MemoryState

    inp = write_input(tmp_path / "in.parquet", 120)
    ex = LocalExecutor(scripted_factory())
    job = submit(make_spec(tmp_path, inp), state=ex.state, dispatch=ex.dispatch)
    checked = 0
    while ex.heap and checked < 12:
        _, _, jd, uid = ex.heap.pop(0)
        run_unit(jd, uid, state=ex.state, engine_factory=scripted_factory(), dispatch=ex.dispatch)
        rebuilt = MemoryState()
        rebuilt.load(recovery.snapshot(job), time.time())
        live, again = ex.state.status(), rebuilt.status()
        assert again["tiers"] == live["tiers"]
        checked += 1
    assert checked == 12 and ex.state.status()["tiers"][1]["states"]      # tier 1 under way


def test_finalize_failure_is_recorded_shown_retried_and_resumable(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from jobs import finalize
    from jobs.cli import main

    monkeypatch.setenv("CASCADE_RETRY_BACKOFF", "0.01")
    inp = write_input(tmp_path / "in.parquet", 20)
    real = finalize.write_results
    tries = []

    def full_disk(job):
        tries.append(1)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(finalize, "write_results", full_disk)
    job = run_embedded(make_spec(tmp_path, inp, max_attempts=2), engine_factory=scripted_factory())
    assert len(tries) == 2                                   # retried once, then given up
    st = control.status(job.dir)
    assert st["state"] == "failed" and "No space left on device" in st["finalize_error"]
    res = CliRunner().invoke(main, ["status", job.dir])
    assert "FINALIZE FAILED: OSError: [Errno 28] No space left on device" in res.output
    assert not (tmp_path / "job" / "results").exists()
    monkeypatch.setattr(finalize, "write_results", real)
    resume_embedded(job.dir, engine_factory=scripted_factory())
    assert control.status(job.dir)["state"] == "done" and len(results(job.dir)) == 20


def _run_cli(tmp_path, raw: dict):
    import yaml
    from click.testing import CliRunner

    from jobs.cli import main

    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    return CliRunner().invoke(main, ["run", str(tmp_path / "job.yaml"), "--quiet"])


def _raw_spec(tmp_path, inp, **kw):
    return {"name": "t", "input": str(inp), "output": str(tmp_path / "job"), "shard_rows": 8,
            "tiers": [{**t, "engine": "scripted"} for t in TIERS],
            "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}, **kw}


@pytest.mark.parametrize("case", ["list id", "bad utf-8", "bad utf-8 in messages"])
def test_bad_input_files_fail_at_submit_with_exit_2_and_nothing_written(tmp_path, case):
    path = tmp_path / "bad.parquet"
    if case == "list id":
        pq.write_table(pa.table({"id": [["a"], ["b"]], "prompt": ["x y", "z w"]}), path)
        needle = "column 'id' must hold strings or integers, found list<element: string>"
    elif case == "bad utf-8":
        text = pa.array([b"fine one", b"fine two", b"bad \xff\xfe byte"], pa.binary()).view(pa.string())
        pq.write_table(pa.table({"prompt": text}), path)
        needle = "column 'prompt' row 2: text is not valid UTF-8"
    else:
        content = pa.array([b"hi", b"\xffno"], pa.binary()).view(pa.string())
        msgs = pa.ListArray.from_arrays([0, 1, 2], pa.StructArray.from_arrays(
            [pa.array(["user", "user"]), content], names=["role", "content"]))
        pq.write_table(pa.table({"messages": msgs}), path)
        needle = "column 'messages' row 1: text is not valid UTF-8"
    res = _run_cli(tmp_path, _raw_spec(tmp_path, path))
    assert res.exit_code == 2, res.output
    assert str(path) in res.output and needle in res.output
    assert not (tmp_path / "job").exists()


def test_a_broken_artifact_fails_before_anything_is_written(tmp_path):
    from cascade.artifact import save_policy
    from cascade.calibrate import fit_policy
    from cascade.ladder import load_ladder
    from tests.synthetic import three_tier

    policy, _ = fit_policy(load_ladder(three_tier(600, seed=5), require_quality=True))
    save_policy(policy, tmp_path / "policy")
    inp = write_input(tmp_path / "in.parquet", 10)
    raw = _raw_spec(tmp_path, inp, policy={"artifact": str(tmp_path / "policy")})
    weights = tmp_path / "policy" / "weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))             # tampered
    res = _run_cli(tmp_path, raw)
    assert res.exit_code == 2 and "checksum does not match policy.json" in res.output
    assert not (tmp_path / "job").exists()
    weights.write_bytes(good)                                           # fixed: runs at once
    res = _run_cli(tmp_path, raw)
    assert res.exit_code == 0, res.output
    (tmp_path / "policy" / "policy.json").write_text("{not json")
    res = _run_cli(tmp_path, {**raw, "output": str(tmp_path / "job2")})
    assert res.exit_code == 2 and "policy.json is not valid JSON" in res.output
    assert str(tmp_path / "policy" / "policy.json") in res.output


def test_cli_resume_finishes_an_embedded_run_that_was_killed(tmp_path):
    """`cascade resume JOB` on a job without a broker: the embedded branch rebuilds the state
    from the directory and runs what is left in this process."""
    import tests.doubles  # noqa: F401  (the scripted engine, by name, for the CLI's workers)
    from click.testing import CliRunner

    from jobs.cli import main

    inp = write_input(tmp_path / "in.parquet", 40)
    spec = parse_spec(_raw_spec(tmp_path, inp))
    ex = LocalExecutor(scripted_factory())
    job = submit(spec, state=ex.state, dispatch=ex.dispatch)
    for _ in range(3):                                    # three units, then the process "dies"
        _, _, jd, uid = heapq.heappop(ex.heap)
        run_unit(jd, uid, state=ex.state, engine_factory=scripted_factory(), dispatch=ex.dispatch)
    assert control.status(job.dir)["tiers"][0]["rows_done"] == 24
    res = CliRunner().invoke(main, ["resume", job.dir])
    assert res.exit_code == 0, res.output
    assert f"job {job.id}: done" in res.output
    out = results(job.dir)
    assert len(out) == 40 and out["id"].is_unique().all() and out["extra"].to_list() == list(range(40))


def test_a_rejected_input_exits_2_every_time(tmp_path):
    """The CLI's error exit is 2 on every run, never a SIGABRT from a native thread pool torn
    down at interpreter exit (seen about once in 15 runs before `cascade` exited hard)."""
    import os
    import subprocess
    import sys

    import yaml

    pq.write_table(pa.table({"id": ["x", "y", "x"], "prompt": ["a b", "c d", "e f"]}), tmp_path / "d.parquet")
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(_raw_spec(tmp_path, tmp_path / "d.parquet")))
    cmd = [sys.executable, "-m", "jobs.cli", "run", str(tmp_path / "job.yaml")]
    env = {**os.environ, "CASCADE_PLUGINS": "tests.doubles"}
    codes = []
    for _ in range(15):                      # two at a time: 30 runs
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            codes.append(p.returncode)
            assert "duplicate id 'x'" in err, err
    assert codes == [2] * 30
    assert not (tmp_path / "job").exists()


@pytest.mark.parametrize("terminal", [False, True])
def test_status_watch_follows_a_running_job_to_the_end(tmp_path, terminal):
    """`cascade status JOB --watch` on a job another process is running: plain-text blocks
    without a terminal (CI, pipes), rich progress bars on one; it returns once the job is done."""
    import os
    import subprocess
    import sys

    inp = write_input(tmp_path / "in.parquet", 40)
    spec = {"name": "w", "input": str(inp), "output": str(tmp_path / "job"), "shard_rows": 8,
            "batch_rows": 8, "tiers": [{**t, "engine": "scripted"} for t in TIERS[:2]],
            "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}}
    (tmp_path / "job.yaml").write_text(json.dumps(spec))
    env = {**os.environ, "CASCADE_PLUGINS": "tests.doubles", "CASCADE_SCRIPTED_DELAY": "0.25"}
    if terminal:
        env |= {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "160"}
    cascade = [sys.executable, "-c", "from jobs.cli import entry; entry()"]
    runner = subprocess.Popen(cascade + ["run", str(tmp_path / "job.yaml"), "--quiet"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 30
        while not (tmp_path / "job" / "job.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        watch = subprocess.run(cascade + ["status", str(tmp_path / "job"), "--watch", "0.2"], env=env,
                               capture_output=True, text=True, timeout=60)
    finally:
        runner.wait(30)
    assert watch.returncode == 0, watch.stderr
    out = watch.stdout
    assert control.status(str(tmp_path / "job"))["state"] == "done"
    if terminal:
        assert "━" in out and "40/40" in out                    # tier 0's bar, filled
        assert out.rstrip().endswith("state done")
    else:
        blocks = [b for b in out.split("job ") if b.strip()]
        assert len(blocks) >= 3 and "state running" in blocks[0] and "state done" in blocks[-1]
        assert "━" not in out and "\x1b[" not in out             # no terminal codes in logs


def test_a_submit_in_progress_is_never_rebuilt_from(tmp_path):
    """A reconciler that finds a job directory whose submit has not finished (job.json written,
    shards still being written, no state yet) must not rebuild a state from it: that state would
    miss the unwritten shards and finalize a job with rows missing. Only submitted.json, written
    once every shard is down and the state loaded, makes a directory rebuildable."""
    from jobs import recovery
    from jobs.job import Job
    from jobs.state import MemoryState

    inp = write_input(tmp_path / "in.parquet", 30)
    ex = LocalExecutor(scripted_factory())
    job = submit(make_spec(tmp_path, inp), state=ex.state, dispatch=ex.dispatch)
    assert job.store.exists("submitted.json")
    job.store.remove("submitted.json")                # as if the submit were still running
    (tmp_path / "job" / "routed" / "s00001.arrow").unlink()
    fresh = MemoryState()
    recovery.reconcile(Job(job.dir), fresh, dispatch=None)
    assert not fresh.exists() and not job.store.exists("finalize_error.json")
    with pytest.raises(ValueError, match="its submit did not finish"):
        control.resume(job.dir, dispatch=None, state=MemoryState())


def test_choices_constrain_answers_and_give_choice_prob_as_a_feature(tmp_path):
    """With `choices` on the job, every answer is one of them, chosen by score, with choice_prob
    (renormalised over the choices) and choice_margin in the lineage; a rule can escalate on
    choice_prob; a row's own `choices` column overrides the job's; `cascade logs` carries both
    as output features for calibration."""
    from click.testing import CliRunner

    from jobs.cli import main

    n = 40
    own = [["yes", "no", "maybe"] if i % 10 == 0 else None for i in range(n)]
    pl.DataFrame({"prompt": [f"question {i} w{i}" for i in range(n)], "choices": own,
                  "reference": ["positive"] * n}).write_parquet(tmp_path / "in.parquet")
    spec = make_spec(tmp_path, tmp_path / "in.parquet", choices=["positive", "negative"],
                     policy={"rule": {"feature": "choice_prob", "threshold": 0.8}})
    job = run_embedded(spec, engine_factory=scripted_factory())
    out = results(job.dir)
    for r in out.iter_rows(named=True):
        valid = r["choices"] or ["positive", "negative"]
        for t in r["tiers"]:
            assert t["response"] in valid and 1 / len(valid) <= t["choice_prob"] <= 1
            assert 0 <= t["choice_margin"] <= t["choice_prob"]
            assert t["decision"] == ("stop" if t["choice_prob"] >= 0.8 or t["tier"] == 2
                                     else f"escalate:{t['tier'] + 1}")
    assert set(out.filter(pl.col("choices").is_not_null())["response"]) <= {"yes", "no", "maybe"}
    assert (out["tiers_run"].list.len() > 1).any() and (out["tiers_run"].list.len() == 1).any()
    # a calibration job over every tier: the logs carry choice_prob per tier
    spec = make_spec(tmp_path, tmp_path / "in.parquet", output=str(tmp_path / "cal"),
                     choices=["positive", "negative"],
                     policy={"rule": {"feature": "choice_prob", "threshold": 1.1}})
    run_embedded(spec, engine_factory=scripted_factory())
    res = CliRunner().invoke(main, ["logs", str(tmp_path / "cal"), "--out", str(tmp_path / "logs.parquet")])
    assert res.exit_code == 0, res.output
    logs = pl.read_parquet(tmp_path / "logs.parquet")
    assert logs["choice_prob"].null_count() == 0 and logs["choice_prob"].min() >= 1 / 3


def test_finalize_in_many_parts_gives_the_rows_of_one_part(tmp_path, monkeypatch):
    """Finalize writes results/ part by part (ranges of input positions, each from the unit
    results whose spans touch it); coalesced units hold rows from many parts. Parts of one
    shard each give, row for row, what one part gives: every row once, in input order, with its
    lineage, cost, answer and input file."""
    from jobs import finalize

    d = tmp_path / "in"
    d.mkdir()
    write_input(d / "a.parquet", 29)
    write_input(d / "b.parquet", 21)
    spec = make_spec(tmp_path, d)
    one = results(run_embedded(spec, engine_factory=scripted_factory()).dir).drop("job_id")
    monkeypatch.setattr(finalize, "PART_ROWS", 1)
    monkeypatch.setattr(finalize, "PART_SHARDS", 1)
    job = run_embedded(spec, engine_factory=scripted_factory(), overwrite=True)
    parts = sorted((Path(job.dir) / "results").glob("part-*.parquet"))
    assert len(parts) == 7                                    # 50 rows, shards of 8
    many = pl.concat([pl.read_parquet(p) for p in parts]).drop("job_id")

    def unmeasured(out):                      # all but the wall seconds the runs measured
        rows = out.drop("seconds").to_dicts()
        for r in rows:
            for run in r["tiers"]:
                run.pop("seconds")
        return rows

    assert unmeasured(many) == unmeasured(one)
    assert one["tiers_run"].list.len().max() > 1              # some rows ran on several tiers


def test_a_parquet_input_with_a_corrupt_page_is_a_clear_error_and_nothing_is_written(tmp_path):
    """Footer and magic intact, a data page's header overwritten: the run fails with exit 2 and
    one line naming the file, and leaves no job directory."""
    from click.testing import CliRunner

    from jobs.cli import main

    inp = write_input(tmp_path / "in.parquet", 2000)
    raw = bytearray(inp.read_bytes())
    meta = pq.ParquetFile(inp).metadata
    col = meta.row_group(0).column(0)                          # the prompt column's first page
    start = col.data_page_offset
    raw[start:start + 32] = b"\xff" * 32
    inp.write_bytes(bytes(raw))
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"name": "c", "input": str(inp), "output": str(tmp_path / "job"), "tiers": TIERS,
                                "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}}))
    res = CliRunner().invoke(main, ["run", str(spec)], env={"CASCADE_PLUGINS": "tests.doubles"})
    assert res.exit_code == 2, res.output
    assert f"error: {inp}: cannot be read as Parquet" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "job").exists()


def test_tiers_sharing_the_scripted_model_answer_each_as_its_own_tier(tmp_path):
    """The scripted double answers with its tier's name; three tiers that all say `model:
    scripted` get three engines from the process's engine cache (as Celery workers, one per
    tier, do), so `cascade run` and a cluster give the same rows."""
    inp = write_input(tmp_path / "in.parquet", 40)
    tiers = [{"name": n, "model": "scripted", "engine": "scripted", "cost": {"per_token": c}}
             for n, c in (("small", 1), ("mid", 3), ("big", 10))]
    job = run_embedded(make_spec(tmp_path, inp, tiers=tiers))
    out = results(job.dir)
    runs = [t for ts in out["tiers"].to_list() for t in ts]
    assert {t["name"] for t in runs} == {"small", "mid", "big"}
    assert all(t["response"].startswith(t["name"] + ":") for t in runs)


def test_status_bars_keep_bar_and_counts_on_an_80_column_terminal():
    import io

    from rich.console import Console

    from jobs.cli import status_bars

    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    bars = status_bars(console)
    bars.add_task("smollm2-135m", total=2000, completed=700, tier=0,
                  detail="running 2u/100r, queued 10u/500r, done 30u/1500r; waiting to coalesce "
                         "1234 rows; escalated 5678")
    console.print(bars.make_tasks_table(bars.tasks))
    line = buf.getvalue().splitlines()[0]
    assert line.startswith("tier 0 smollm2-135m") and "700/2000" in line and "━" * 7 in line, line
    assert line.rstrip().endswith("…") and len(line.rstrip()) <= 80, line


def test_a_submit_that_never_finished_is_named_with_the_command_that_works(tmp_path):
    """A job directory without submitted.json (its submit was killed): status says so, and a
    new submit says to use --overwrite, which then works."""
    from click.testing import CliRunner

    from jobs.cli import main

    inp = write_input(tmp_path / "in.parquet", 10)
    spec = make_spec(tmp_path, inp)
    job = run_embedded(spec, engine_factory=scripted_factory())
    (Path(job.dir) / "submitted.json").unlink()
    (Path(job.dir) / "finished.json").unlink()
    res = CliRunner().invoke(main, ["status", job.dir])
    assert res.exit_code == 2 and "did not finish (no submitted.json)" in res.output
    assert "submit it again with --overwrite" in res.output and "Traceback" not in res.output
    with pytest.raises(FileExistsError, match="did not finish .* submit again with --overwrite"):
        run_embedded(spec, engine_factory=scripted_factory())
    again = run_embedded(spec, engine_factory=scripted_factory(), overwrite=True)
    assert len(results(again.dir)) == 10


def test_nightly_runs_reuse_yesterdays_answers(tmp_path, monkeypatch):
    """Two nights through the CLI, `output: ROOT/nightly/{date}` and a shared answer store; night
    2's input is night 1's rows plus new ones. Night 2 gets its own directory; every row of
    night 1 has every tier run marked reused, with night 1's response, decisions and final
    tier, pays nothing and saves what night 1 paid; new rows reuse nothing; and the engine only
    sees new rows."""
    from click.testing import CliRunner

    from jobs.cli import main
    from tests import doubles

    seen: list[tuple[str, str]] = []
    real = doubles.ScriptedEngine.generate

    def counted(self, prompts, sampling):
        seen.extend((self.tier.name, p) for p in prompts)
        return real(self, prompts, sampling)

    monkeypatch.setattr(doubles.ScriptedEngine, "generate", counted)
    (tmp_path / "in").mkdir()
    old = [f"question {i} w{i}" for i in range(40)]
    new = [f"fresh {i} v{i}" for i in range(12)]
    pl.DataFrame({"id": [f"q{i}" for i in range(40)], "prompt": old}).write_parquet(tmp_path / "in" / "2026-12-01.parquet")
    pl.DataFrame({"id": [f"q{i}" for i in range(40)] + [f"n{i}" for i in range(12)],
                  "prompt": old + new}).write_parquet(tmp_path / "in" / "2026-12-02.parquet")
    spec = {"name": "nightly", "input": str(tmp_path / "in" / "{date}.parquet"),
            "output": str(tmp_path / "nightly" / "{date}"), "answers": str(tmp_path / "answers"),
            "shard_rows": 8, "batch_rows": 10,
            "tiers": [{**t, "engine": "scripted"} for t in TIERS],
            "policy": {"rule": {"feature": "first_logprob", "threshold": -0.5}}}
    (tmp_path / "nightly.yaml").write_text(json.dumps(spec))
    for day in ("2026-12-01", "2026-12-02"):
        if day == "2026-12-02":
            seen.clear()
        res = CliRunner().invoke(main, ["run", str(tmp_path / "nightly.yaml"), "--date", day, "--quiet"])
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "nightly").iterdir()) == ["2026-12-01", "2026-12-02"]
    one = by_id(results(tmp_path / "nightly" / "2026-12-01"))
    two = by_id(results(tmp_path / "nightly" / "2026-12-02"))
    assert len(two) == 52
    assert any(len(r["tiers"]) > 1 for r in one.values())          # escalations were reused too
    for rid, r in two.items():
        runs = r["tiers"]
        if rid in one:
            before = one[rid]
            assert all(t["reused"] for t in runs) and not any(t["reused"] for t in before["tiers"])
            assert r["response"] == before["response"] and r["final_tier"] == before["final_tier"]
            assert [(t["tier"], t["response"], t["decision"], t["first_logprob"]) for t in runs] == \
                [(t["tier"], t["response"], t["decision"], t["first_logprob"]) for t in before["tiers"]]
            assert r["cost"] == 0 and r["saved_cost"] == pytest.approx(before["cost"])
        else:
            assert not any(t["reused"] for t in runs) and r["saved_cost"] == 0 and r["cost"] > 0
    # the engine saw only the new rows, on tier 0 all of them
    assert {p for _, p in seen} <= set(new)
    assert sorted(p for t, p in seen if t == "small") == sorted(new)
    meta = json.loads((tmp_path / "nightly" / "2026-12-02" / "job.json").read_text())
    assert meta["spec"]["date"] == "2026-12-02"


def test_answer_store_compaction_and_retention(tmp_path):
    """Two jobs' segments of the same answers compact to one segment without duplicates; with
    keep_days, answers older than that are dropped by compaction and never reused before it."""
    import time as _time

    from jobs import answers

    spec = make_spec(tmp_path, write_input(tmp_path / "in.parquet", 20), answers=str(tmp_path / "store"))
    calls = []
    run_embedded(spec, engine_factory=scripted_factory(calls))
    first = sum(n for _, n in calls)
    run_embedded(spec, engine_factory=scripted_factory(calls), overwrite=True)
    assert sum(n for _, n in calls) == first                       # the second run computed nothing
    answers._INDEXES.clear()
    store = tmp_path / "store"
    before = sorted(store.rglob("*.arrow"))
    dry = answers.compact(str(store), dry_run=True)
    assert sorted(store.rglob("*.arrow")) == before and dry["answers_after"] == dry["answers_before"]
    out = answers.compact(str(store))
    assert out["tiers"] == 3 and len(list(store.rglob("*.arrow"))) == 3
    assert out["answers_after"] == out["answers_before"] == first
    # an answer store whose answers are a day old, kept for half a day: nothing is reused
    for f in store.rglob("*.arrow"):
        t = pa.ipc.open_file(pa.memory_map(str(f))).read_all()
        t = t.set_column(t.schema.get_field_index("created"), "created",
                         pa.array([_time.time() - 86400] * t.num_rows))
        with pa.ipc.new_file(str(f), t.schema) as w:
            w.write_table(t)
    answers._INDEXES.clear()
    stale = make_spec(tmp_path, write_input(tmp_path / "in.parquet", 20),
                      answers={"path": str(store), "keep_days": 0.5})
    calls.clear()
    run_embedded(stale, engine_factory=scripted_factory(calls), overwrite=True)
    assert sum(n for _, n in calls) == first
    assert answers.compact(str(store), keep_days=0.5)["answers_after"] == first   # only the new ones


def test_gc_keeps_results_and_unfinished_jobs(tmp_path):
    """`cascade gc ROOT --keep-days N`: a job finished longer ago than N days goes whole; a newer
    finished job loses its unit files and keeps results/, job.json and finished.json (its
    report still works); an unfinished job is untouched; --dry-run removes nothing."""
    from click.testing import CliRunner

    from jobs.cli import main

    inp = write_input(tmp_path / "in.parquet", 20)
    root = tmp_path / "runs"
    old = run_embedded(make_spec(tmp_path, inp, output=str(root / "2026-10-01")), engine_factory=scripted_factory())
    new = run_embedded(make_spec(tmp_path, inp, output=str(root / "2026-12-01")), engine_factory=scripted_factory())
    ex = LocalExecutor(scripted_factory())
    running = submit(make_spec(tmp_path, inp, output=str(root / "deep" / "running")), state=ex.state,
                     dispatch=ex.dispatch)                      # submitted, never run
    long_ago = time.time() - 60 * 86400
    os.utime(Path(old.dir) / "finished.json", (long_ago, long_ago))
    before = sorted(str(p) for p in root.rglob("*"))
    dry = CliRunner().invoke(main, ["gc", str(root), "--keep-days", "30", "--dry-run"])
    assert dry.exit_code == 0 and f"would remove job {old.dir}" in dry.output
    assert sorted(str(p) for p in root.rglob("*")) == before
    res = CliRunner().invoke(main, ["gc", str(root), "--keep-days", "30"])
    assert res.exit_code == 0, res.output
    assert not Path(old.dir).exists()
    kept = sorted(p.name for p in Path(new.dir).iterdir())
    assert kept == ["finished.json", "job.json", "results", "submitted.json"]
    assert results(new.dir).height == 20
    assert CliRunner().invoke(main, ["report", new.dir]).exit_code == 0
    assert (Path(running.dir) / "routed").exists() and not (Path(running.dir) / "finished.json").exists()
