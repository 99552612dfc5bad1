"""Reports over job directories: the SQL in sql/*.sql run by DuckDB over the job's Parquet (no
row is loaded into Python), rendered as report.md, a self-contained report.html, PNG plots and
summary.json; and nightly history across many job directories, with drift tests.

Each .sql file reads the job directory from the DuckDB variable `job`, so the same file runs
here and from the plain duckdb CLI:  duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/cost.sql
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path

import duckdb
from scipy import stats

from cascade.render import Doc, bar_png, fmt, frontier_png, grouped_bar_png, lines_png, reliability_png
from jobs.job import Job
from jobs.roots import walk_jobs
from jobs.storage import Store

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
QUERIES = ["selection", "funnel", "cost", "cost_per_tier", "fixed_tiers", "quality", "tier_quality",
           "errors", "latency", "audit", "calibration"]
NEEDS_REFERENCE = {"quality", "tier_quality", "calibration"}
# The label scorer. Each .sql file that scores answers defines these macros itself, so that it
# runs alone from the duckdb CLI; tests/test_reports.py checks every copy is this text.
SCORER_MACROS = """\
CREATE OR REPLACE TEMP MACRO norm_label(s) AS trim(regexp_replace(lower(s), '[^a-z0-9]+', ' ', 'g'));
CREATE OR REPLACE TEMP MACRO label_match(resp, ref) AS
  (norm_label(resp) = norm_label(ref) OR starts_with(norm_label(resp), norm_label(ref) || ' '));
"""
TITLES = {
    "selection": "Selection: which tier's answer each row kept",
    "funnel": "Escalation funnel",
    "cost": "Cost against running every row on the last tier",
    "cost_per_tier": "Cost per tier",
    "fixed_tiers": "Every row on one tier (estimated from the rows each tier ran)",
    "quality": "Quality against the references",
    "errors": "Errors",
    "latency": "Throughput and latency per tier",
    "audit": "Audits: agreement of the stopping tier with the next tier",
    "calibration": "Predicted against observed quality",
    "tier_quality": "Later tiers on all rows: quality corrected for selection with the audits",
}


def sql_text(name: str) -> str:
    return (SQL_DIR / f"{name}.sql").read_text()


def connect(job_dir: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    store = Store(job_dir)
    if not store.local:                      # fsspec URL: DuckDB reads through the same filesystem
        con.register_filesystem(store.fs)
    con.execute("SET VARIABLE job = ?", [str(job_dir).rstrip("/")])
    return con


def result_columns(con, files: str = "getvariable('job') || '/results/*.parquet'") -> set[str]:
    """The column names of the result files `files` (a DuckDB expression) from their footers."""
    return {c[0] for c in con.execute(f"SELECT name FROM parquet_schema({files})").fetchall()}


def has_reference(con) -> bool:
    return "reference" in result_columns(con)


def run_query(con, name: str, paid_all: bool = False) -> tuple[list[str], list[tuple]]:
    """One query's columns and rows. `paid_all`: the results predate answer reuse (their runs
    have no `reused` field): every run was computed and paid, and the query reads it so."""
    text = sql_text(name)
    if paid_all:
        text = text.replace("t.reused", "false")
    rel = con.execute(text)
    return [d[0] for d in rel.description], rel.fetchall()


def run_all(job_dir: str) -> dict[str, tuple[list[str], list[tuple]]]:
    con = connect(job_dir)
    cols = result_columns(con)
    ref, paid_all = "reference" in cols, "reused" not in cols
    return {name: (([], []) if name in NEEDS_REFERENCE and not ref else run_query(con, name, paid_all))
            for name in QUERIES}


def _dicts(res, name) -> list[dict]:
    cols, rows = res[name]
    return [dict(zip(cols, r)) for r in rows]


def _tier_names(job_dir: str, res) -> list[str]:
    """The job's tier names from its job.json; a results directory without one (copied on its
    own) names tiers from the funnel. A job.json that cannot be read is an error, not a reason
    to guess: tier names taken from the results could shift."""
    if not Store(job_dir).exists("job.json"):
        return [r["name"] for r in _dicts(res, "funnel")]
    return [t.name for t in Job(job_dir).spec.tiers]


def summarize(job_dir: str, res: dict | None = None) -> dict:
    """summary.json: every number from the SQL results."""
    res = res or run_all(job_dir)
    names = _tier_names(job_dir, res)
    sel = {r["final_tier"]: r for r in _dicts(res, "selection")}
    spent = {r["tier"]: r for r in _dicts(res, "cost_per_tier")}
    fixed = {r["tier"]: r for r in _dicts(res, "fixed_tiers")}
    qual = {r["tier"]: r for r in _dicts(res, "quality") if r["scope"] == "tier"}
    corrected = {r["tier"]: r for r in _dicts(res, "tier_quality") if r["covers_all_rows"]}
    overall = [r for r in _dicts(res, "quality") if r["scope"] == "overall"]
    cost = _dicts(res, "cost")[0]
    tiers = [{"tier": i, "name": n, "rows": int(sel.get(i, {}).get("rows", 0)),
              "share": float(sel.get(i, {}).get("share", 0.0)),
              "cost": float(spent.get(i, {}).get("cost") or 0.0),
              "rows_run": int(spent.get(i, {}).get("rows_run") or 0),
              "cost_per_row_if_all": fixed.get(i, {}).get("cost_per_row_if_all"),
              "quality_on_rows_run": qual.get(i, {}).get("normalised"),
              "quality_all_rows": corrected.get(i, {}).get("quality_estimate"),
              "quality_all_rows_ci": ([corrected[i]["ci_low"], corrected[i]["ci_high"]]
                                      if corrected.get(i, {}).get("ci_low") is not None else None)}
             for i, n in enumerate(names)]
    with_q = [t for t in tiers if t["quality_on_rows_run"] is not None]
    best = max(with_q, key=lambda t: t["quality_on_rows_run"])["tier"] if with_q else len(names) - 1
    rows = int(cost["rows"])
    best_cost = tiers[best]["cost_per_row_if_all"]
    return {
        "rows": rows, "tiers": tiers,
        "cost_total": float(cost["cost_total"] or 0.0),
        "cost_per_row": float(cost["cost_per_row"] or 0.0),
        "seconds_total": float(cost["seconds_total"] or 0.0),
        "cost_if_last_tier": cost["cost_if_last_tier"],
        "best_tier": best,
        "cost_if_best_tier": best_cost * rows if best_cost is not None else None,
        "quality": overall[0]["normalised"] if overall else None,
        "quality_exact": overall[0]["exact"] if overall else None,
        "errors": int(sum(r["rows"] for r in _dicts(res, "errors"))),
        "unrouted": int(sel.get(None, {}).get("rows", 0)),
    }


def fixed_tier_points(summary: dict) -> dict[str, tuple]:
    """Each tier's (cost per row if it ran every row, quality) for the frontier, labelled with
    what the quality covers: "all rows" for a tier that ran every row, "all rows, audit-weighted"
    for a later tier whose quality on all rows the audits estimate without the selection bias,
    and otherwise "its N rows" (the escalated rows only, which are not a random sample)."""
    pts = {}
    for t in summary["tiers"]:
        if t["rows_run"] == summary["rows"]:
            label, quality = "all rows", t["quality_on_rows_run"]
        elif t["quality_all_rows"] is not None:
            label, quality = "all rows, audit-weighted", t["quality_all_rows"]
        else:
            label, quality = f"its {t['rows_run']} rows", t["quality_on_rows_run"]
        pts[f"{t['name']} ({label})"] = (t["cost_per_row_if_all"], quality)
    return pts


class NotFinished(ValueError):
    """A job directory whose job has not finished: it has no results to read yet."""


def require_finished(job_dir: str, bare_results: bool = True):
    """Reports, logs and exports read `results/`, which finalize writes last: a job directory
    (job.json) without finished.json has none yet. A results directory copied on its own (no
    job.json) is read as it is where `bare_results` (reports and logs; export needs the job)."""
    store = Store(job_dir)
    if not store.exists("finished.json") and (store.exists("job.json") or not bare_results):
        raise NotFinished(f"{job_dir}: the job has not finished (no finished.json); "
                          f"`cascade status {job_dir}` says where it is")


def build(job_dir: str) -> tuple[Doc, dict]:
    require_finished(job_dir)
    res = run_all(job_dir)
    summary = summarize(job_dir, res)
    names = [t["name"] for t in summary["tiers"]]
    doc = Doc(f"Job report: {Path(str(job_dir)).name}")
    q = summary["quality"]
    ratio = (summary["cost_total"] / summary["cost_if_last_tier"]
             if summary["cost_if_last_tier"] else None)
    doc.p(f"{summary['rows']} rows; cost {fmt(summary['cost_total'])} "
          f"({fmt(ratio)} of running every row on the last tier, "
          f"{fmt(summary['cost_if_last_tier'])} estimated); quality "
          f"{fmt(q) if q is not None else 'n/a (no references)'}; errors {summary['errors']}.")
    doc.p("Costs are in the job's configured units; seconds are measured engine time, each row "
          "charged its share of its batch. 'If all rows ran on a tier' is estimated from the "
          "measured cost per prompt character on the rows that tier did run.")
    for name in QUERIES:
        cols, rows = res[name]
        if name in NEEDS_REFERENCE and not cols:
            doc.h2(TITLES[name])
            doc.p("No `reference` column in the input.")
            continue
        if name in ("calibration", "audit", "tier_quality") and not rows:
            continue
        doc.h2(TITLES[name])
        doc.table(cols, rows)
        if name == "selection":
            doc.image("selection.png", bar_png(names, [t["share"] for t in summary["tiers"]],
                                               "Rows answered by each tier", "share of rows",
                                               [f"{t['rows']} ({t['share']:.0%})" for t in summary["tiers"]]),
                      "Selection distribution: share of rows whose answer each tier gave")
        elif name == "funnel":
            f = _dicts(res, "funnel")
            doc.image("funnel.png", grouped_bar_png(
                [r["name"] for r in f], {"entered": [r["entered"] for r in f],
                                         "stopped": [r["stopped"] for r in f],
                                         "escalated": [r["escalated"] for r in f]},
                "Escalation funnel", "rows"), "Rows entering, stopping and escalating at each tier")
        elif name == "calibration":
            plots = {"p_quality": ("calibration.png", "Predicted against observed quality",
                                   "Calibration of the policy's quality predictions (rows with references)"),
                     "choice_prob": ("choice_calibration.png", "choice_prob against observed quality",
                                     "Calibration of choice_prob, the free confidence of a constrained "
                                     "answer (rows with references)")}
            for signal, (png, title, alt) in plots.items():
                curves = {}
                for r in _dicts(res, "calibration"):
                    if r["signal"] == signal:
                        curves.setdefault(r["name"], []).append((r["predicted"], r["observed"], r["rows"]))
                if curves:
                    doc.image(png, reliability_png(curves, title), alt)
        elif name == "cost_per_tier":
            doc.image("cost_per_tier.png", bar_png(names, [t["cost"] for t in summary["tiers"]],
                                                   "Cost spent per tier", "cost (configured units)"),
                      "Cost each tier spent, over all the rows it ran")
    fixed_pts = fixed_tier_points(summary)
    if q is not None:                       # the fixed-tier line joins only tiers that ran every row
        pts = [p for k, p in fixed_pts.items() if p[0] is not None and p[1] is not None
               and "(all rows" in k]
        doc.h2("Quality/cost frontier")
        doc.p("The job's operating point against each fixed tier. A fixed tier's quality is "
              "measured on the rows it ran: all rows for tier 0 when every row starts there, but "
              "only the escalated rows for later tiers, which are not a random sample (biased "
              "either way). Where the job has audits, a later tier's quality on all rows is "
              "estimated from them without that bias (see the table above, with its interval); "
              "otherwise the tier is plotted as a labelled point with its row count, off the "
              "fixed-tier line. `cascade eval` on logs where every tier ran gives exact frontiers.")
        doc.image("frontier.png", frontier_png({"fixed tiers": pts},
                                               {**fixed_pts, "this job": (summary["cost_per_row"], q)},
                                               "Quality against cost per row"),
                  "Quality/cost: fixed tiers and the job's operating point")
    else:
        doc.h2("Quality/cost frontier")
        doc.p("Needs a `reference` column in the input.")
    return doc, summary


def save(doc: Doc, summary: dict, out_dir: str, stem: str = "report") -> Path:
    """Write a built report: STEM.md, STEM.html, its PNGs, and the summary as JSON."""
    out = doc.write(out_dir, stem=stem)
    name = "summary.json" if stem == "report" else f"{stem}.json"
    (out / name).write_text(json.dumps(summary, indent=1, default=float))
    return out


def write_report(job_dir: str, out_dir: str) -> dict:
    doc, summary = build(job_dir)
    save(doc, summary, out_dir)
    return summary


def text_report(job_dir: str) -> str:
    doc, _ = build(job_dir)
    return doc.markdown()


# ---------------------------------------------------------------- nightly history

def _z_two_prop(k1, n1, k0, n0) -> tuple[float, float]:
    if n1 == 0 or n0 == 0:
        return float("nan"), float("nan")
    p = (k1 + k0) / (n1 + n0)
    se = math.sqrt(p * (1 - p) * (1 / n1 + 1 / n0))
    if se == 0:
        return 0.0, 1.0
    z = (k1 / n1 - k0 / n0) / se
    return z, float(2 * stats.norm.sf(abs(z)))


def calibration_shares(meta: dict) -> tuple[list[float], int] | None:
    """(predicted share of rows answered by each tier, calibration rows) for a job whose policy
    is a calibrated artifact, at the operating point the job used; None for a rule policy."""
    pol = meta.get("spec", {}).get("policy", {})
    art = pol.get("artifact")
    if not art or not (Path(art) / "policy.json").exists():
        return None
    doc = json.loads((Path(art) / "policy.json").read_text())
    cal = doc.get("calibration", {})
    label = pol.get("point") or doc.get("default_point") or doc.get("default_label")
    for p in cal.get("points", []):
        if p.get("label") == label and "shares" in p:
            return p["shares"], int(cal.get("rows", 0))
    return None


def job_dirs(root: str) -> list[Path]:
    """Every finished job directory (job.json and results/) below `root`, at any depth, oldest
    run first: by the run's date (`--date`; else the day it was created), then its creation. The
    walk does not descend into a job directory (its unit files may be millions)."""
    found = [d for d in walk_jobs(root) if list(d.glob("results/*.parquet"))]
    return sorted(found, key=lambda d: _run_order(json.loads((d / "job.json").read_text())))


def _run_order(meta: dict) -> tuple[str, float]:
    return run_day(meta), meta.get("created", 0)


def run_day(meta: dict) -> str:
    """A run's date: its spec's (`--date`), else the day its job was created (UTC)."""
    day = (meta.get("spec") or {}).get("date")
    if day:
        return day
    created = meta.get("created")
    return (datetime.datetime.fromtimestamp(created, datetime.timezone.utc).date().isoformat()
            if isinstance(created, (int, float)) and created > 1e9 else "")


def history_figures(dirs: list[Path]) -> list[list[dict]]:
    """sql/history.sql over every run's results at once: per run (in `dirs` order), its rows of
    per-tier figures."""
    con = duckdb.connect()
    globs = [str(d / "results" / "*.parquet") for d in dirs]
    con.execute("SET VARIABLE runs = ?", [globs])
    cols = result_columns(con, "getvariable('runs')")
    con.execute(f"""CREATE VIEW results AS
        SELECT regexp_extract(filename, '^(.*)/results/[^/]+$', 1) AS job, * EXCLUDE (filename)
               {'' if 'reference' in cols else ', NULL::VARCHAR AS reference'}
        FROM read_parquet(getvariable('runs'), filename = true, union_by_name = true)""")
    rel = con.execute(sql_text("history"))
    names = [d[0] for d in rel.description]
    by_job: dict[str, list[dict]] = {}
    for row in rel.fetchall():
        r = dict(zip(names, row))
        by_job.setdefault(r["job"], []).append(r)
    return [by_job.get(str(d), []) for d in dirs]


def _run_figures(d: Path, rows: list[dict]) -> dict:
    """One run of the history: its summary figures and per-tier funnel, audit and calibration."""
    meta = json.loads((d / "job.json").read_text())
    first = rows[0]
    by_tier = {r["tier"]: r for r in rows if r["tier"] is not None}
    try:
        names = [t["name"] for t in meta["spec"]["tiers"]]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{d / 'job.json'}: no tier names under spec.tiers ({exc!r})") from None
    n = first["rows"]
    tiers = [{"tier": i, "name": name, "rows": int(by_tier.get(i, {}).get("answered") or 0),
              "share": (by_tier.get(i, {}).get("answered") or 0) / max(n, 1)} for i, name in enumerate(names)]
    summary = {"rows": n, "cost_total": float(first["cost_total"]), "cost_per_row": first["cost_total"] / max(n, 1),
               "errors": int(first["errors"]), "quality": first["quality"], "tiers": tiers}
    funnel = {t: {"entered": r["entered"], "escalated": r["escalated"],
                  "escalation_rate": r["escalated"] / r["entered"]} for t, r in by_tier.items() if r["entered"]}
    audit = {t: {"audited": r["audited"], "agreement": r["agreement"]}
             for t, r in by_tier.items() if r["audited"]}
    calib = {t: {"n": r["cal_n"], "observed": float(r["cal_observed"]), "predicted": float(r["cal_predicted"]),
                 "var": float(r["cal_var"])} for t, r in by_tier.items() if r["cal_n"]}
    return {"job": d.name, "date": run_day(meta), "policy": meta.get("policy_version"),
            "created": meta.get("created"), "summary": summary, "funnel": funnel,
            "audit": audit, "calibration": calib, "predicted_shares": calibration_shares(meta)}


def history(root: str, alpha: float = 0.01) -> tuple[Doc, dict]:
    """Tabulate and plot cost, shares, escalation, errors and audit agreement across runs; test
    the latest run against all earlier runs pooled: a two-proportion z-test per tier for its share
    of answers, its escalation rate and its audit agreement, and a calibration z-test (observed
    correct minus the sum of predicted probabilities, over its standard deviation) where
    references and predictions exist; Bonferroni across the tests."""
    dirs = job_dirs(root)
    if not dirs:
        raise FileNotFoundError(f"{root}: no finished job directories (*/job.json with results/)")
    runs = [_run_figures(d, figures) for d, figures in zip(dirs, history_figures(dirs))]
    names = [t["name"] for t in runs[-1]["summary"]["tiers"]]
    doc = Doc(f"Nightly history: {root}")
    rows = []
    for r in runs:
        s = r["summary"]
        rows.append([r["date"], r["job"], r["policy"], s["rows"], s["cost_total"], s["cost_per_row"],
                     s["errors"] / max(s["rows"], 1), s["quality"]] + [t["share"] for t in s["tiers"]]
                    + [(r["funnel"].get(i, {}).get("escalation_rate")) for i in range(len(names))])
    cols = (["date", "job", "policy", "rows", "cost", "cost_per_row", "error_rate", "quality"]
            + [f"share {n}" for n in names] + [f"escalation {n}" for n in names])
    doc.h2("Runs")
    doc.table(cols, rows)
    changes = [f"{b['date']} ({b['job']}): {a['policy']} -> {b['policy']}"
               for a, b in zip(runs, runs[1:]) if a["policy"] != b["policy"]]
    doc.p("Policy changes: " + ("; ".join(changes) if changes else "none across these runs") + ".")
    x = _axis(runs)
    doc.image("history_cost.png", lines_png(x, {"cost per row": [r["summary"]["cost_per_row"] for r in runs]},
                                            "Cost per row by run", "run date", "cost per row"),
              "Cost per row across runs")
    doc.image("history_shares.png", lines_png(
        x, {n: [r["summary"]["tiers"][i]["share"] if i < len(r["summary"]["tiers"]) else None
                for r in runs] for i, n in enumerate(names)},
        "Share of rows answered per tier", "run date", "share"), "Selection shares across runs")
    doc.image("history_escalation.png", lines_png(
        x, {n: [r["funnel"].get(i, {}).get("escalation_rate") for r in runs] for i, n in enumerate(names[:-1])}
        | {"error rate": [r["summary"]["errors"] / max(r["summary"]["rows"], 1) for r in runs]},
        "Escalation and error rates", "run date", "rate"), "Escalation and error rates across runs")

    _registry_section(doc, dirs[-1])
    tests = []
    last = runs[-1]
    if last["predicted_shares"]:            # against what the calibration predicts
        shares, n_cal = last["predicted_shares"]
        n1 = last["summary"]["rows"]
        for i, n in enumerate(names):
            if i < len(shares) and n_cal:
                k1 = last["summary"]["tiers"][i]["rows"]
                tests.append(("share vs calibration", n, k1 / max(n1, 1), shares[i],
                              *_z_two_prop(k1, n1, round(shares[i] * n_cal), n_cal)))
    if len(runs) >= 2:
        last, earlier = runs[-1], runs[:-1]
        for i, n in enumerate(names):
            k1 = last["summary"]["tiers"][i]["rows"]
            n1 = last["summary"]["rows"]
            k0 = sum(r["summary"]["tiers"][i]["rows"] for r in earlier if i < len(r["summary"]["tiers"]))
            n0 = sum(r["summary"]["rows"] for r in earlier)
            tests.append(("share", n, k1 / max(n1, 1), k0 / max(n0, 1), *_z_two_prop(k1, n1, k0, n0)))
            f1 = last["funnel"].get(i)
            if f1 and i < len(names) - 1:
                e0 = sum(r["funnel"].get(i, {}).get("escalated", 0) for r in earlier)
                m0 = sum(r["funnel"].get(i, {}).get("entered", 0) for r in earlier)
                tests.append(("escalation rate", n, f1["escalated"] / max(f1["entered"], 1),
                              e0 / max(m0, 1), *_z_two_prop(f1["escalated"], f1["entered"], e0, m0)))
            a1 = last["audit"].get(i)
            if a1:
                ka = sum(r["audit"].get(i, {}).get("agreement", 0) * r["audit"].get(i, {}).get("audited", 0)
                         for r in earlier)
                na = sum(r["audit"].get(i, {}).get("audited", 0) for r in earlier)
                tests.append(("audit agreement", n, a1["agreement"], ka / na if na else float("nan"),
                              *_z_two_prop(round(a1["agreement"] * a1["audited"]), a1["audited"], round(ka), na)))
            c = last["calibration"].get(i)
            if c and c["var"] > 0:
                z = (c["observed"] - c["predicted"]) / math.sqrt(c["var"])
                tests.append(("calibration (observed vs predicted)", n, c["observed"] / c["n"],
                              c["predicted"] / c["n"], z, float(2 * stats.norm.sf(abs(z)))))
    m = max(len([t for t in tests if not math.isnan(t[5])]), 1)
    flagged = []
    table = []
    for kind, n, now, before, z, p in tests:
        padj = min(1.0, p * m) if not math.isnan(p) else float("nan")
        drift = (not math.isnan(padj)) and padj < alpha
        table.append([kind, n, now, before, z, padj, drift])
        if drift:
            flagged.append({"test": kind, "tier": n, "latest": now, "baseline": before, "z": z, "p_bonferroni": padj})
    doc.h2("Drift: the latest run against all earlier runs")
    doc.p(f"Two-proportion z-tests (share of rows answered, escalation rate, audit agreement) of "
          f"the latest run against all earlier runs pooled; for a calibrated policy also each "
          f"tier's share against the share the calibration predicted at the job's operating point "
          f"(two-proportion, the calibration rows as the second sample); for calibration, (observed correct - "
          f"sum of predicted probabilities) / sqrt(sum p(1-p)) on the latest run's referenced rows. "
          f"p-values Bonferroni-corrected across the {m} tests; drift flagged at p < {alpha}.")
    doc.table(["test", "tier", "latest", "baseline", "z", "p_bonferroni", "drift"], table,
              empty="needs at least two runs")
    summary = {"runs": [{"job": r["job"], "date": r["date"], "policy": r["policy"],
                         **{k: r["summary"][k] for k in
                                             ("rows", "cost_total", "cost_per_row", "quality", "errors")},
                         "shares": {t["name"]: t["share"] for t in r["summary"]["tiers"]}} for r in runs],
               "drift": flagged, "tests": len(tests)}
    return doc, summary


def _registry_section(doc: Doc, latest: Path):
    """Where the latest run's policy comes from a registry (cascade/registry.py): its decisions,
    night by night (challenger, what it was tested against, held-out rows, mean utility gain,
    confidence, promoted or kept and why), and the held-out gain per night as a plot."""
    meta = json.loads((latest / "job.json").read_text())
    reg = ((meta.get("spec") or {}).get("policy") or {}).get("registry")
    if not reg or not (Path(reg) / "current.json").exists():
        return
    state = json.loads((Path(reg) / "current.json").read_text())
    rows = []
    for e in state["log"]:
        if e.get("rollback"):
            rows.append(["rollback", None, e.get("champion_before"), None, None, None,
                         f"champion back to {e.get('champion_after') or 'the safe default'}"])
        else:
            rows.append([e.get("night"), e.get("version"), e.get("against"), e.get("holdout_rows"),
                         e.get("gain"), e.get("confidence_better"),
                         ("promoted: " if e.get("promote") else "kept: ") + str(e.get("reason"))])
    doc.h2(f"Policy registry: {reg}")
    doc.p(f"Champion now: {state['version'] or 'none (the safe default)'}. A challenger is promoted "
          f"only if it beats the champion on held-out pool rows (mean utility gain, one-sided "
          f"confidence); every version is kept with its evidence.")
    doc.table(["night", "challenger", "against", "holdout_rows", "gain", "confidence", "decision"], rows)
    nights = [r for r in rows if r[0] != "rollback" and r[4] is not None]
    if nights:
        doc.image("history_registry.png", lines_png(
            [r[0] for r in nights], {"held-out utility gain of the challenger": [r[4] for r in nights]},
            "Challenger against champion, by night", "night", "mean utility gain"),
            "Held-out gain of each night's challenger")


def _axis(runs: list[dict]) -> list[str]:
    """The runs' dates as plot labels, oldest first; a second run on one date gets #2."""
    seen: dict[str, int] = {}
    out = []
    for r in runs:
        day = r["date"] or "?"
        seen[day] = seen.get(day, 0) + 1
        out.append(day if seen[day] == 1 else f"{day} #{seen[day]}")
    return out


def drift_summary(summary: dict) -> str:
    """A few lines a cron mail or a CI step can show: what drifted in the latest run."""
    last = summary["runs"][-1]
    if not summary["drift"]:
        return (f"no drift: {last['date']} ({last['job']}) against {len(summary['runs']) - 1} "
                f"earlier run(s), {summary['tests']} tests")
    lines = [f"DRIFT in {last['date']} ({last['job']}): {len(summary['drift'])} of "
             f"{summary['tests']} tests flagged"]
    for f in summary["drift"]:
        lines.append(f"  {f['test']}, tier {f['tier']}: {fmt(f['latest'])} vs {fmt(f['baseline'])} "
                     f"before (z {fmt(f['z'])}, p {f['p_bonferroni']:.2g} Bonferroni)")
    return "\n".join(lines)


def replay_logs(job_dir: str):
    """The job's fully-run rows (every tier answered) in the replay format, as a polars DataFrame, with
    `quality` from the reports' label scorer (SCORER_MACROS) when references exist."""
    con = connect(job_dir)
    query = sql_text("replay_logs").rstrip().rstrip(";")
    if has_reference(con):
        con.execute(SCORER_MACROS)
        query = f"""
        WITH logs AS (
{query}
        ),
        refs AS (SELECT id, reference FROM read_parquet(getvariable('job') || '/results/*.parquet'))
        SELECT logs.*, label_match(logs.output, refs.reference)::DOUBLE AS quality
        FROM logs JOIN refs ON logs.row_id = refs.id ORDER BY row_id, tier"""
    frame = con.sql(query).pl()
    if frame.is_empty():
        raise ValueError(f"{job_dir}: no row ran on every tier; run a calibration job whose rule "
                         f"escalates every row (threshold: 0) or with audit_share 1")
    return frame


def export_logs(job_dir: str, out_path: str) -> dict:
    """Write replay_logs(job_dir) to Parquet: the input of `cascade calibrate`. A job whose rule
    escalates every row (threshold 0) or a large audit share produces such rows."""
    require_finished(job_dir)
    frame = replay_logs(job_dir)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(out_path)
    return {"rows": frame["row_id"].n_unique(), "tiers": frame["tier"].n_unique(),
            "quality": "quality" in frame.columns}
