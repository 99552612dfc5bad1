"""An answer store shared by runs (a spec's `answers:`): a tier's answer to a row is looked up by
content, and a row answered before is not computed again. Nightly corpora are mostly the rows of
the night before, so a second night pays only for its new rows.

Key. A row's answer on a tier is keyed by a hash of what determines it: the tier's fingerprint
(engine, the versions of the packages its answers depend on, the model's identity: a packaged
model's version or a local model's files with their sizes and times, dtype, context, engine
arguments, the tier's sampling, and the tier's name for an engine whose answers depend on it)
and the row's own part (its prompt, or its chat messages as written, its `max_tokens` and
`temperature` caps, and the choices it is scored on). Only deterministic answers are reused: a
row sampled at temperature > 0 would get a different answer next time, so reusing it changes
what the job means; `reuse_sampled: true` opts in anyway.

What is stored is the engine's whole answer (text, finish reason, prompt tokens, every token's
log-probability, choice probability and margin) and the seconds it took, so a reused row goes
through the policy exactly as if computed: same features, same decisions, same final answer.

Layout: PATH/<tier fingerprint>/seg-<time>-<random>.arrow, one Arrow IPC segment per unit that
computed answers, each written once under a name no other writer uses (append-only: any number
of workers and jobs add to it at once without a lock). A process keeps an index of key -> answer
per tier; each lookup lists the tier's segments and reads only those it has not read (a worker
that serves night after night sees each night's answers), and reads them all again when one it
read is gone (a compaction replaced it). `cascade compact PATH` merges each tier's segments into one,
dropping duplicates and, with `keep_days`, answers older than that; answers older than
`keep_days` are never reused even before a compaction.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.spec import AnswersSpec, TierSpec
from jobs.storage import Store
from workers.engines.base import Generation, Generations, engine_class, engine_version
from workers.engines.models import identity

log = logging.getLogger(__name__)

SCHEMA = pa.schema([
    ("key", pa.string()), ("text", pa.string()), ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()), ("logprobs", pa.list_(pa.float64())),
    ("choice_prob", pa.float64()), ("choice_margin", pa.float64()), ("seconds", pa.float64()),
    ("created", pa.float64()), ("job_id", pa.string()),
])


def _oldest(keep_days: float | None) -> float:
    """The creation time before which answers are past retention (-inf: kept forever)."""
    return time.time() - keep_days * 86400 if keep_days else -np.inf


def _segment_name(fingerprint: str) -> str:
    """A new segment's path: a name no other writer uses."""
    return f"{fingerprint}/seg-{time.time_ns()}-{uuid.uuid4().hex[:8]}.arrow"


def tier_fingerprint(tier: TierSpec) -> str:
    """What, besides the row, determines a tier's answer (see the module docstring)."""
    doc = {"engine": tier.engine, "versions": engine_version(tier.engine),
           "model": identity(tier.model), "dtype": tier.dtype, "context": tier.context,
           "engine_args": tier.engine_args, "sampling": asdict(tier.sampling)}
    if engine_class(tier.engine).per_tier:
        doc["tier"] = tier.name
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:24]


def row_keys(fingerprint: str, table: pa.Table, choices: list | None) -> list[str]:
    """Each row's key on a tier of that fingerprint."""
    n = table.num_rows
    none = [None] * n
    cols = {c: table.column(c).to_pylist() if c in table.column_names else none
            for c in ("prompt", "messages", "max_tokens", "temperature")}
    choices = choices or none
    out = []
    for i in range(n):
        text = cols["prompt"][i]
        part = json.dumps([text if text is not None else cols["messages"][i], cols["max_tokens"][i],
                           cols["temperature"][i], choices[i]], ensure_ascii=False, default=str)
        out.append(hashlib.sha256(f"{fingerprint}\0{part}".encode()).hexdigest()[:32])
    return out


def deterministic(table: pa.Table, tier: TierSpec, reuse_sampled: bool) -> np.ndarray:
    """Rows whose answer on `tier` may be reused: sampled at temperature 0 (the tier's, lowered
    by the row's own `temperature`), or any row with `reuse_sampled`."""
    n = table.num_rows
    if reuse_sampled or tier.sampling.temperature == 0:
        return np.ones(n, dtype=bool)
    if "temperature" not in table.column_names:
        return np.zeros(n, dtype=bool)
    temps = table.column("temperature").to_pylist()
    return np.array([t is not None and t == 0 for t in temps], dtype=bool)


class _Index:
    """One tier's stored answers, as read by this process: key -> (segment, row)."""

    def __init__(self, store: Store, fingerprint: str, keep_days: float | None):
        self.store, self.fingerprint, self.keep_days = store, fingerprint, keep_days
        self.where: dict[str, tuple[int, int]] = {}
        self.tables: list[pa.Table] = []
        self.read: set[str] = set()

    def refresh(self):
        """Read the segments written since the last refresh; all of them again if one read
        before is gone (a compaction replaced it)."""
        for _ in range(3):
            listed = set(self.store.glob(f"{self.fingerprint}/*.arrow"))
            if not self.read <= listed:
                self.where, self.tables, self.read = {}, [], set()
            try:
                for rel in sorted(listed - self.read):
                    self._add(self.store.read_arrow(rel))
                    self.read.add(rel)
                return
            except FileNotFoundError as exc:     # removed by a compaction since the listing
                log.info("answer store %s changed while read (%s); reading it again",
                         self.store.root, exc)

    def _add(self, t: pa.Table):
        oldest = _oldest(self.keep_days)
        k = len(self.tables)
        self.tables.append(t)
        created = t.column("created").to_numpy()
        for row, key in enumerate(t.column("key").to_pylist()):
            if created[row] >= oldest and key not in self.where:
                self.where[key] = (k, row)


_INDEXES: dict[tuple, _Index] = {}
_LOCK = threading.Lock()


class AnswerStore:
    def __init__(self, spec: AnswersSpec):
        self.spec = spec
        self.store = Store(spec.path)

    def _index(self, fingerprint: str) -> _Index:
        key = (self.spec.path, fingerprint, self.spec.keep_days)
        with _LOCK:
            if key not in _INDEXES:
                _INDEXES[key] = _Index(self.store, fingerprint, self.spec.keep_days)
            index = _INDEXES[key]
            index.refresh()
            return index

    def lookup(self, fingerprint: str, keys: list[str]) -> tuple[list[int], Generations, np.ndarray]:
        """(positions in `keys` found, their answers, their seconds when computed)."""
        index = self._index(fingerprint)
        found = [(i, index.where[k]) for i, k in enumerate(keys) if k in index.where]
        by_segment: dict[int, list[tuple[int, int]]] = {}
        for i, (seg, row) in found:
            by_segment.setdefault(seg, []).append((i, row))
        oldest = _oldest(self.spec.keep_days)       # aged past the window since it was read
        answers: dict[int, tuple[Generation, float]] = {}
        for seg, hits in by_segment.items():         # one take per segment, not a read per field
            rows = index.tables[seg].take(pa.array([row for _, row in hits])).to_pylist()
            for (i, _), r in zip(hits, rows):
                if r["created"] >= oldest:
                    answers[i] = (Generation(r["text"], r["logprobs"], r["finish_reason"],
                                             r["prompt_tokens"], r["choice_prob"], r["choice_margin"]),
                                  r["seconds"])
        hit = sorted(answers)
        return (hit, Generations.of([answers[i][0] for i in hit]),
                np.asarray([answers[i][1] for i in hit], dtype=np.float64))

    def add(self, fingerprint: str, keys: list[str], gens: Generations, seconds: np.ndarray,
            job_id: str):
        """Append answers as one new segment (write-once, a name of its own)."""
        if not keys:
            return
        n = len(keys)
        logprobs = pa.ListArray.from_arrays(pa.array(gens.offsets.astype(np.int32)),
                                            pa.array(gens.logprobs, pa.float64()))
        nulls = pa.nulls(n, pa.float64())
        table = pa.table([
            pa.array(keys, pa.string()), pa.array(gens.text, pa.string()),
            pa.array(gens.finish_reason, pa.string()), pa.array(gens.prompt_tokens, pa.int64()),
            logprobs,
            nulls if gens.choice_prob is None else pa.array(gens.choice_prob, mask=np.isnan(gens.choice_prob)),
            nulls if gens.choice_margin is None else pa.array(gens.choice_margin, mask=np.isnan(gens.choice_margin)),
            pa.array(np.broadcast_to(seconds, n).astype(np.float64)), pa.array(np.full(n, time.time())),
            pa.array([job_id] * n, pa.string())], schema=SCHEMA)
        self.store.makedirs(fingerprint)
        self.store.write_arrow(_segment_name(fingerprint), table, {"answers": n}, once=True)


def compact(path: str, keep_days: float | None = None, dry_run: bool = False) -> dict:
    """Merge each tier's segments into one, keeping the oldest answer per key and dropping
    answers older than `keep_days`; segments written while it runs are left as they are.
    Returns {"tiers", "segments_before", "answers_before", "answers_after"}."""
    store = Store(path)
    oldest = _oldest(keep_days)
    out = {"tiers": 0, "segments_before": 0, "answers_before": 0, "answers_after": 0}
    for fp in sorted({rel.split("/")[0] for rel in store.glob("*/*.arrow")}):
        segments = sorted(store.glob(f"{fp}/*.arrow"))
        table = pa.concat_tables([store.read_arrow(rel) for rel in segments])
        keep = table.filter(pc.greater_equal(table.column("created"), oldest))
        keep = keep.take(pa.array(np.argsort(keep.column("created").to_numpy(), kind="stable")))
        _, first = np.unique(np.asarray(keep.column("key").to_pylist(), dtype=object), return_index=True)
        keep = keep.take(pa.array(np.sort(first)))
        out["tiers"] += 1
        out["segments_before"] += len(segments)
        out["answers_before"] += table.num_rows
        out["answers_after"] += keep.num_rows
        if dry_run or (len(segments) == 1 and keep.num_rows == table.num_rows):
            continue
        if keep.num_rows:
            store.write_arrow(_segment_name(fp), keep,
                              {"answers": keep.num_rows, "compacted": len(segments)}, once=True)
        for rel in segments:
            store.remove(rel)
    return out
