"""The policy as the job system sees it: where a row starts, and after each tier whether it stops
(and which tier's answer it keeps) or which tier it runs next.

Two kinds: a calibrated artifact from `cascade calibrate` (the optimal-stopping policy, which may
start a row past tier 0, skip tiers, and keep an earlier tier's answer), or a plain rule on a
confidence feature of the current tier's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jobs.spec import JobSpec


@dataclass
class Decision:
    next_tier: int | None          # None: the row stops
    kept: int                      # the tier whose answer is final if the row stops here
    p_quality: list[float] | None  # the predictor's estimate for each tier, when there is one


class RulePolicy:
    def __init__(self, spec: JobSpec):
        self.n = len(spec.tiers)
        self.feature = spec.policy.feature
        self.thresholds = spec.policy.thresholds

    def start(self, shard) -> list[int]:
        """Starting tier of each row of a shard (a pyarrow Table): always tier 0."""
        return [0] * shard.num_rows

    def decide(self, tier: int, rows: list[dict]) -> list[Decision]:
        out = []
        for r in rows:
            value = r["trace"][-1]["features"][self.feature]
            if tier < self.n - 1 and value < self.thresholds[tier]:
                out.append(Decision(tier + 1, tier, None))
            else:
                out.append(Decision(None, tier, None))
        return out


class ArtifactPolicy:
    """Adapter from job rows to the calibrated policy (cascade.runtime.Policy)."""

    def __init__(self, spec: JobSpec):
        from cascade.artifact import load_policy

        self.policy = load_policy(spec.policy.artifact)
        self.label = spec.policy.point
        self.n = self.policy.n_tiers

    def _observations(self, rows: list[dict], state: tuple[int, ...]):
        from cascade.features import Observations

        schema = self.policy.schema
        prompts = [r.get("prompt") or _chat_text(r.get("messages")) for r in rows]
        text = {c: np.array(["" if r.get(c) is None else str(r.get(c)) for r in rows], dtype=object)
                for c in schema.get("prompt_text", [])}
        num = {c: np.array([_float(r.get(c)) for r in rows]) for c in schema.get("prompt_num", [])}
        obs = Observations(np.array(prompts, dtype=object), text, num)
        for t in state:
            recs = [next(x for x in r["trace"] if x["tier"] == t) for r in rows]
            feats = {c: np.array([_float(x["features"].get(c, x.get(c))) for x in recs])
                     for c in schema.get("output_num", [])}
            obs.reveal(t, [x["response"] or "" for x in recs], np.array([x["cost"] for x in recs]), feats)
        return obs

    def start(self, shard) -> list[int]:
        """Starting tier of each row of a shard (a pyarrow Table), from its prompt alone."""
        rows = shard.to_pylist()
        if not rows:
            return []
        action, _, _ = self.policy.decide(self._observations(rows, ()), (), self.label)
        return [int(a) if a >= 0 else 0 for a in action]

    def decide(self, tier: int, rows: list[dict]) -> list[Decision]:
        out: list[Decision | None] = [None] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            state = tuple(sorted(x["tier"] for x in r["trace"] if x["status"] == "ok"))
            groups.setdefault(state, []).append(i)
        for state, idx in groups.items():
            sub = [rows[i] for i in idx]
            action, kept, q = self.policy.decide(self._observations(sub, state), state, self.label)
            for j, i in enumerate(idx):
                nxt = int(action[j]) if action[j] >= 0 else None
                out[i] = Decision(nxt, int(kept[j]) if nxt is None else tier,
                                  [float(x) for x in q[j]])
        return out


def _float(v) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return 0.0
    return f if np.isfinite(f) else 0.0


def _chat_text(messages) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in (messages or []))


def make_policy(spec: JobSpec):
    return ArtifactPolicy(spec) if spec.policy.artifact else RulePolicy(spec)
