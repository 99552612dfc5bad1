"""The names a job directory and its tables use: file paths, internal columns, and the struct
of one tier's run of a row. Everything above (units, work files, finalize, recovery) reads its
names from here, so the layout is defined once.

Job directory (local path or fsspec URL); its files are the durable truth of the job:
    job.json                    the validated spec, job id, broker, policy version, layout
    submitted.json              written once every shard is written and the state loaded: until
                                then the directory is a submit in progress, never rebuilt from
    routed/s00000.arrow         input shards, each row with its input position and the tier it
                                starts on (metadata: rows per starting tier)
    work/t1/UNIT.arrow          input of a coalesced unit on tier 1 (metadata: its sources)
    tiers/0/UNIT.arrow          the committed result of a unit: its rows with their run on that
                                tier as column _t0 (metadata: rows escalated per tier, the span
                                of its input positions)
    results/part-00000.parquet  final rows, exactly one per input row, in input order
    finished.json               written after results/: the job is done (with its final status)
    cancelled                   present while the job is cancelled
    finalize_error.json         the last finalize failure, if any
"""

from __future__ import annotations

import re
import uuid

import numpy as np
import pyarrow as pa

# The layout of a job directory's unit files. A directory of another layout (written by another
# version of cascade) is refused with a clear error rather than misread.
LAYOUT = 4

# One tier's run of a row: kept in a unit's result as the column _t<tier>; finalize gathers a
# row's runs from every tier into the output's `tiers` list.
TIER_STRUCT = pa.struct([
    ("tier", pa.int32()), ("name", pa.string()), ("status", pa.string()), ("error", pa.string()),
    ("response", pa.string()), ("finish_reason", pa.string()), ("prompt_tokens", pa.int32()),
    ("output_tokens", pa.int32()), ("first_logprob", pa.float64()), ("mean_logprob", pa.float64()),
    ("min_logprob", pa.float64()), ("p_quality", pa.float64()), ("decision", pa.string()),
    ("audit", pa.bool_()), ("seconds", pa.float64()), ("cost", pa.float64()),
    ("choice_prob", pa.float64()), ("choice_margin", pa.float64()),
    # taken from the answer store (jobs/answers.py), not computed: the run's cost and seconds are
    # what it cost when it was computed; this job paid neither
    ("reused", pa.bool_()),
])
FEATURES = ("first_logprob", "mean_logprob", "min_logprob", "sum_logprob")
CHOICE_FEATURES = ("choice_prob", "choice_margin")      # null on rows answered without choices
# Columns a row carries between tiers besides its input columns, its position (_row) and (for a
# policy that needs them) its earlier runs: where it goes next and whose answer it keeps. What
# follows from its runs (its cost, seconds, final answer and status) finalize derives from them.
INTERNAL = ("next_tier", "kept_tier")
# A row's prompt embedding (fixed-size list of float32), for a policy that reads one: computed
# once, where the row's starting tier is decided, and carried with the row to every tier it
# runs; never in the results.
EMBEDDING = "_embedding"
# A row's run on tier k is carried between tiers as the column _t<k>.
LINEAGE_NAME = re.compile(r"_t[0-9]+")


def tier_column(tier: int) -> str:
    """The column holding a row's run on `tier`."""
    return f"_t{tier}"


def lineage(row: dict, tiers: int) -> list[dict]:
    """A row's runs in tier order, from a row of a unit's table as a dict."""
    return [r for k in range(tiers) if (r := row.get(tier_column(k))) is not None]


def source_file(src: str) -> str:
    """Where a source of escalated rows lives: a routed shard or a unit's result."""
    if src.startswith("s"):
        return f"routed/{src}.arrow"
    return f"tiers/{src[1:src.index('-')]}/{src}.arrow"


def result_file(uid: str, tier: int) -> str:
    return f"tiers/{tier}/{uid}.arrow"


def result_tier(rel: str) -> int:
    """The tier of a result file (result_file's path)."""
    return int(rel.split("/")[1])


def unit_tier(uid: str) -> int:
    """The tier of a unit, from its id (t<tier>-...)."""
    return int(uid[1:uid.index("-")])


def targets_counted(codes: np.ndarray) -> dict[int, int]:
    """Rows per next tier, from integer next-tier codes (negative: the row stops)."""
    counts = np.bincount(codes[codes >= 0])
    return {int(k): int(counts[k]) for k in np.flatnonzero(counts)}


def new_epoch() -> str:
    """A fresh tag for the ids of units cut after a (re)load of the state, so ids never collide
    with units cut before it."""
    return uuid.uuid4().hex[:6]
