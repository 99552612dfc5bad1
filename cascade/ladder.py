"""Logged model ladders in the replay format, pivoted to one array per tier.

The replay format has one row per (row_id, tier): row_id, tier, model, prompt, output, cost,
optional quality, and any other columns. Extra columns are sorted into three kinds by what they
hold, so that a policy can use them without being told their names:

- prompt-level text (same value at every tier of a row, e.g. ``category``): hashed as metadata;
- prompt-level numbers (same value at every tier);
- output-level numbers (vary by tier, e.g. token log-probability statistics a live job logged).

Columns that could carry the answer key (``reference``, ``label``...) are never used as features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from cascade.errors import LogFormatError

REQUIRED = ("row_id", "tier", "prompt", "output")
KNOWN = {"row_id", "tier", "model", "prompt", "output", "quality", "cost"}
# Never features: they may hold the answer key, or are bookkeeping from an earlier replay.
LABEL_LIKE = {"reference", "references", "answer", "answers", "gold", "label", "labels", "target",
              "correct", "is_correct", "ground_truth", "score", "scores", "accuracy", "reward",
              "grade", "judge", "judge_score", "exact_match", "em", "f1", "split", "final_tier",
              "tiers_run", "point"}


@dataclass
class Ladder:
    """All tiers' logged outcomes for N rows. Arrays are indexed [tier, row]."""

    row_ids: np.ndarray                 # (N,) object (str)
    prompts: np.ndarray                 # (N,) object (str)
    outputs: np.ndarray                 # (n, N) object (str)
    cost: np.ndarray | None             # (n, N) float
    quality: np.ndarray | None          # (n, N) float
    models: list[str]
    prompt_text: dict[str, np.ndarray] = field(default_factory=dict)   # col -> (N,) str
    prompt_num: dict[str, np.ndarray] = field(default_factory=dict)    # col -> (N,) float
    output_num: dict[str, np.ndarray] = field(default_factory=dict)    # col -> (n, N) float

    @property
    def n_tiers(self) -> int:
        return self.outputs.shape[0]

    def __len__(self) -> int:
        return len(self.row_ids)

    def subset(self, idx: np.ndarray) -> "Ladder":
        """Rows `idx` (an index or boolean array), every tier kept."""
        return Ladder(
            row_ids=self.row_ids[idx], prompts=self.prompts[idx], outputs=self.outputs[:, idx],
            cost=None if self.cost is None else self.cost[:, idx],
            quality=None if self.quality is None else self.quality[:, idx], models=self.models,
            prompt_text={k: v[idx] for k, v in self.prompt_text.items()},
            prompt_num={k: v[idx] for k, v in self.prompt_num.items()},
            output_num={k: v[:, idx] for k, v in self.output_num.items()},
        )

    def without_labels(self) -> "Ladder":
        out = self.subset(np.arange(len(self)))
        out.quality = None
        return out


def read_logs(path: str | Path) -> pl.DataFrame:
    path = Path(path)
    if not path.exists():
        raise LogFormatError(f"{path}: no such file")
    try:
        frame = pl.read_parquet(path)
    except Exception as exc:  # polars/pyarrow raise many types for unreadable files
        raise LogFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    if frame.is_empty():
        raise LogFormatError(f"{path}: has no rows")
    return frame


def as_frame(data) -> pl.DataFrame:
    """A polars DataFrame from a polars frame, a pyarrow Table, or anything polars.DataFrame
    takes (a dict of columns, another library's frame through the Arrow interface)."""
    if isinstance(data, pl.DataFrame):
        return data
    if isinstance(data, pa.Table):
        return pl.from_arrow(data)
    return pl.DataFrame(data)


def _where(frame: pl.DataFrame, mask: pl.Expr) -> dict:
    """The first row matching `mask` (as a dict)."""
    return frame.filter(mask).row(0, named=True)


def load_ladder(path_or_frame, *, require_quality: bool = False, require_cost: bool = True,
                schema: dict | None = None) -> Ladder:
    """Pivot a replay-format log (a Parquet path or a frame, see `as_frame`) into a Ladder,
    checking that it is a complete ladder.

    `schema` (from a policy artifact) fixes which extra columns are read and how, so replay reads
    a file exactly the way calibration did.
    """
    if isinstance(path_or_frame, (str, Path)):
        frame, where = read_logs(path_or_frame), str(path_or_frame)
    else:
        frame, where = as_frame(path_or_frame), "logs"
    needed = list(REQUIRED) + (["quality"] if require_quality else []) + (["cost"] if require_cost else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise LogFormatError(f"{where}: missing column(s) {missing}; have {list(frame.columns)}")

    try:
        frame = frame.with_columns(pl.col("row_id").cast(pl.String), pl.col("tier").cast(pl.Int64))
    except pl.exceptions.PolarsError as exc:
        raise LogFormatError(f"{where}: column 'tier' must hold integers ({exc})") from exc
    tiers = sorted(frame["tier"].unique().to_list(), key=lambda t: (t is None, t))
    n = (tiers[-1] + 1) if tiers and tiers[-1] is not None else 0
    if tiers != list(range(n)) or n == 0:
        raise LogFormatError(f"{where}: column 'tier' must hold 0..n-1 with none missing; found {tiers}")
    dup = pl.struct("row_id", "tier").is_duplicated()
    if frame.select(dup.any()).item():
        r = _where(frame, dup)
        raise LogFormatError(f"{where}: row_id {r['row_id']!r} appears twice at tier {r['tier']}")
    counts = frame.group_by("row_id", maintain_order=True).len().filter(pl.col("len") != n)
    if len(counts):
        rid = counts["row_id"][0]
        have = sorted(frame.filter(pl.col("row_id") == rid)["tier"].to_list())
        raise LogFormatError(f"{where}: row_id {rid!r} is logged at tiers {have}, not at all "
                             f"{n} tiers ({len(counts)} such row_ids)")
    for col in ("quality", "cost"):
        if col in frame.columns:
            vals = frame[col].cast(pl.Float64, strict=False)
            bad = vals.is_null() | ~vals.is_finite()
            if bad.any():
                r = frame.filter(bad).row(0, named=True)
                raise LogFormatError(f"{where}: column {col!r} is not a finite number at "
                                     f"row_id {r['row_id']!r}, tier {r['tier']}")
            frame = frame.with_columns(vals.alias(col))
    if "cost" in frame.columns and (frame["cost"] < 0).any():
        r = _where(frame, pl.col("cost") < 0)
        raise LogFormatError(f"{where}: negative cost at row_id {r['row_id']!r}, tier {r['tier']}")

    frame = frame.sort(["tier", "row_id"], maintain_order=True)
    N = len(frame) // n
    first = frame.head(N)
    ids = first["row_id"].to_numpy().astype(object)

    def text(series: pl.Series) -> np.ndarray:
        return series.cast(pl.String, strict=False).fill_null("").to_numpy().astype(object)

    def number(series: pl.Series) -> np.ndarray:
        # missing stays NaN and -inf stays -inf (a log-probability of 0 would read as certainty);
        # the featurizer's standardiser places them (features.Standardizer)
        return series.cast(pl.Float64, strict=False).fill_null(float("nan")).to_numpy()

    outputs = text(frame["output"]).reshape(n, N)
    prompts = text(first["prompt"])
    models = (frame["model"].cast(pl.String).gather(np.arange(n) * N).to_list()
              if "model" in frame.columns else [f"tier{t}" for t in range(n)])

    if schema is None:
        schema = infer_schema(frame, n, N)
    prompt_text, prompt_num, output_num = {}, {}, {}
    for col in schema.get("prompt_text", []):
        prompt_text[col] = text(first[col]) if col in frame.columns else np.full(N, "", dtype=object)
    for col in schema.get("prompt_num", []):
        prompt_num[col] = number(first[col]) if col in frame.columns else np.zeros(N)
    for col in schema.get("output_num", []):
        output_num[col] = (number(frame[col]).reshape(n, N) if col in frame.columns
                           else np.zeros((n, N)))
    return Ladder(
        row_ids=ids, prompts=prompts, outputs=outputs,
        cost=frame["cost"].to_numpy().reshape(n, N).copy() if "cost" in frame.columns else None,
        quality=frame["quality"].to_numpy().reshape(n, N).copy() if "quality" in frame.columns else None,
        models=[str(m) for m in models], prompt_text=prompt_text, prompt_num=prompt_num,
        output_num=output_num,
    )


def infer_schema(frame: pl.DataFrame, n: int, N: int) -> dict:
    """Sort extra columns into prompt-level text, prompt-level numbers and output-level numbers.

    A column is prompt-level when it holds one value (nulls included) across a row's tiers."""
    schema = {"prompt_text": [], "prompt_num": [], "output_num": []}
    cols = [c for c, t in frame.schema.items()
            if c not in KNOWN and c.lower() not in LABEL_LIKE
            and (t.is_numeric() or t in (pl.Boolean, pl.String, pl.Null))
            and frame[c].null_count() < len(frame)]          # an all-null column says nothing
    if not cols:
        return schema
    distinct = (frame.group_by("row_id")
                .agg(pl.col(c).cast(pl.Float64) if frame.schema[c] == pl.Boolean else pl.col(c)
                     for c in cols)
                .select(pl.col(c).list.n_unique().max() for c in cols).row(0))
    for col, most in zip(cols, distinct):
        dtype, constant = frame.schema[col], (most or 0) <= 1
        if dtype.is_numeric() or dtype == pl.Boolean:
            schema["prompt_num" if constant else "output_num"].append(col)
        elif constant:
            schema["prompt_text"].append(col)
    return schema
