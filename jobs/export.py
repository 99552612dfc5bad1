"""`cascade export`: a finished job's results in another shape, written by DuckDB.

- `openai`: OpenAI Batch API output lines (sql/export_openai.sql), one per input row in input
  order, `custom_id` the row's id, so a caller of the Batch API can read it unchanged;
- `parquet`, `csv`, `jsonl`: the result table itself (in CSV the nested lineage and list columns
  are JSON text).
"""

from __future__ import annotations

from pathlib import Path

from jobs.storage import Store

FORMATS = ("openai", "parquet", "csv", "jsonl")
OPTIONAL = {"messages": "STRUCT(role VARCHAR, content VARCHAR)[]", "request_model": "VARCHAR"}


class ExportError(ValueError):
    """The job cannot be exported (not finished, unknown format); the message says why."""


def export(job_dir: str, out_path: str, fmt: str = "openai") -> int:
    """Write the job's results to `out_path` in `fmt`; returns the number of rows written."""
    from jobs import report    # DuckDB and scipy: `cascade --help` imports this module for FORMATS

    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    store = Store(job_dir)
    report.require_finished(job_dir, bare_results=False)
    finished = store.read_json("finished.json")
    meta = store.read_json("job.json")
    con = report.connect(job_dir)
    cols = report.result_columns(con)
    extra = "".join(f", NULL::{t} AS {c}" for c, t in OPTIONAL.items() if c not in cols)
    con.execute(f"""CREATE VIEW r AS SELECT * EXCLUDE (filename, file_row_number),
                    filename AS file_order, file_row_number AS row_order{extra}
                    FROM read_parquet(getvariable('job') || '/results/*.parquet',
                                      filename = true, file_row_number = true)""")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    out = str(Path(out_path).resolve())
    if fmt == "openai":
        con.execute("SET VARIABLE job_id = ?", [meta["job_id"]])
        con.execute("SET VARIABLE models = ?", [[t["model"] for t in meta["spec"]["tiers"]]])
        con.execute("SET VARIABLE created = ?", [int(finished["finished"])])
        query = report.sql_text("export_openai").rstrip().rstrip(";")
        con.execute(f"COPY ({query}) TO '{_quote(out)}' (FORMAT json)")
    else:
        table = "SELECT * EXCLUDE (file_order, row_order) FROM r ORDER BY file_order, row_order"
        if fmt == "csv":
            nested = [c for c, t, *_ in con.execute(f"DESCRIBE ({table})").fetchall()
                      if t.endswith("]") or t.startswith(("STRUCT", "MAP"))]
            if nested:
                table = (f"SELECT * REPLACE ({', '.join(f'to_json({c}) AS {c}' for c in nested)}) "
                         f"FROM ({table})")
        options = {"parquet": "FORMAT parquet, COMPRESSION zstd", "csv": "FORMAT csv, HEADER true",
                   "jsonl": "FORMAT json"}[fmt]
        con.execute(f"COPY ({table}) TO '{_quote(out)}' ({options})")
    return int(meta["rows"])


def _quote(path: str) -> str:
    return path.replace("'", "''")
