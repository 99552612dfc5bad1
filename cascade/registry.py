"""A policy that learns across nights, safely: a registry of policy versions with their evidence,
a calibration pool fed by every night's fully-run rows, and a champion/challenger step.

Registry directory:
    config.json            the objective every version is judged by: lambda (quality per unit of
                           cost, normalised to the best tier's mean cost), holdout share, confidence
    pool/<night>.parquet   a night's rows with every tier's outcome (audited rows, and every row
                           of a night run on the safe default), in the replay format
    versions/vNNNN/        each challenger fitted: a policy artifact (policy.json + weights) and
                           evidence.json (pool, holdout, the comparison, the decision)
    current.json           {"version": the champion or null, "log": every decision in order}

After a night, `learn` adds its rows to the pool and fits a challenger on the pool's training
rows (every row whose id does not hash into the holdout). The challenger is compared with the
champion (or, before there is one, with the safe default: every tier run, the best tier's answer
kept) on the holdout rows, which no version was ever fitted on: per row, the utility difference
u = (quality_challenger - quality_champion) - lambda * (cost_challenger - cost_champion). It is
promoted only if a one-sided normal bound on the mean of u is positive with the confidence
calibrate's do-no-harm check uses (0.75 by default), on at least `min_holdout` rows; otherwise the
champion stays, and the reason is logged. Each night's decision is one line of the log; a rollback
makes an earlier version the champion again (and says so in the log).

A job names the registry in its spec (`policy: {registry: PATH}`): it runs the champion, or, on
a night with none yet, the safe default (every row escalated to the last tier, so the night's
every row becomes a pool row).
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import norm

from cascade.artifact import load_policy, save_policy
from cascade.calibrate import NO_HARM_CONFIDENCE, fit_policy
from cascade.ladder import Ladder, load_ladder
from cascade.predictor import TrainConfig
from cascade.runtime import replay, spent


@dataclass
class Objective:
    lam: float = 0.1                       # quality per unit of normalised cost
    holdout: float = 0.3                   # share of row ids never fitted on
    confidence: float = NO_HARM_CONFIDENCE
    min_holdout: int = 30


def in_holdout(row_ids, share: float) -> np.ndarray:
    """Rows whose id hashes into the holdout (fixed per id, whatever night it comes in)."""
    return np.array([zlib.crc32(f"{r}|holdout".encode()) % 1000 < share * 1000 for r in row_ids],
                    dtype=bool)


def utilities(ladder: Ladder, policy, lam_log: float) -> np.ndarray:
    """Per row: quality - lambda * cost of what `policy` does on the ladder (None: the safe
    default, every tier run and the last tier's answer kept)."""
    rows = np.arange(len(ladder))
    if policy is None:
        return ladder.quality[-1] - lam_log * ladder.cost.sum(0)
    d = replay(policy, ladder.without_labels())
    return ladder.quality[d["final_tier"].to_numpy(), rows] - lam_log * spent(d["tiers_run"], rows, ladder.cost)


def compare(challenger: np.ndarray, champion: np.ndarray, confidence: float, min_rows: int) -> dict:
    """The promotion test on paired per-row utilities (see the module docstring)."""
    d = challenger - champion
    n = len(d)
    out = {"holdout_rows": n, "gain": float(d.mean()) if n else float("nan")}
    if n < min_rows:
        return {**out, "promote": False, "reason": f"{n} held-out rows, fewer than {min_rows}"}
    se = float(d.std(ddof=1) / np.sqrt(n))
    sure = float(norm.cdf(out["gain"] / se)) if se > 0 else float(out["gain"] > 0)
    out.update(se=se, confidence_better=sure, promote=sure >= confidence)
    out["reason"] = (f"better with confidence {sure:.3f} >= {confidence}" if out["promote"] else
                     f"not better with confidence {confidence} (only {sure:.3f}; mean gain "
                     f"{out['gain']:+.4f})")
    return out


class Registry:
    def __init__(self, path: str | Path, objective: Objective | None = None):
        self.path = Path(path)
        cfg = self.path / "config.json"
        if cfg.exists():
            self.objective = Objective(**json.loads(cfg.read_text()))
        else:
            self.objective = objective or Objective()
            self.path.mkdir(parents=True, exist_ok=True)
            cfg.write_text(json.dumps(self.objective.__dict__, indent=1))
        (self.path / "pool").mkdir(exist_ok=True)
        (self.path / "versions").mkdir(exist_ok=True)

    # ------------------------------------------------------------ the champion
    def state(self) -> dict:
        f = self.path / "current.json"
        return json.loads(f.read_text()) if f.exists() else {"version": None, "log": []}

    def _save_state(self, state: dict):
        tmp = self.path / "current.json.tmp"
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.path / "current.json")

    def current(self) -> str | None:
        return self.state()["version"]

    def champion(self):
        v = self.current()
        return None if v is None else load_policy(self.path / "versions" / v)

    def versions(self) -> list[str]:
        return sorted(p.name for p in (self.path / "versions").iterdir() if p.is_dir())

    # ------------------------------------------------------------ the pool
    def add_to_pool(self, night: str, frame: pl.DataFrame) -> int:
        """A night's fully-run rows (replay format, with quality), kept as pool/<night>.parquet."""
        frame.write_parquet(self.path / "pool" / f"{night}.parquet")
        return frame["row_id"].n_unique()

    def pool(self) -> Ladder | None:
        files = sorted((self.path / "pool").glob("*.parquet"))
        if not files:
            return None
        frame = pl.concat([pl.read_parquet(f).with_columns(pl.lit(f.stem).alias("_night"))
                           for f in files], how="diagonal_relaxed")
        # a row seen on several nights counts once, with its latest outcome
        latest = frame.group_by("row_id").agg(pl.col("_night").max())
        frame = frame.join(latest, on=["row_id", "_night"]).drop("_night").sort(["row_id", "tier"])
        return load_ladder(frame, require_quality=True)

    # ------------------------------------------------------------ a night's step
    def learn(self, night: str, frame: pl.DataFrame | None = None, cfg: TrainConfig | None = None,
              log=lambda m: None) -> dict:
        """Add a night's rows to the pool, fit a challenger, promote it or keep the champion.
        Returns the decision (also appended to the log)."""
        if frame is not None and len(frame):
            self.add_to_pool(night, frame)
        pool = self.pool()
        entry = {"night": night, "at": time.time(), "champion_before": self.current()}
        if pool is None:
            entry.update(promote=False, reason="the calibration pool is empty")
            return self._log(entry)
        obj = self.objective
        hold = in_holdout(pool.row_ids, obj.holdout)
        train, test = pool.subset(np.flatnonzero(~hold)), pool.subset(np.flatnonzero(hold))
        entry.update(pool_rows=len(pool), train_rows=len(train), holdout_rows=len(test))
        if len(train) < 2 * pool.n_tiers or len(test) == 0:
            entry.update(promote=False, reason=f"too few pool rows to fit and test ({len(train)} "
                                               f"to fit, {len(test)} held out)")
            return self._log(entry)
        lam_log = obj.lam / float(train.cost[-1].mean())
        challenger, _ = fit_policy(train, cfg=cfg, user_lambdas=[lam_log])
        version = f"v{len(self.versions()) + 1:04d}"
        champion = self.champion()
        result = compare(utilities(test, challenger, lam_log), utilities(test, champion, lam_log),
                         obj.confidence, obj.min_holdout)
        entry.update(version=version, against=self.current() or "safe default", **result)
        out = self.path / "versions" / version
        save_policy(challenger, out)
        (out / "evidence.json").write_text(json.dumps(entry, indent=1, default=float))
        log(f"{night}: challenger {version} against {entry['against']}: "
            f"{'promoted' if result['promote'] else 'kept ' + str(entry['against'])} ({result['reason']})")
        return self._log(entry, promote_to=version if result["promote"] else None)

    def _log(self, entry: dict, promote_to: str | None = None) -> dict:
        state = self.state()
        if promote_to:
            state["version"] = promote_to
        entry["champion_after"] = state["version"]
        state["log"].append(entry)
        self._save_state(state)
        return entry

    def rollback(self, to: str | None = None) -> str | None:
        """Make an earlier version the champion: `to`, or the one before the current champion
        (None: back to the safe default). Returns the new champion."""
        state = self.state()
        if to is not None and to not in self.versions():
            raise ValueError(f"{self.path}: no version {to!r}; have {', '.join(self.versions()) or 'none'}")
        if to is None:
            promoted = [e["champion_after"] for e in state["log"]
                        if e.get("champion_after") != e.get("champion_before")]
            chain = [v for v in promoted if v]
            cur = state["version"]
            before = chain[:chain.index(cur)] if cur in chain else chain
            to = before[-1] if before else None
        state["log"].append({"rollback": True, "at": time.time(), "champion_before": state["version"],
                             "champion_after": to})
        state["version"] = to
        self._save_state(state)
        return to
