"""Quality predictors, one per state of the cascade, chosen per tier from several models.

For a state S (the set of tiers already run), the predictor reads the prompt and the outputs of
the tiers in S and returns, for every tier t of the ladder, the probability that t's answer is
good (quality 1): for t in S that is "is this answer right", for t not in S a forecast of what
running t would give.

Candidates, each cross-fitted on the same K folds of the calibration rows: the tier's base rate
(prior); per logged number (a tier's token log-probability, choice probability...), Platt scaling
of that number alone, a monotone map; ridge regression on every feature, Platt-scaled; gradient-
boosted trees on the features that are not hashed text (scikit-learn's histogram boosting, small:
25 trees of at most 8 leaves; opt-in, see DEFAULT_MODELS), Platt-scaled; a small torch MLP
with one output per tier (the rare tiers borrow strength from the others); and, for a policy
calibrated with prompt embeddings (cascade.encoder), `embed` (the linear score and a ridge
score on the embedding, combined) and `cluster` (k-means of the embeddings, each cluster's
quality rate), taken only where they beat the rest by more than a standard error. Per (state, tier)
the lowest out-of-fold log-loss wins, so small calibration sets pick simple models by
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
# simpler one. prior, monotone and linear are linear heads on the state's feature matrix.
# embed and cluster read the prompt's embedding (cascade.encoder) and exist only for a policy
# calibrated with one (`calibrate --embeddings`).
CANDIDATES = ("prior", "monotone", "linear", "embed", "cluster", "gbt", "mlp")
# The default set leaves the trees out: on the two small shared ladders they won out of fold
# yet lost on the test rows (README, "Decision quality"); `calibrate --models` adds them.
DEFAULT_MODELS = ("prior", "monotone", "linear", "embed", "cluster", "mlp")
EMBEDDING_HEADS = ("embed", "cluster")
# Boosted trees: small on purpose (a head is evaluated per row at run time, <= 2 us/row in all)
GBT_PARAMS = dict(max_iter=25, learning_rate=0.15, max_leaf_nodes=8, max_depth=3,
                  min_samples_leaf=20, l2_regularization=1.0, early_stopping=False)


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
    models: tuple[str, ...] = DEFAULT_MODELS
    # prompt embeddings from this encoder (cascade.encoder.ENCODERS) as features of the embed
    # and cluster candidates; None: none
    encoder: str | None = None


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


def fit_logistic(scores: np.ndarray, y: np.ndarray, max_iter: int = 500) -> tuple[np.ndarray, float]:
    """Slopes and shift of sigmoid(scores @ a + b) minimising its cross-entropy against y in
    [0, 1]: an unpenalised (C=inf) scikit-learn logistic regression on the scores, a soft label q
    entered as a positive of weight q and a negative of weight 1-q. One class only: the first
    score as it is."""
    from sklearn.linear_model import LogisticRegression

    y = np.clip(np.asarray(y, dtype=np.float64), 0.0, 1.0)
    scores = np.asarray(scores, np.float64).reshape(len(y), -1)
    if y.min() == y.max():
        return np.eye(scores.shape[1])[0], 0.0
    x = np.concatenate([scores, scores])
    label = np.concatenate([np.ones(len(y)), np.zeros(len(y))])
    lr = LogisticRegression(C=np.inf, tol=1e-10, max_iter=max_iter)
    lr.fit(x, label, sample_weight=np.concatenate([y, 1 - y]))
    return lr.coef_[0].astype(np.float64), float(lr.intercept_[0])


def fit_platt(logit: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Scale a, shift b minimising the cross-entropy of sigmoid(a*logit+b) against y in [0, 1]
    (fit_logistic with one score; one class only: the logits as they are)."""
    a, b = fit_logistic(logit, y, max_iter=200)
    return float(a[0]), b


def apply_platt(logit: np.ndarray, ab: np.ndarray) -> np.ndarray:
    """ab: (n_tiers, 2) scale/shift per output column."""
    return expit(logit * ab[:, 0] + ab[:, 1])


def fold_of(row_ids, folds: int) -> np.ndarray:
    """Deterministic fold per row id, independent of row order."""
    import zlib
    return np.array([zlib.crc32(str(r).encode()) % folds for r in row_ids])


RIDGE_ALPHAS = (1.0, 10.0, 100.0, 1000.0)


@dataclass
class TreeHead:
    """A boosted-tree head as plain arrays over the nodes of all its trees (no pickle: they are
    saved as safetensors). Leaf values carry the head's Platt scale, `bias` its baseline and
    shift: score = bias + the sum over trees of the leaf each row reaches.

    Evaluated for a whole batch with no per-tree loop: every split's test at once (one
    comparison of the gathered columns against the thresholds), each leaf's indicator as the AND
    of the <= `depth` tests on its path (or their negations), and the score as one product of
    those indicators with the leaf values."""

    feature: np.ndarray        # (nodes,) column of the state's matrix tested (0 at leaves)
    threshold: np.ndarray      # (nodes,) go left when x <= threshold
    missing_left: np.ndarray   # (nodes,) where a missing (NaN) value goes
    left: np.ndarray           # (nodes,) absolute node index (-1 at leaves)
    right: np.ndarray
    value: np.ndarray          # (nodes,) leaf value (0 at inner nodes)
    roots: np.ndarray          # (trees,)
    depth: int
    bias: float

    def __post_init__(self):
        inner = np.flatnonzero(self.left >= 0)
        slot = np.full(len(self.left), -1)
        slot[inner] = np.arange(len(inner))            # a split's column in the test matrix
        c, paths, leaves = len(inner), [], []
        stack = [(int(r), []) for r in self.roots]
        while stack:                                   # every root-to-leaf path
            node, path = stack.pop()
            if self.left[node] < 0:
                leaves.append(node)
                paths.append(path + [2 * c] * (self.depth - len(path)))   # padded with "true"
                continue
            stack.append((int(self.left[node]), path + [slot[node]]))
            stack.append((int(self.right[node]), path + [c + slot[node]]))
        feat = self.feature[inner]
        self._by_col = [(int(u), np.flatnonzero(feat == u)) for u in np.unique(feat)]
        self._thr = self.threshold[inner]
        self._miss = self.missing_left[inner]
        self._paths = np.array(paths, dtype=np.int64).reshape(len(leaves), self.depth)
        self._values = self.value[leaves].astype(np.float32)

    def score(self, x: np.ndarray) -> np.ndarray:
        n, c = len(x), len(self._thr)
        tests = np.empty((2 * c + 1, n), dtype=bool)   # each split's test, its negation, "true"
        for col, splits in self._by_col:               # one column at a time: no float copies
            v = x[:, col]
            tests[splits] = v[None, :] <= self._thr[splits, None]
            if np.isnan(v).any():
                tests[splits] = np.where(np.isnan(v)[None, :], self._miss[splits, None], tests[splits])
        np.logical_not(tests[:c], out=tests[c:2 * c])
        tests[2 * c] = True
        if not self.depth:
            return np.full(len(x), float(self._values.sum()) + self.bias)
        reach = tests[self._paths[:, 0]]                # (leaves, rows)
        for d in range(1, self.depth):
            reach &= tests[self._paths[:, d]]
        return self._values @ reach.view(np.uint8).astype(np.float32) + self.bias

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in ("feature", "threshold", "missing_left", "left",
                                              "right", "value", "roots")}

    @classmethod
    def from_sklearn(cls, ests, scale: float, shift: float, cols=None) -> "TreeHead":
        """From fitted HistGradientBoostingRegressors (their trees, `_predictors`, and
        baselines), averaged, and the Platt scaling of that average: logit = scale * mean
        prediction + shift. `cols`: the state-matrix column of each feature they were fitted on."""
        ests = ests if isinstance(ests, (list, tuple)) else [ests]
        scale = scale / len(ests)
        nodes = [tree[0].nodes for est in ests for tree in est._predictors]
        sizes = np.array([len(t) for t in nodes])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        flat = np.concatenate(nodes)
        offset = np.repeat(starts, sizes)
        leaf = flat["is_leaf"].astype(bool)
        feature = flat["feature_idx"].astype(np.int64)
        if cols is not None:
            feature = np.asarray(cols, dtype=np.int64)[feature]
        return cls(feature=np.where(leaf, 0, feature),
                   threshold=flat["num_threshold"].astype(np.float64),
                   missing_left=flat["missing_go_to_left"].astype(bool),
                   left=np.where(leaf, -1, flat["left"].astype(np.int64) + offset),
                   right=np.where(leaf, -1, flat["right"].astype(np.int64) + offset),
                   value=np.where(leaf, scale * flat["value"], 0.0),
                   roots=starts.astype(np.int64), depth=int(flat["depth"].max()),
                   bias=float(scale * sum(np.ravel(e._baseline_prediction)[0] for e in ests) + shift))


@dataclass
class ClusterHead:
    """A prompt's cluster (the nearest of k centroids of the calibration prompts' embeddings)
    -> a logit per tier: each cluster's smoothed quality rate on the calibration rows, Platt-
    scaled (the k-means routing of Avengers; a k-nearest-neighbour estimate whose neighbours
    are fixed in advance, so a row costs k dot products, not one per calibration row)."""

    centroids: np.ndarray      # (k, dim)
    table: np.ndarray          # (k, n_tiers) logits, Platt scaling folded in

    def __post_init__(self):
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        self.table = np.asarray(self.table, dtype=np.float32)
        self._half = 0.5 * (self.centroids ** 2).sum(1)

    def assign(self, e: np.ndarray) -> np.ndarray:
        """Nearest centroid (Euclidean) of each row's embedding."""
        return np.argmax(e @ self.centroids.T - self._half, axis=1)

    def logits(self, e: np.ndarray) -> np.ndarray:
        return self.table[self.assign(e)]


CLUSTER_PSEUDO_ROWS = 5.0      # a cluster's rate is shrunk to the tier's mean by this many rows


def cluster_count(rows: int) -> int:
    """k for k-means on `rows` calibration prompts: about sqrt(rows / 2), 4 to 64 (8 clusters of
    about 16 rows at 130 rows; 42 of about 85 at 3,600)."""
    return int(np.clip(round(np.sqrt(rows / 2)), 4, 64))


@dataclass
class EmbeddingFits:
    """The state-independent parts of the embedding candidates, fitted once per calibration on
    the prompt embeddings `e` with the predictors' folds."""

    score: np.ndarray          # (N, n) out-of-fold ridge scores on the embedding
    coefs: np.ndarray          # (K, n, dim) per fold
    icpts: np.ndarray          # (K, n)
    cluster_oof: np.ndarray | None    # (N, n) out-of-fold cluster probabilities (Platt-scaled)
    cluster: ClusterHead | None


def fit_embedding(e: np.ndarray, y: np.ndarray, folds: np.ndarray, seed: int) -> EmbeddingFits:
    """Ridge regression of every tier's quality on the prompt embedding (cross-fitted; the L2
    strength per tier by generalised cross-validation) and the cluster head: k-means of the
    embeddings (unsupervised: all rows), per fold each cluster's quality rate on the other folds
    shrunk to the tier's mean, Platt-scaled out of fold; deployed with the folds' logits
    averaged."""
    from sklearn.cluster import KMeans
    from sklearn.linear_model import Ridge, RidgeCV

    n_rows, n = y.shape
    k = int(folds.max()) + 1
    alphas = np.atleast_1d(RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True).fit(e, y).alpha_)
    score = np.zeros((n_rows, n))
    coefs, icpts = np.zeros((k, n, e.shape[1])), np.zeros((k, n))
    for f in range(k):
        train = folds != f
        fit = Ridge(alpha=alphas).fit(e[train], y[train])
        score[~train] = fit.predict(e[~train])
        coefs[f], icpts[f] = fit.coef_, fit.intercept_
    m = min(cluster_count(n_rows), n_rows)
    if m < 2:
        return EmbeddingFits(score, coefs, icpts, None, None)
    km = KMeans(n_clusters=m, n_init=3, random_state=seed).fit(e)
    head = ClusterHead(km.cluster_centers_, np.zeros((m, n)))
    label = head.assign(e)
    raw, tables = np.zeros((n_rows, n)), np.zeros((k, m, n))
    for f in range(k):
        train = folds != f
        prior = y[train].mean(0)
        sums = np.zeros((m, n))
        np.add.at(sums, label[train], y[train])
        counts = np.bincount(label[train], minlength=m)[:, None]
        tables[f] = _logit((sums + CLUSTER_PSEUDO_ROWS * prior) / (counts + CLUSTER_PSEUDO_ROWS))
        raw[~train] = tables[f][label[~train]]
    oof, table = np.zeros((n_rows, n)), np.zeros((m, n))
    for t in range(n):
        a, c = fit_platt(raw[:, t], y[:, t])
        oof[:, t] = expit(a * raw[:, t] + c)
        table[:, t] = a * tables[:, :, t].mean(0) + c
    return EmbeddingFits(score, coefs, icpts, oof, ClusterHead(km.cluster_centers_, table))


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
    trees: dict[int, TreeHead] | None = None   # tier -> its boosted-tree head
    cluster: ClusterHead | None = None         # for the tiers whose head is "cluster"
    embedding: tuple[int, int] | None = None   # (first, end) columns of the prompt embedding

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
        """Mean logit of the fold MLPs (eval mode: dropout off), before Platt scaling. They read
        the columns before the prompt embedding."""
        hidden = np.maximum(x[:, :self._w1.shape[0]] @ self._w1 + self._b1, 0.0)
        return hidden @ self._w2 + self._b2

    def predict(self, x: np.ndarray) -> np.ndarray:
        if self._mlp.all() or self.weight is None:
            return apply_platt(self.logits(x), self.platt)
        out = expit(x @ self.weight + self.bias)
        if self._mlp.any():
            out[:, self._mlp] = apply_platt(self.logits(x), self.platt)[:, self._mlp]
        for t, head in (self.trees or {}).items():
            out[:, t] = expit(head.score(x))
        if self.cluster is not None:
            on = np.array([h == "cluster" for h in self.heads])
            a, b = self.embedding
            out[:, on] = expit(self.cluster.logits(x[:, a:b])[:, on])
        return out

    def reads_embedding(self) -> bool:
        return any(h in EMBEDDING_HEADS for h in self.heads)

    def without_embedding(self, width: int) -> "StatePredictor":
        """The same predictor for a matrix without the embedding columns (from `width` on):
        valid only where no head reads them."""
        assert not self.reads_embedding()
        return StatePredictor(self.models, self.platt, self.heads,
                              None if self.weight is None else self.weight[:width], self.bias,
                              self.trees)


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


def row_log_loss(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy of probabilities p against quality y in [0, 1]."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy of probabilities p against quality y in [0, 1] (soft labels allowed)."""
    return float(np.mean(row_log_loss(p, y)))


def _logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def fit_state(x: np.ndarray, y: np.ndarray, folds: np.ndarray, cfg: TrainConfig, seed: int,
              numeric: dict[str, int] | None = None, dense: list[int] | None = None,
              embedding: slice | None = None, emb_fits: EmbeddingFits | None = None
              ) -> tuple[StatePredictor, np.ndarray, list[dict]]:
    """Every candidate model of one state, cross-fitted on the same folds; per tier, the one with
    the lowest out-of-fold log-loss. Returns the predictor, its out-of-fold probabilities (what
    the dynamic programme is fitted on) and per tier the choice with every candidate's loss.

    `numeric`: name -> column of x holding a numeric signal (a per-tier log-probability...); each
    gets a monotone candidate, a one-feature logistic fit (Platt scaling) of that column.
    `dense`: the columns that are not hashed text; the trees split on those only (hundreds of
    sparse hashed columns would cost most of their fitting time for little).
    `embedding`: where x holds the prompt embedding (its last columns), with `emb_fits` its
    state-independent fits: then two more candidates, "embed" (the linear candidate's and the
    embedding ridge's out-of-fold scores combined by one logistic fit, folded into one linear
    head) and "cluster" (ClusterHead). Every other candidate reads the columns before it.
    """
    n_rows, n = y.shape
    k = int(folds.max()) + 1
    numeric = numeric or {}
    width = x.shape[1] if embedding is None else embedding.start
    base = x[:, :width] if embedding is not None else x
    mlp, oof_mlp = cross_fit(np.ascontiguousarray(base), y, folds, cfg, seed)
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

    alphas = np.atleast_1d(RidgeCV(alphas=RIDGE_ALPHAS, alpha_per_target=True).fit(base, y).alpha_)
    score = np.zeros((n_rows, n))
    coefs, icpts = np.zeros((k, n, width)), np.zeros((k, n))
    for f in range(k):
        train = folds != f
        fit = Ridge(alpha=alphas).fit(base[train], y[train])
        score[~train] = fit.predict(base[~train])
        coefs[f], icpts[f] = fit.coef_, fit.intercept_
    platt_heads("linear", score, coefs, icpts, np.arange(width))
    if emb_fits is not None and embedding is not None:
        oof, w, b = np.zeros((n_rows, n)), np.zeros((x.shape[1], n)), np.zeros(n)
        for t in range(n):
            both = np.stack([score[:, t], emb_fits.score[:, t]], 1)
            # its out-of-fold loss with the combination cross-fitted too: fitted in-sample, its
            # one weight more than the linear candidate's Platt scaling would win by chance
            for f in range(k):
                (a1, a2), c = fit_logistic(both[folds != f], y[folds != f, t])
                oof[folds == f, t] = expit(both[folds == f] @ np.array([a1, a2]) + c)
            (a1, a2), c = fit_logistic(both, y[:, t])
            w[:width, t] = a1 * coefs[:, t].mean(0)
            w[embedding, t] = a2 * emb_fits.coefs[:, t].mean(0)
            b[t] = a1 * icpts[:, t].mean() + a2 * emb_fits.icpts[:, t].mean() + c
        cands["embed"] = (oof, w, b)
    trees: dict[int, tuple[np.ndarray, TreeHead]] = {}    # tier -> (oof probabilities, head)
    if "gbt" in cfg.models:
        cols = np.asarray(dense if dense is not None else range(x.shape[1]))
        where = {c: i for i, c in enumerate(cols)}
        trees = _fit_trees(x[:, cols], y, folds, seed,
                           [where[c] for name, c in numeric.items() if "@tier" in name and c in where], cols)

    heads, report = [], []
    weight, bias = np.zeros((x.shape[1], n)), np.zeros(n)
    oof = np.zeros((n_rows, n))
    for t in range(n):
        # each candidate's out-of-fold probabilities for this tier, simplest first
        scored = {name: c[0][:, t] for name, c in cands.items() if name.split(":")[0] in cfg.models}
        if t in trees:
            scored["gbt"] = trees[t][0]
        if emb_fits is not None and emb_fits.cluster is not None and "cluster" in cfg.models:
            scored["cluster"] = emb_fits.cluster_oof[:, t]
        if "mlp" in cfg.models or not scored:
            scored["mlp"] = oof_mlp[:, t]
        losses = {name: log_loss(p, y[:, t]) for name, p in scored.items()}
        best = min(losses, key=losses.get)           # dict order: simplest first wins a tie
        others = {k: v for k, v in losses.items() if k not in EMBEDDING_HEADS}
        if best in EMBEDDING_HEADS and others:
            # the prompt embedding is opted into only where it wins clearly: by more than one
            # standard error of the paired per-row losses against the best candidate without it
            # (its 384 columns give a small calibration set many ways to win by luck)
            rival = min(others, key=others.get)
            d = row_log_loss(scored[best], y[:, t]) - row_log_loss(scored[rival], y[:, t])
            if not d.mean() + d.std(ddof=1) / np.sqrt(len(d)) < 0:
                best = rival
        heads.append(best)
        report.append({"tier": t, "model": best, "log_loss": losses})
        oof[:, t] = scored[best]
        if best in cands:                            # a linear head: its weights
            weight[:, t], bias[t] = cands[best][1][:, t], cands[best][2][t]
    chosen = {t: trees[t][1] for t, h in enumerate(heads) if h == "gbt"}
    pred = StatePredictor(mlp.models, mlp.platt, heads, weight, bias, chosen or None,
                          emb_fits.cluster if "cluster" in heads else None,
                          None if embedding is None else (embedding.start, embedding.stop))
    return pred, oof, report


def _fit_trees(x: np.ndarray, y: np.ndarray, folds: np.ndarray, seed: int, signals: list[int],
               cols: np.ndarray) -> dict[int, tuple[np.ndarray, TreeHead]]:
    """The boosted-tree candidate of each tier whose quality varies: out-of-fold probabilities
    from the K fold fits (Platt-scaled), and the head deployed: the K fold fits averaged (their
    trees side by side), with that Platt scaling, as the linear heads average their folds (a
    refit on every row would be sharper than the out-of-fold scores the scaling was fitted on).
    The logged output-level numbers (`signals`: columns of x, a run tier's token
    log-probability, choice probability...) enter monotonically, each in the direction of its
    correlation with the tier's quality on the rows fitted, as in the linear candidates. `x`
    holds the columns `cols` of the state's matrix; the heads index the whole matrix."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    def fit(rows: np.ndarray, t: int):
        cst = np.zeros(x.shape[1], dtype=int)
        for col in signals:
            v, q = x[rows, col], y[rows, t]
            r = np.corrcoef(v, q)[0, 1] if v.std() > 0 and q.std() > 0 else 0.0
            cst[col] = -1 if r < 0 else 1
        return HistGradientBoostingRegressor(**GBT_PARAMS, monotonic_cst=cst,
                                             random_state=seed).fit(x[rows], y[rows, t])

    k = int(folds.max()) + 1
    out = {}
    for t in range(y.shape[1]):
        if y[:, t].min() == y[:, t].max():
            continue                                   # nothing to learn: the prior has it
        score, fits = np.zeros(len(y)), []
        for f in range(k):
            fits.append(fit(np.flatnonzero(folds != f), t))
            score[folds == f] = fits[-1].predict(x[folds == f])
        a, c = fit_platt(score, y[:, t])
        out[t] = (expit(a * score + c), TreeHead.from_sklearn(fits, a, c, cols))
    return out


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
