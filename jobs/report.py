"""Reports over a job directory: the SQL in sql/*.sql, run by DuckDB over the job's Parquet.

Each .sql file reads the job directory from the DuckDB variable `job`, so the same file runs
here and from the plain duckdb CLI:  duckdb -cmd "SET VARIABLE job = 'runs/demo'" < sql/cost.sql
"""

from __future__ import annotations

import math
from pathlib import Path

import duckdb

SQL_DIR = Path(__file__).resolve().parent.parent / "sql"
QUERIES = ["selection", "funnel", "cost", "cost_per_tier", "quality", "errors", "latency", "calibration"]
NEEDS_REFERENCE = {"quality", "calibration"}


def sql_text(name: str) -> str:
    return (SQL_DIR / f"{name}.sql").read_text()


def connect(job_dir: str) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    from jobs.storage import Store

    store = Store(job_dir)
    if not store.local:                      # fsspec URL: let DuckDB read through the same fs
        con.register_filesystem(store.fs)
    con.execute("SET VARIABLE job = ?", [job_dir.rstrip("/")])
    return con


def has_reference(con) -> bool:
    cols = con.execute("SELECT name FROM parquet_schema(getvariable('job') || '/results/*.parquet')").fetchall()
    return any(c[0] == "reference" for c in cols)


def run_query(con, name: str) -> tuple[list[str], list[tuple]]:
    rel = con.execute(sql_text(name))
    return [d[0] for d in rel.description], rel.fetchall()


def run_all(job_dir: str) -> dict[str, tuple[list[str], list[tuple]]]:
    con = connect(job_dir)
    ref = has_reference(con)
    out = {}
    for name in QUERIES:
        if name in NEEDS_REFERENCE and not ref:
            out[name] = ([], [])
            continue
        out[name] = run_query(con, name)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
    return str(v)


def markdown_table(cols: list[str], rows: list[tuple]) -> str:
    if not cols:
        return "_(no data)_"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


TITLES = {
    "selection": "Selection: which tier's answer each row kept",
    "funnel": "Escalation funnel",
    "cost": "Cost against running every row on the last tier",
    "cost_per_tier": "Cost per tier",
    "quality": "Quality against the references",
    "errors": "Errors",
    "latency": "Throughput and latency per tier",
    "calibration": "Predicted against observed quality",
}


def text_report(job_dir: str, results: dict | None = None) -> str:
    results = results or run_all(job_dir)
    parts = [f"# Job report: {job_dir}"]
    for name in QUERIES:
        cols, rows = results[name]
        if name == "errors" and not rows:
            parts.append(f"\n## {TITLES[name]}\n\nnone")
            continue
        if name in NEEDS_REFERENCE and not cols:
            parts.append(f"\n## {TITLES[name]}\n\n_(no `reference` column in the input)_")
            continue
        if name == "calibration" and not rows:
            continue
        parts.append(f"\n## {TITLES[name]}\n\n" + markdown_table(cols, rows))
    return "\n".join(parts) + "\n"
