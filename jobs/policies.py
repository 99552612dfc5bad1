"""The policy as the job system sees it: where a row starts, and after each tier whether it stops
(and which tier's answer it keeps) or which tier it runs next.

Two kinds: a calibrated artifact from `cascade calibrate` (the optimal-stopping policy, which may
start a row past tier 0, skip tiers, and keep an earlier tier's answer), or a plain rule on a
confidence feature of the current tier's tokens.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from jobs.layout import EMBEDDING, lineage
from jobs.spec import JobSpec

# decide(tier, rows, current) -> (next_tier, kept, p_quality), one entry per row:
#   rows     the rows that answered on `tier` (a pyarrow Table with their lineage so far: one
#            column per tier, jobs.layout.tier_column),
#   current  this tier's answer column-wise: each feature, `response` and `cost`;
#   next_tier  int array, -1 where the row stops; kept: the tier whose answer is final if it
#   stops; p_quality: the predictor's estimate of this tier's quality, or None.


class RulePolicy:
    needs_lineage = False       # judges the current tier's answer alone

    def __init__(self, spec: JobSpec):
        self.n = len(spec.tiers)
        self.feature = spec.policy.feature
        self.thresholds = spec.policy.thresholds

    def start(self, shard) -> tuple[np.ndarray, dict]:
        """Starting tier of each row of a shard (a pyarrow Table): always tier 0; and the
        columns the rows carry to every tier (none)."""
        return np.zeros(shard.num_rows, np.int32), {}

    def decide(self, tier: int, rows, current: dict):
        n = rows.num_rows
        if tier < self.n - 1:
            nxt = np.where(current[self.feature] < self.thresholds[tier], tier + 1, -1)
        else:
            nxt = np.full(n, -1)
        return nxt.astype(np.int64), np.full(n, tier, dtype=np.int64), None


class ArtifactPolicy:
    """Adapter from job rows to the calibrated policy (cascade.runtime.Policy)."""

    needs_lineage = True        # judges on every tier a row ran: rows carry their earlier runs

    def __init__(self, spec: JobSpec):
        from cascade.artifact import load_policy    # torch: only a calibrated policy loads it

        self.policy = load_policy(spec.policy.artifact)
        self.label = spec.policy.point
        self.n = self.policy.n_tiers
        # what encoding prompts cost this process (a policy that reads embeddings): submit
        # records it in submitted.json
        self.embedded_rows, self.embed_seconds = 0, 0.0

    def _observations(self, rows: list[dict], state: tuple[int, ...], embedding=None):
        from cascade.features import Observations    # scikit-learn: as load_policy

        schema = self.policy.schema
        prompts = [_prompt(r) for r in rows]
        text = {c: np.array(["" if r.get(c) is None else str(r.get(c)) for r in rows], dtype=object)
                for c in schema.get("prompt_text", [])}
        num = {c: np.array([_float(r.get(c)) for r in rows]) for c in schema.get("prompt_num", [])}
        obs = Observations(np.array(prompts, dtype=object), text, num,
                           row_ids=[r.get("id") for r in rows], embedding=embedding)
        for t in state:
            recs = [next(x for x in r["trace"] if x["tier"] == t) for r in rows]
            feats = {c: np.array([_float(x.get(c)) for x in recs])
                     for c in schema.get("output_num", [])}
            obs.reveal(t, [x["response"] or "" for x in recs], np.array([x["cost"] for x in recs]), feats)
        return obs

    def start(self, shard) -> tuple[list[int], dict]:
        """Starting tier of each row of a shard (a pyarrow Table), from its prompt alone; and
        the columns its rows carry to every tier: the prompt embedding, for a policy that reads
        one (encoded here, once per row, and never again)."""
        rows = shard.to_pylist()
        if not rows:
            return [], {}
        carried, emb = {}, None
        if self.policy.encoder:
            t0 = time.perf_counter()
            emb = self.policy.embed([_prompt(r) for r in rows])
            self.embed_seconds += time.perf_counter() - t0
            self.embedded_rows += len(rows)
            carried[EMBEDDING] = pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), emb.shape[1])
        action, _, _ = self.policy.decide(self._observations(rows, (), emb), (), self.label)
        return [int(a) if a >= 0 else 0 for a in action], carried

    def decide(self, tier: int, rows, current: dict):
        emb = None
        if self.policy.encoder:
            if EMBEDDING not in rows.column_names:
                raise ValueError("the policy reads prompt embeddings and these rows carry none "
                                 "(a job submitted before the policy changed?)")
            col = rows.column(EMBEDDING).combine_chunks()
            emb = col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), -1)   # slice-safe
            rows = rows.drop_columns([EMBEDDING])
        rows = rows.to_pylist()
        n = len(rows)
        for i, r in enumerate(rows):      # this tier's answer joins the lineage it is judged on
            r["trace"] = lineage(r, self.n)
            r["trace"].append({"tier": tier, "status": "ok", "response": current["response"][i],
                               "cost": float(current["cost"][i]),
                               **{f: float(current[f][i]) for f in current
                                  if f.endswith("_logprob") or f.startswith("choice_")}})
        nxt, keep, p_quality = np.full(n, -1), np.full(n, tier), np.full(n, np.nan)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            state = tuple(sorted(x["tier"] for x in r["trace"] if x["status"] == "ok"))
            groups.setdefault(state, []).append(i)
        for state, idx in groups.items():
            sub = [rows[i] for i in idx]
            obs = self._observations(sub, state, None if emb is None else emb[np.asarray(idx)])
            action, kept, q = self.policy.decide(obs, state, self.label)
            idx = np.asarray(idx)
            nxt[idx] = np.where(np.asarray(action) >= 0, action, -1)
            keep[idx] = kept
            p_quality[idx] = np.asarray(q)[:, tier]
        return nxt.astype(np.int64), keep.astype(np.int64), p_quality


def _float(v) -> float:
    """A logged number as the featurizer takes it: missing is NaN, -inf stays -inf (the
    featurizer's standardiser places both; 0.0 would read as a certain log-probability)."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _prompt(row: dict) -> str:
    return row.get("prompt") or _chat_text(row.get("messages"))


def _chat_text(messages) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in (messages or []))


def make_policy(spec: JobSpec):
    return ArtifactPolicy(spec) if spec.policy.artifact else RulePolicy(spec)
