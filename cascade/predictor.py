"""Quality predictors: a small torch MLP per state of the cascade, cross-fitted and calibrated.

For a state S (the set of tiers already run), the predictor reads the prompt and the outputs of
the tiers in S and returns, for every tier t of the ladder, the probability that t's answer is
good (quality 1): for t in S that is "is this answer right", for t not in S a forecast of what
running t would give. Multi-output training lets the rare tiers borrow strength from the others.

Each state's predictor is trained K times on K folds of the calibration rows. The out-of-fold
predictions are what the dynamic programme is fitted on (in-sample predictions are overconfident
and would make stopping look better than it is); at run time the K fold models are averaged.
A per-(state, tier) Platt scaling fitted on the out-of-fold logits calibrates the probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


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
    return 1 / (1 + np.exp(-(logit * ab[:, 0] + ab[:, 1])))


def fold_of(row_ids, folds: int) -> np.ndarray:
    """Deterministic fold per row id, independent of row order."""
    import zlib
    return np.array([zlib.crc32(str(r).encode()) % folds for r in row_ids])


@dataclass
class StatePredictor:
    """The K fold models of one state and their calibration."""

    models: list[QualityMLP]
    platt: np.ndarray          # (n_tiers, 2)

    def __post_init__(self):
        # The K fold models fused into one wide layer: one matmul per batch instead of K.
        with torch.no_grad():
            k = len(self.models)
            self._w1 = torch.cat([m.net[0].weight for m in self.models]).T.contiguous().numpy()
            self._b1 = torch.cat([m.net[0].bias for m in self.models]).numpy()
            self._w2 = (torch.cat([m.net[3].weight for m in self.models], dim=1).T / k).contiguous().numpy()
            self._b2 = (torch.stack([m.net[3].bias for m in self.models]).mean(0)).numpy()

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Mean logit of the fold models (eval mode: dropout off)."""
        hidden = np.maximum(x @ self._w1 + self._b1, 0.0)
        return hidden @ self._w2 + self._b2

    def predict(self, x: np.ndarray) -> np.ndarray:
        return apply_platt(self.logits(x), self.platt)


def cross_fit(x: np.ndarray, y: np.ndarray, folds: np.ndarray, cfg: TrainConfig,
              seed: int) -> tuple[StatePredictor, np.ndarray]:
    """Train one model per fold; return the predictor and calibrated out-of-fold probabilities."""
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
