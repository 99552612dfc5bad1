"""A calibrated policy at run time: predict, decide, and replay logged ladders causally."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa

from cascade.encoder import get_encoder
from cascade.features import Observations, StateFeaturizer, tier_block
from cascade.ladder import Ladder
from cascade.policy import OperatingPoint, decide, phi, row_hash, solve_order
from cascade.predictor import StatePredictor, TrainConfig


@dataclass
class Policy:
    n_tiers: int
    models: list[str]
    schema: dict
    featurizer: StateFeaturizer
    predictors: dict[tuple[int, ...], StatePredictor]
    points: list[OperatingPoint]            # cheapest first
    default_label: str
    cost_unit: float
    quality_offset: float = 0.0
    quality_span: float = 1.0
    best_tier: int = -1
    train_config: TrainConfig = field(default_factory=TrainConfig)
    calibration: dict = field(default_factory=dict)
    version: str = ""
    # the sentence encoder whose prompt embeddings the predictors read (cascade.encoder.describe),
    # or None
    encoder: dict | None = None

    def embed(self, prompts) -> np.ndarray | None:
        """The prompts' embeddings if this policy reads them (else None)."""
        if not self.encoder:
            return None
        return get_encoder(self.encoder["name"], self.encoder.get("version")).embed(prompts)

    def point(self, label: str | None = None) -> OperatingPoint:
        label = label or self.default_label
        for p in self.points:
            if p.label == label:
                return p
        raise KeyError(f"no operating point {label!r}; have {[p.label for p in self.points]}")

    def predict(self, obs: Observations, state: tuple[int, ...]) -> np.ndarray:
        """(rows, n_tiers) calibrated probability that each tier's answer is good."""
        return self.predictors[state].predict(self.featurizer(obs, state))

    def basis(self, obs: Observations, q: np.ndarray) -> np.ndarray:
        return phi(q, self.featurizer.prompt_scaler(obs.prompt_dense)[:, 0].astype(np.float64))

    def decide(self, obs: Observations, state: tuple[int, ...], label: str | None = None):
        """(action, kept, q): action -1 = stop and keep tier `kept`, else the tier to run next."""
        q = self.predict(obs, state)
        point = self.point(label)
        u = None if point.mix is None or obs.row_ids is None else row_hash(obs.row_ids)
        action, kept = decide(state, q, self.basis(obs, q), point, self.n_tiers, u)
        return action, kept, q


class _LazyTiers:
    """Tier blocks of a logged ladder, computed only for rows whose policy actually ran the tier."""

    def __init__(self, ladder: Ladder, fallback_cost: list[float] | None = None):
        self.ladder = ladder
        self.fallback_cost = fallback_cost
        n, N = ladder.n_tiers, len(ladder)
        self.revealed = np.zeros((n, N), bool)
        self.blocks: dict[int, list] = {}

    def reveal(self, tier: int, rows: np.ndarray):
        rows = rows[~self.revealed[tier, rows]]
        if not len(rows):
            return
        L = self.ladder
        if L.cost is not None:
            cost = L.cost[tier, rows]
        elif self.fallback_cost is not None:       # logs without costs: the calibration mean
            cost = np.full(len(rows), self.fallback_cost[tier])
        else:
            cost = None
        dense, hashed, answers = tier_block(list(L.outputs[tier, rows]), cost,
                                            {k: v[tier, rows] for k, v in L.output_num.items()})
        if tier not in self.blocks:
            N = len(L)
            self.blocks[tier] = [np.zeros((N, dense.shape[1]), np.float32),
                                 np.zeros((N, hashed.shape[1]), np.float32),
                                 np.full(N, "", dtype=object)]
        blk = self.blocks[tier]
        blk[0][rows], blk[1][rows], blk[2][rows] = dense, hashed, answers
        self.revealed[tier, rows] = True

    def observations(self, prompt_obs: Observations, state: tuple[int, ...], rows: np.ndarray):
        """Observations of `rows` holding exactly the tiers in `state`, all of which must have run."""
        sub = prompt_obs.take(rows)
        for t in state:
            if not self.revealed[t, rows].all():
                raise RuntimeError(f"causality violated: tier {t} read before it ran")
            sub.tiers[t] = tuple(part[rows] for part in self.blocks[t])
            sub.outputs[t] = self.ladder.outputs[t, rows]
        return sub


def replay(policy: Policy, ladder: Ladder, labels: list[str] | None = None) -> pl.DataFrame:
    """Simulate the policy on logged outputs, strictly causally, for each operating point.

    A row's decision at state S reads its prompt and the outputs (and realized costs) of the tiers
    in S only: a tier's block is computed from the log when, and for the rows where, the policy
    chooses to run it.

    Returns one row per (point, row): row_id, point, final_tier, tiers_run (in the order run).
    """
    n, N = policy.n_tiers, len(ladder)
    if ladder.n_tiers != n:
        raise ValueError(f"policy has {n} tiers, logs have {ladder.n_tiers}")
    points = [policy.point(label) for label in labels] if labels else policy.points
    prompt_obs = Observations(ladder.prompts, ladder.prompt_text, ladder.prompt_num,
                              embedding=policy.embed(ladder.prompts))
    tiers = _LazyTiers(ladder, policy.calibration.get("tier_cost"))
    u = row_hash(ladder.row_ids)
    final = np.full((len(points), N), -1)
    step = np.full((len(points), N, n), -1, np.int16)     # [point, row, tier]: when the tier ran
    at = {((), k): np.arange(N) for k in range(len(points))}
    for state in reversed(solve_order(n)):
        groups = [(k, at.pop((state, k))) for k in range(len(points)) if (state, k) in at]
        if not groups:
            continue
        rows = np.unique(np.concatenate([r for _, r in groups]))
        obs = tiers.observations(prompt_obs, state, rows)
        q = policy.predict(obs, state)
        basis = policy.basis(obs, q)
        pos = {r: i for i, r in enumerate(rows)}
        for k, r in groups:
            sel = np.fromiter((pos[i] for i in r), int, len(r))
            action, kept = decide(state, q[sel], basis[sel], points[k], n, u[r])
            final[k, r[action < 0]] = kept[action < 0]
            for j in np.unique(action[action >= 0]):
                go = r[action == j]
                tiers.reveal(int(j), go)
                step[k, go, j] = len(state)
                nxt = (state + (int(j),), k)
                at[nxt] = np.concatenate([at[nxt], go]) if nxt in at else go
    return pl.concat([pl.DataFrame({
        "row_id": ladder.row_ids.astype(str), "point": p.label, "final_tier": final[k].astype(np.int64),
        "tiers_run": run_order(step[k])}) for k, p in enumerate(points)])


# `cascade replay`'s output file; plain (not large) Arrow types, as the README's schema gives.
DECISIONS = pa.schema([("row_id", pa.string()), ("point", pa.string()), ("final_tier", pa.int64()),
                       ("tiers_run", pa.list_(pa.int64()))])


def run_order(step: np.ndarray) -> pl.Series:
    """(rows, tiers) step at which each tier ran (-1: never) -> each row's tiers in run order."""
    n = step.shape[1]
    ran = step >= 0
    order = np.argsort(np.where(ran, step, np.iinfo(step.dtype).max), axis=1, kind="stable")
    lens = ran.sum(1)
    flat = order[np.arange(n)[None, :] < lens[:, None]].astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    return pl.Series(pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)))


def spent(tiers_run: pl.Series, rows: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Per decision, the summed `cost[tier, row]` of the tiers it ran (`rows`: ladder index)."""
    lens = tiers_run.list.len().to_numpy()
    flat = tiers_run.explode().drop_nulls().to_numpy()
    owner = np.repeat(np.arange(len(lens)), lens)
    return np.bincount(owner, weights=cost[flat, rows[owner]], minlength=len(lens))
