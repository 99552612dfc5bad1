"""Reading and checking a job's input: one Parquet file, a directory or a glob.

Whole-input problems (an unreadable or empty file, a missing or mistyped column, duplicate ids)
stop the submit with an error naming the file, column or row. Row problems (a null or empty
prompt, a prompt longer than a tier's context) are not errors here: those rows travel with the
job and come out with status `error` and a reason.
"""

from __future__ import annotations

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cascade.errors import CascadeError

RESERVED = {"response", "final_tier", "final_tier_name", "tiers_run", "tiers", "status", "error",
            "cost", "seconds", "policy_version", "job_id", "trace", "next_tier", "kept_tier",
            "source_file", "audit", "_row", "_cost", "_seconds", "_response", "_status", "_error"}


class InputError(CascadeError):
    """The job's input cannot be used; the message names the file, column or row."""


def input_files(spec_input: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(spec_input)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    unstrip = (lambda p: p) if proto in ("file", "local") else (lambda p: f"{proto}://{p}")
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    elif fs.exists(path):
        files = [path]
    else:
        raise InputError(f"input {spec_input}: no such file or directory")
    if not files:
        raise InputError(f"input {spec_input}: matches no Parquet files")
    return [unstrip(p) for p in files]


def _is_messages(t: pa.DataType) -> bool:
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    v = t.value_type
    return (pa.types.is_struct(v) and {"role", "content"} <= {f.name for f in v}
            and all(pa.types.is_string(v.field(n).type) or pa.types.is_large_string(v.field(n).type)
                    for n in ("role", "content")))


def _stem(path: str) -> str:
    name = path.rsplit("/", 1)[-1]
    return name[:-8] if name.endswith(".parquet") else name


def read_file(path: str) -> pa.Table:
    try:
        with fsspec.open(path, "rb") as f:
            table = pq.read_table(f)
    except Exception as exc:   # pyarrow raises several types for a bad file
        raise InputError(f"{path}: cannot be read as Parquet ({type(exc).__name__}: {exc})") from None
    if table.num_rows == 0:
        raise InputError(f"{path}: has no rows")
    cols = table.column_names
    bad = sorted(RESERVED & set(cols))
    if bad:
        raise InputError(f"{path}: column(s) {bad} are names the output uses; rename them")
    if "prompt" in cols:
        t = table.schema.field("prompt").type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise InputError(f"{path}: column 'prompt' must hold strings, found {t}")
    if "messages" in cols and not _is_messages(table.schema.field("messages").type):
        raise InputError(f"{path}: column 'messages' must be a list of {{role, content}} strings, "
                         f"found {table.schema.field('messages').type}")
    if "prompt" not in cols and "messages" not in cols:
        raise InputError(f"{path}: needs a 'prompt' column (string) or a 'messages' column "
                         f"(list of {{role, content}}); has {cols}")
    if "id" in cols:
        ids = table.column("id")
        if ids.null_count:
            row = pc.index(pc.is_null(ids), True).as_py()
            raise InputError(f"{path}: column 'id' is null at row {row}")
        table = table.set_column(cols.index("id"), "id", pc.cast(ids, pa.string()))
    else:
        stem = _stem(path)
        table = table.append_column("id", pa.array([f"{stem}:{i}" for i in range(table.num_rows)],
                                                   pa.string()))
    if "reference" in table.column_names:
        i = table.column_names.index("reference")
        try:
            table = table.set_column(i, "reference", pc.cast(table.column("reference"), pa.string()))
        except pa.ArrowInvalid as exc:
            raise InputError(f"{path}: column 'reference' cannot be read as text ({exc})") from None
    if "prompt" not in table.column_names:
        table = table.append_column("prompt", pa.nulls(table.num_rows, pa.string()))
    elif pa.types.is_null(table.schema.field("prompt").type):
        table = table.set_column(table.column_names.index("prompt"), "prompt",
                                 pa.nulls(table.num_rows, pa.string()))
    return table.append_column("source_file", pa.array([path] * table.num_rows, pa.string()))


def read_inputs(spec_input: str) -> pa.Table:
    files = input_files(spec_input)
    tables = [read_file(p) for p in files]
    try:
        table = pa.concat_tables(tables, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise InputError(f"input {spec_input}: files have incompatible columns ({exc})") from None
    counts = pc.value_counts(table.column("id"))
    dup = [v["values"].as_py() for v in counts if v["counts"].as_py() > 1]
    if dup:
        where = pc.index(table.column("id"), dup[0]).as_py()
        src = table.column("source_file")[where].as_py()
        raise InputError(f"{src}: duplicate id {dup[0]!r} (first at row {where} of the input; "
                         f"{len(dup)} duplicated ids in all)")
    return table
