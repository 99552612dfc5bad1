"""Reading and checking a job's input: one Parquet or OpenAI Batch JSONL file, a directory or a
glob of them, a batch at a time.

An OpenAI Batch request file (`.jsonl`, one request per line: custom_id, method, url, body) is read
as rows of `id` (the custom_id), `prompt` (body.prompt, /v1/completions) or `messages`
(body.messages, /v1/chat/completions), per-row `max_tokens` and `temperature` (which may lower,
never raise, the tier's), and `request_model` (body.model, kept for the caller: the ladder
decides which model answers). A malformed line stops the submit naming the file and line.

Whole-input problems (an unreadable or empty file, a missing or mistyped column, duplicate ids)
stop the submit with an error naming the file, column or row, and leave nothing written. Row problems (a null or empty
prompt, a prompt longer than a tier's context) are not errors here: those rows travel with the
job and come out with status `error` and a reason.
"""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cascade.errors import CascadeError
from jobs.layout import LINEAGE_NAME

RESERVED = {"response", "final_tier", "final_tier_name", "tiers_run", "tiers", "status", "error",
            "cost", "seconds", "policy_version", "job_id", "trace", "next_tier", "kept_tier",
            "source_file", "audit", "_row", "_cost", "_seconds", "_response", "_status", "_error",
            "saved_cost", "_saved"}


class InputError(CascadeError):
    """The job's input cannot be used; the message names the file, column or row."""


MESSAGES_TYPE = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
# The rows an OpenAI Batch request file becomes.
JSONL_SCHEMA = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("messages", MESSAGES_TYPE),
                          ("max_tokens", pa.int64()), ("temperature", pa.float64()),
                          ("request_model", pa.string())])
URLS = {"/v1/chat/completions": "messages", "/v1/completions": "prompt"}
SUFFIXES = (".parquet", ".jsonl")


def is_jsonl(path: str) -> bool:
    return path.endswith(".jsonl")


def _content(value, where: str) -> str:
    """A message's content: a string, or a list of text parts joined."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        parts = []
        for part in value:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise InputError(f"{where}: only text content parts are supported, found {part!r:.80}")
            parts.append(part["text"])
        return "".join(parts)
    if value is None:
        return ""
    raise InputError(f"{where}: message content must be a string or a list of text parts")


def openai_request(line: str, where: str) -> dict:
    """One OpenAI Batch request line as a row of JSONL_SCHEMA; InputError names `where`."""
    try:
        req = json.loads(line)
    except ValueError as exc:
        raise InputError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(req, dict):
        raise InputError(f"{where}: a request must be a JSON object")
    cid = req.get("custom_id")
    if not isinstance(cid, str) or not cid:
        raise InputError(f"{where}: 'custom_id' must be a non-empty string")
    if req.get("method", "POST") != "POST":
        raise InputError(f"{where}: 'method' must be POST, found {req.get('method')!r}")
    url = req.get("url")
    if url not in URLS:
        raise InputError(f"{where}: 'url' must be one of {sorted(URLS)}, found {url!r}")
    body = req.get("body")
    if not isinstance(body, dict):
        raise InputError(f"{where}: 'body' must be a JSON object")
    row = {"id": cid, "prompt": None, "messages": None, "max_tokens": None, "temperature": None,
           "request_model": body.get("model") if isinstance(body.get("model"), str) else None}
    if URLS[url] == "messages":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: body.messages must be a non-empty list for {url}")
        out = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise InputError(f"{where}: each of body.messages needs a string 'role'")
            out.append({"role": m["role"], "content": _content(m.get("content"), where)})
        row["messages"] = out
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise InputError(f"{where}: body.prompt must be a string (one prompt per request) for {url}")
        row["prompt"] = prompt
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    if cap is not None:
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise InputError(f"{where}: body.max_tokens must be a positive integer, found {cap!r}")
        row["max_tokens"] = cap
    temp = body.get("temperature")
    if temp is not None:
        if isinstance(temp, bool) or not isinstance(temp, (int, float)) or not 0 <= temp:
            raise InputError(f"{where}: body.temperature must be a number >= 0, found {temp!r}")
        row["temperature"] = float(temp)
    return row


def jsonl_tables(path: str, size: int):
    """(line numbers, table) of at most `size` requests at a time from an OpenAI Batch request
    file, in order; blank lines are skipped; the first malformed line raises InputError."""
    rows, lines = [], []
    with fsspec.open(path, "rb") as f:
        for no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{path}: line {no}: text is not valid UTF-8") from None
            if not line.strip():
                continue
            rows.append(openai_request(line, f"{path}: line {no}"))
            lines.append(no)
            if len(rows) == size:
                yield lines, pa.Table.from_pylist(rows, schema=JSONL_SCHEMA)
                rows, lines = [], []
    if rows:
        yield lines, pa.Table.from_pylist(rows, schema=JSONL_SCHEMA)


def _scan_jsonl(path: str) -> pa.Array:
    """Every line of a request file checked once; returns its ids. A repeated custom_id is named
    with both line numbers."""
    seen = {}
    for lines, table in jsonl_tables(path, 65536):
        for no, cid in zip(lines, table.column("id").to_pylist()):
            if cid in seen:
                raise InputError(f"{path}: line {no}: duplicate custom_id {cid!r} (first on line "
                                 f"{seen[cid]})")
            seen[cid] = no
    return pa.array(list(seen), pa.string())


def input_files(spec_input: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(spec_input)
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    unstrip = (lambda p: p) if proto in ("file", "local") else (lambda p: f"{proto}://{p}")
    if any(ch in path for ch in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(SUFFIXES))
    elif fs.exists(path):
        files = [path]
    else:
        raise InputError(f"input {spec_input}: no such file or directory")
    if not files:
        raise InputError(f"input {spec_input}: matches no Parquet or JSONL files")
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
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return name


def _check_schema(path: str, schema: pa.Schema, rows: int) -> pa.Schema:
    """Whole-file checks from the footer alone; returns the schema the file's rows take in the
    job (id and reference as strings, a prompt column). A row's `source_file` is not a column
    until finalize: it follows from the row's input position (InputReader.files, .counts)."""
    if rows == 0:
        raise InputError(f"{path}: has no rows")
    cols = schema.names
    bad = sorted((RESERVED & set(cols)) | {c for c in cols if LINEAGE_NAME.fullmatch(c)})
    if bad:
        raise InputError(f"{path}: column(s) {bad} are names the output uses; rename them")
    if "prompt" in cols:
        t = schema.field("prompt").type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t)):
            raise InputError(f"{path}: column 'prompt' must hold strings, found {t}")
    if "messages" in cols and not _is_messages(schema.field("messages").type):
        raise InputError(f"{path}: column 'messages' must be a list of {{role, content}} strings, "
                         f"found {schema.field('messages').type}")
    if "prompt" not in cols and "messages" not in cols:
        raise InputError(f"{path}: needs a 'prompt' column (string) or a 'messages' column "
                         f"(list of {{role, content}}); has {cols}")
    if "id" in cols:
        t = schema.field("id").type
        if not (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t)):
            raise InputError(f"{path}: column 'id' must hold strings or integers, found {t}")
    if "choices" in cols:
        t = schema.field("choices").type
        if not ((pa.types.is_list(t) or pa.types.is_large_list(t))
                and (pa.types.is_string(t.value_type) or pa.types.is_large_string(t.value_type))):
            raise InputError(f"{path}: column 'choices' (the row's valid answers) must be a list of "
                             f"strings, found {t}")
    for name, ok, kind in (("max_tokens", pa.types.is_integer, "integers"),
                           ("temperature", lambda t: pa.types.is_integer(t) or pa.types.is_floating(t),
                            "numbers")):
        if name in cols and not (ok(schema.field(name).type) or pa.types.is_null(schema.field(name).type)):
            raise InputError(f"{path}: column {name!r} (a per-row cap on the tier's sampling) must "
                             f"hold {kind}, found {schema.field(name).type}")
    fields = [f for f in schema if f.name not in ("id", "reference", "prompt")]
    fields += [pa.field("id", pa.string()), pa.field("prompt", pa.string())]
    if "reference" in cols:
        fields.append(pa.field("reference", pa.string()))
    return pa.schema(fields)


def _rows(path: str, batch: pa.Table, first_row: int) -> pa.Table:
    """One batch of a file's rows in the job's shape; row numbers in errors count from the
    file's first row."""
    cols = batch.column_names
    n = batch.num_rows
    if "id" in cols:
        batch = batch.set_column(cols.index("id"), "id", pc.cast(batch.column("id"), pa.string()))
    else:
        batch = batch.append_column("id", _made_ids(path, first_row, n))
    if "reference" in batch.column_names:
        i = batch.column_names.index("reference")
        try:
            batch = batch.set_column(i, "reference", pc.cast(batch.column("reference"), pa.string()))
        except pa.ArrowInvalid as exc:
            raise InputError(f"{path}: column 'reference' cannot be read as text ({exc})") from None
    if "prompt" not in batch.column_names:
        batch = batch.append_column("prompt", pa.nulls(n, pa.string()))
    elif pa.types.is_null(batch.schema.field("prompt").type):
        batch = batch.set_column(batch.column_names.index("prompt"), "prompt", pa.nulls(n, pa.string()))
    return batch


def _has_text(t: pa.DataType) -> bool:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return _has_text(t.value_type)
    return pa.types.is_struct(t) and any(_has_text(f.type) for f in t)


def _check_text(path: str, batch: pa.RecordBatch, first: int):
    for name, col in zip(batch.schema.names, batch.columns):
        if not _has_text(col.type):
            continue
        try:
            col.validate(full=True)
        except pa.ArrowInvalid:
            row = next(i for i in range(len(col)) if not _valid(col.take([i])))
            raise InputError(f"{path}: column {name!r} row {first + row}: text is not valid "
                             f"UTF-8") from None


def _valid(arr: pa.Array) -> bool:
    try:
        arr.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def _made_ids(path: str, first: int, n: int) -> pa.Array:
    """`<file stem>:<row number>`, the id of a row in a file without an id column."""
    rows = pc.cast(pa.array(np.arange(first, first + n)), pa.string())
    return pc.binary_join_element_wise(_stem(path), rows, ":")


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """A batch in the job's unified schema: missing columns as nulls, types promoted."""
    cols = []
    for f in schema:
        col = table.column(f.name) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        cols.append(col if col.type == f.type else col.cast(f.type))
    return pa.table(cols, schema=schema)


def parquet_batches(path: str, size: int, columns: list[str] | None = None):
    """A Parquet file's record batches; a file whose pages cannot be decoded (its footer and
    magic intact, a page corrupt) is an InputError naming the file and the rows it reached."""
    first = 0
    with fsspec.open(path, "rb") as f:
        batches = pq.ParquetFile(f).iter_batches(batch_size=size, columns=columns)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (OSError, pa.ArrowException) as exc:
                raise InputError(f"{path}: cannot be read as Parquet: the data after row {first} "
                                 f"is corrupt ({type(exc).__name__}: {exc})") from None
            yield batch
            first += batch.num_rows


class InputReader:
    """A job's input read a batch at a time, so that submitting a large input does not hold it
    in memory. Every file's footer, text and ids are checked before the first row is read: bad
    files, columns, types, incompatible files, null and duplicate ids fail at once."""

    def __init__(self, spec_input: str):
        self.spec_input = spec_input
        self.files = input_files(spec_input)
        self.counts, self.file_schemas, schemas = [], [], []
        self.jsonl_ids = {}                 # request file -> its custom_ids, checked line by line
        for path in self.files:
            if is_jsonl(path):
                self.jsonl_ids[path] = _scan_jsonl(path)
                rows, schema = len(self.jsonl_ids[path]), JSONL_SCHEMA
            else:
                try:
                    with fsspec.open(path, "rb") as f:
                        meta = pq.ParquetFile(f).metadata
                        schema = meta.schema.to_arrow_schema()
                except Exception as exc:   # pyarrow raises several types for a bad file
                    raise InputError(f"{path}: cannot be read as Parquet ({type(exc).__name__}: {exc})") from None
                rows = meta.num_rows
            self.counts.append(rows)
            self.file_schemas.append(schema)
            schemas.append(_check_schema(path, schema, rows))
        try:
            self.schema = pa.unify_schemas(schemas, promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise InputError(f"input {spec_input}: files have incompatible columns ({exc})") from None
        self.rows = sum(self.counts)
        self.check_rows()

    def batches(self, size: int):
        """Tables of at most `size` rows, in input order."""
        for path in self.files:
            if is_jsonl(path):
                for _, table in jsonl_tables(path, size):
                    yield _conform(_rows(path, table, 0), self.schema)
                continue
            first = 0
            for batch in parquet_batches(path, size):
                yield _conform(_rows(path, pa.Table.from_batches([batch]), first), self.schema)
                first += batch.num_rows

    def check_rows(self):
        """One pass over the text and id columns of every file: raise on text that is not valid
        UTF-8 (Parquet does not check; a bad byte would otherwise fail a whole unit later), on a
        null id, or on a duplicate id, naming the file, column and row."""
        ids = []
        for path, rows, schema in zip(self.files, self.counts, self.file_schemas):
            if path in self.jsonl_ids:
                ids.append(self.jsonl_ids[path])
                continue
            columns = [f.name for f in schema if _has_text(f.type) or f.name == "id"]
            first = 0
            if columns:
                for batch in parquet_batches(path, 65536, columns):
                    _check_text(path, batch, first)
                    if "id" in columns:
                        col = batch.column("id")
                        if col.null_count:
                            row = first + pc.index(pc.is_null(col), True).as_py()
                            raise InputError(f"{path}: column 'id' is null at row {row}")
                        ids.append(pc.cast(col, pa.string()))
                    first += batch.num_rows
            if "id" not in columns:
                ids.append(_made_ids(path, 0, rows))
        ids = pa.chunked_array(ids, pa.string())
        if len(pc.unique(ids)) == len(ids):
            return
        counts = pc.value_counts(ids)
        dup = pc.filter(counts.field("values"), pc.greater(counts.field("counts"), 1))
        where = pc.index(ids, dup[0]).as_py()
        ends = np.cumsum(self.counts)
        src = self.files[int(np.searchsorted(ends, where, side="right"))]
        raise InputError(f"{src}: duplicate id {dup[0].as_py()!r} (first at row {where} of the input; "
                         f"{len(dup)} duplicated ids in all)")

    def shards(self, size: int):
        """The input in tables of exactly `size` rows (the last one fewer), in input order (read
        in batches of at least 65,536 rows: a Parquet batch has a fixed cost)."""
        buf, n = [], 0
        for table in self.batches(max(size, 65536)):
            buf.append(table)
            n += table.num_rows
            while n >= size:
                whole = pa.concat_tables(buf)
                yield whole.slice(0, size)
                rest = whole.slice(size)
                buf, n = [rest], rest.num_rows
        if n:
            yield pa.concat_tables(buf)
