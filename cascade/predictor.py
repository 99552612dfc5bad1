"""Quality predictors, one per state of the cascade, chosen per tier from several models.

For a state S (the set of tiers already run), the predictor reads the prompt and the outputs of
the tiers in S and returns, for every tier t of the ladder, the probability that t's answer is
good (quality 1): for t in S that is "is this answer right", for t not in S a forecast of what
running t would give.

Candidates, each cross-fitted on the same K folds of the calibration rows: the tier's base rate
(prior); per logged number (a tier's token log-probability, choice probability...), Platt scaling
of that number alone, a monotone map; ridge regression on every feature, Platt-scaled; and a small
torch MLP with one output per tier (the rare tiers borrow strength from the others). Per (state,
tier) the lowest out-of-fold log-loss wins, so small calibration sets pick simple models by
themselves. The out-of-fold predictions are what the dynamic programme is fitted on (in-sample
predictions are overconfident and would make stopping look better than it is); at run time the K
fold models are averaged. Every probability is Platt-calibrated on out-of-fold scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.special import expit
from torch import nn


# Candidate models for each (state, tier), simplest first; the choice is the lowest out-of-fold
# log-loss, so a tie (or a small calibration set where nothing beats a simple model) keeps the
# simpler one. Every candidate but the MLP is a linear head on the state's feature matrix.
CANDIDATES = ("prior", "monotone", "linear", "mlp")


@dataclass
class TrainConfig:
    hidden: int = 32          # the paper's 32 units; measured no worse than 64/128 here
    epochs: int = 6
    batch_size: int = 256
    lr: float = 3e-3
    weight_decay: float = 1e-4
    dropout: float = 0.1
    folds: int = 3
    seed: int = 0
    # candidate model kinds chosen from per (state, tier) by out-of-fold log-loss
    models: tuple[str, ...] = CANDIDATES


class QualityMLP(nn.Module):
    def __init__(self, n_in: int, n_out: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_mlp(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, seed: int) -> QualityMLP:
    """Fit one MLP on quality targets y in [0, 1] (soft labels allowed) with BCE."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = QualityMLP(x.shape[1], y.shape[1], cfg.hidden, cfg.dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.float32))
    loss_fn = nn.BCEWithLogitsLoss()
    model.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), cfg.batch_size):
            idx = perm[i:i + cfg.batch_size]
            opt.zero_grad()
            loss_fn(model(xt[idx]), yt[idx]).backward()
            opt.step()
    model.eval()
    return model


@torch.no_grad()
def logits_of(models: list[QualityMLP], x: np.ndarray) -> np.ndarray:
    xt = torch.from_numpy(x)
    return np.mean([m(xt).numpy() for m in models], axis=0)


def fit_platt(logit: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Scale a, shift b minimising the cross-entropy of sigmoid(a*logit+b) against y in [0, 1]:
    an unpenalised (C=inf) scikit-learn logistic regression on the logit, a soft label q entered as a
    positive of weight q and a negative of weight 1-q."""
    from sklearn.linear_model import LogisticRegression

    y = np.clip(np.asarray(y, dtype=np.float64), 0.0, 1.0)
    if y.min() == y.max():                     # one class only: keep the logits as they are
        return 1.0, 0.0
    x = np.concatenate([logit, logit]).astype(np.float64).reshape(-1, 1)
    label = np.concatenate([np.ones(len(y)), np.zeros(len(y))])
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=200)
    lr.fit(x, label, sample_weight=np.concatenate([y, 1 - y]))
    return float(lr.coef_[0, 0]), float(lr.intercept_[0])


def apply_platt(logit: np.ndarray, ab: np.ndarray) -> np.ndarray:
    """ab: (n_tiers, 2) scale/shift per output column."""
    return expit(logit * ab[:, 0] + ab[:, 1])


def fold_of(row_ids, folds: int) -> np.ndarray:
    """Deterministic fold per row id, independent of row order."""
    import zlib
    return np.array([zlib.crc32(str(r).encode()) % folds for r in row_ids])


RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1000.0)


@dataclass
class StatePredictor:
    """The predictor of one state: per tier, either the K fold MLPs' Platt-scaled mean logit, or
    a linear head (prior, a monotone map of one numeric column, Platt-scaled ridge) with its
    K fold fits averaged and its out-of-fold Platt scaling folded into the weights."""

    models: list[QualityMLP]
    platt: np.ndarray          # (n_tiers, 2): Platt scaling of the MLP's logits
    heads: list[str] | None = None       # per tier: "mlp" or the linear head's name
    weight: np.ndarray | None = None     # (n_features, n_tiers): linear heads (0 for MLP tiers)
    bias: np.ndarray | None = None       # (n_tiers,)

    def __post_init__(self):
        n = self.platt.shape[0]
        if self.heads is None:                    # artifacts written before model choice: all MLP
            self.heads = ["mlp"] * n
        self._mlp = np.array([h == "mlp" for h in self.heads])
        if self.weight is not None:
            self.weight = np.ascontiguousarray(self.weight, dtype=np.float32)
            self.bias = np.asarray(self.bias, dtype=np.float32)
        # The K fold models fused into one wide layer: one matmul per batch instead of K.
        with torch.no_grad():
            k = len(self.models)
            self._w1 = torch.cat([m.net[0].weight for m in self.models]).T.contiguous().numpy()
            self._b1 = torch.cat([m.net[0].bias for m in self.models]).numpy()
            self._w2 = (torch.cat([m.net[3].weight for m in self.models], dim=1).T / k).contiguous().numpy()
            self._b2 = (torch.stack([m.net[3].bias for m in self.models]).mean(0)).numpy()

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Mean logit of the fold MLPs (eval mode: dropout off), before Platt scaling."""
        hidden = np.maximum(x @ self._w1 + self._b1, 0.0)
        return hidden @ self._w2 + self._b2

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self._mlp.all() or self.weight is None:
            return apply_platt(self.logits(x), self.platt)
        out = expit(x @ self.weight + self.bias)
        if self._mlp.any():
            out[:, self._mlp] = apply_platt(self.logits(x), self.platt)[:, self._mlp]
        return out


def cross_fit(x: np.ndarray, y: np.ndarray, folds: np.ndarray, cfg: TrainConfig,
              seed: int) -> tuple[StatePredictor, np.ndarray]:
    """Train one MLP per fold; return the predictor and calibrated out-of-fold probabilities."""
    k = int(folds.max()) + 1
    oof = np.zeros(y.shape, dtype=np.float64)
    models = []
    for f in range(k):
        train = folds != f
        model = train_mlp(x[train], y[train], cfg, seed=seed * 100 + f)
        models.append(model)
        oof[~train] = logits_of([model], x[~train])
    platt = np.array([fit_platt(oof[:, t], y[:, t]) for t in range(y.shape[1])])
    return StatePredictor(models, platt), apply_platt(oof, platt)


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of probabilities p against quality y in [0, 1] (soft labels allowed)."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit_state(x: np.ndarray, y: np.ndarray, folds: np.ndarray, cfg: TrainConfig, seed: int,
              numeric: dict[str, int] | None = None) -> tuple[StatePredictor, np.ndarray, list[dict]]:
    """Every candidate model of one state, cross-fitted on the same folds; per tier, the one with
    the lowest out-of-fold log-loss. Returns the predictor, its out-of-fold probabilities (what
    the dynamic programme is fitted on) and per tier the choice with every candidate's loss.

    `numeric`: name -> column of x holding a numeric signal (a per-tier log-probability...); each
    gets a monotone candidate, a one-feature logistic fit (Platt scaling) of that column.
    """
    n_rows, n = y.shape
    k = int(folds.max()) + 1
    numeric = numeric or {}
    mlp, oof_mlp = cross_fit(x, y, folds, cfg, seed)
    # linear candidates: name -> (oof probabilities (N, n), weight (d, n), bias (n,))
    cands: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def platt_heads(name: str, score: np.ndarray, coefs: np.ndarray, icpts: np.ndarray,
                    cols: np.ndarray | None = None):
        """A linear score's out-of-fold values, per-fold coefficients (K, n, d') and intercepts
        (K, n) -> the candidate: Platt scaling fitted on the out-of-fold scores, folded into the
        fold-averaged weights."""
        oof, w, b = np.zeros((n_rows, n)), np.zeros((x.shape[1], n)), np.zeros(n)
        for t in range(n):
            a, c = fit_platt(score[:, t], y[:, t])
            oof[:, t] = expit(a * score[:, t] + c)
            full = a * coefs[:, t].mean(0)
            if cols is None:
                w[:, t] = full
            else:
                w[cols, t] = full
            b[t] = a * icpts[:, t].mean() + c
        cands[name] = (oof, w, b)

    prior_oof = np.zeros((n_rows, n))
    for f in range(k):
        prior_oof[folds == f] = y[folds != f].mean(0)
    cands["prior"] = (prior_oof, np.zeros((x.shape[1], n)), _logit(y.mean(0)))
    for name, col in numeric.items():
        # the column itself is the score: Platt scaling of it is a monotone map (one slope)
        v = x[:, col].astype(np.float64)
        score = np.repeat(v[:, None], n, 1)
        platt_heads(f"monotone:{name}", score, np.ones((1, n, 1)), np.zeros((1, n)), np.array([col]))
    # ridge regression of quality on every feature (the L2 strength per tier by generalised
    # cross-validation), Platt-scaled: as good as an L2 logistic regression here in out-of-fold
    # log-loss and AUC, at a tenth of its fitting time (measured on the MMLU-Pro ladders)
    from sklearn.linear_model import Ridge, RidgeCV

    alphas = np.atleast_1d(RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True).fit(x, y).alpha_)
    score = np.zeros((n_rows, n))
    coefs, icpts = np.zeros((k, n, x.shape[1])), np.zeros((k, n))
    for f in range(k):
        train = folds != f
        fit = Ridge(alpha=alphas).fit(x[train], y[train])
        score[~train] = fit.predict(x[~train])
        coefs[f], icpts[f] = fit.coef_, fit.intercept_
    platt_heads("linear", score, coefs, icpts)

    heads, report = [], []
    weight, bias = np.zeros((x.shape[1], n)), np.zeros(n)
    oof = np.zeros((n_rows, n))
    for t in range(n):
        losses = {name: log_loss(c[0][:, t], y[:, t]) for name, c in cands.items()
                  if name.split(":")[0] in cfg.models}
        if "mlp" in cfg.models or not losses:
            losses["mlp"] = log_loss(oof_mlp[:, t], y[:, t])
        best = min(losses, key=losses.get)           # dict order: simplest first wins a tie
        heads.append(best)
        report.append({"tier": t, "model": best, "log_loss": losses})
        if best == "mlp":
            oof[:, t] = oof_mlp[:, t]
        else:
            oof[:, t], weight[:, t], bias[t] = cands[best][0][:, t], cands[best][1][:, t], cands[best][2][t]
    pred = StatePredictor(mlp.models, mlp.platt, heads, weight, bias)
    return pred, oof, report


def auc(score: np.ndarray, y: np.ndarray) -> float | None:
    """Area under the ROC curve (scikit-learn) for y > 0.5 as the positive class; None if one
    class only."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y) > 0.5
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, score))


def ece(prob: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error with equal-width bins. Written here: scikit-learn has no ECE,
    and its calibration_curve takes neither soft labels (quality 0.5) nor returns bin counts."""
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.digitize(prob, edges) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.mean() * abs(prob[m].mean() - y[m].mean())
    return float(total)
