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
import pandas as pd

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


def read_logs(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise LogFormatError(f"{path}: no such file")
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises many types for unreadable files
        raise LogFormatError(f"{path}: not a readable Parquet file ({exc})") from exc
    if frame.empty:
        raise LogFormatError(f"{path}: has no rows")
    return frame


def load_ladder(path_or_frame, *, require_quality: bool = False, require_cost: bool = True,
                schema: dict | None = None) -> Ladder:
    """Pivot a replay-format log into a Ladder, checking that it is a complete ladder.

    `schema` (from a policy artifact) fixes which extra columns are read and how, so replay reads
    a file exactly the way calibration did.
    """
    if isinstance(path_or_frame, pd.DataFrame):
        frame, where = path_or_frame, "logs"
    else:
        frame, where = read_logs(path_or_frame), str(path_or_frame)
    needed = list(REQUIRED) + (["quality"] if require_quality else []) + (["cost"] if require_cost else [])
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise LogFormatError(f"{where}: missing column(s) {missing}; have {list(frame.columns)}")

    frame = frame.copy()
    frame["row_id"] = frame["row_id"].astype(str)
    try:
        tiers = frame["tier"].astype("int64")
    except (TypeError, ValueError) as exc:
        raise LogFormatError(f"{where}: column 'tier' must hold integers ({exc})") from exc
    frame["tier"] = tiers
    n = int(tiers.max()) + 1
    if tiers.min() < 0 or sorted(tiers.unique()) != list(range(n)):
        raise LogFormatError(f"{where}: column 'tier' must hold 0..n-1 with none missing; "
                             f"found {sorted(tiers.unique())}")
    dup = frame.duplicated(["row_id", "tier"])
    if dup.any():
        r = frame.loc[dup].iloc[0]
        raise LogFormatError(f"{where}: row_id {r.row_id!r} appears twice at tier {r.tier}")
    counts = frame.groupby("row_id", sort=False)["tier"].size()
    ragged = counts[counts != n]
    if len(ragged):
        rid = ragged.index[0]
        have = sorted(frame.loc[frame.row_id == rid, "tier"].tolist())
        raise LogFormatError(f"{where}: row_id {rid!r} is logged at tiers {have}, not at all "
                             f"{n} tiers ({len(ragged)} such row_ids)")
    for col in ("quality", "cost"):
        if col in frame.columns:
            vals = pd.to_numeric(frame[col], errors="coerce")
            bad = vals.isna() | ~np.isfinite(vals.to_numpy(dtype=float, na_value=np.nan))
            if bad.any():
                r = frame.loc[bad].iloc[0]
                raise LogFormatError(f"{where}: column {col!r} is not a finite number at "
                                     f"row_id {r.row_id!r}, tier {r.tier}")
            frame[col] = vals.astype(float)
    if "cost" in frame.columns and (frame["cost"] < 0).any():
        r = frame.loc[frame["cost"] < 0].iloc[0]
        raise LogFormatError(f"{where}: negative cost at row_id {r.row_id!r}, tier {r.tier}")

    frame = frame.sort_values(["tier", "row_id"], kind="stable")
    ids = frame.loc[frame.tier == 0, "row_id"].to_numpy()
    N = len(ids)

    def by_tier(col, dtype=object):
        return frame[col].to_numpy().reshape(n, N).astype(dtype)

    raw = by_tier("output")
    outputs = np.where(pd.isna(raw), "", raw).astype(object)
    first = frame[frame.tier == 0]
    prompts = first["prompt"].fillna("").astype(str).to_numpy()
    models = ([str(frame.loc[frame.tier == t, "model"].iloc[0]) for t in range(n)]
              if "model" in frame.columns else [f"tier{t}" for t in range(n)])

    if schema is None:
        schema = infer_schema(frame, n, N)
    prompt_text, prompt_num, output_num = {}, {}, {}
    for col in schema.get("prompt_text", []):
        prompt_text[col] = (first[col].fillna("").astype(str).to_numpy() if col in frame
                            else np.full(N, "", dtype=object))
    for col in schema.get("prompt_num", []):
        prompt_num[col] = (pd.to_numeric(first[col], errors="coerce").fillna(0.0).to_numpy(float)
                           if col in frame else np.zeros(N))
    for col in schema.get("output_num", []):
        output_num[col] = (pd.to_numeric(frame[col], errors="coerce").fillna(0.0)
                           .to_numpy(float).reshape(n, N) if col in frame else np.zeros((n, N)))
    return Ladder(
        row_ids=ids.astype(object), prompts=prompts, outputs=outputs,
        cost=by_tier("cost", float) if "cost" in frame.columns else None,
        quality=by_tier("quality", float) if "quality" in frame.columns else None,
        models=models, prompt_text=prompt_text, prompt_num=prompt_num, output_num=output_num,
    )


def infer_schema(frame: pd.DataFrame, n: int, N: int) -> dict:
    """Sort extra columns into prompt-level text, prompt-level numbers and output-level numbers."""
    schema = {"prompt_text": [], "prompt_num": [], "output_num": []}
    for col in frame.columns:
        if col in KNOWN or col.lower() in LABEL_LIKE:
            continue
        series = frame[col]
        numeric = pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)
        if pd.api.types.is_bool_dtype(series):
            series, numeric = series.astype(float), True
        values = series.to_numpy().reshape(n, N)
        same = pd.isna(values) | (values == values[:1])
        constant = bool(np.all(same & pd.isna(values[:1]) == pd.isna(values)) and np.all(same))
        if numeric:
            schema["prompt_num" if constant else "output_num"].append(col)
        elif constant and pd.api.types.infer_dtype(series, skipna=True) in ("string", "empty"):
            schema["prompt_text"].append(col)
    return schema
