"""Run-time signals for the quality predictors: what a policy may know at each point of a cascade.

Three blocks, each computed from exactly what has been paid for:
- prompt block: the prompt text and prompt-level metadata (available before any tier runs);
- tier block, one per tier already run: its output text, the answer extracted from it, its
  realized cost, and any output-level numbers the job logged (log-probability statistics...);
- agreement block: whether the answers of the tiers already run agree with each other.

`StateFeaturizer` turns the blocks of a set of run tiers into one dense matrix for the predictor
of that state. It is fitted once (standardisation statistics) and saved in the policy artifact.
"""

from __future__ import annotations

import re
from itertools import combinations

import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer

PROMPT_HASH = 512
META_HASH = 32
OUTPUT_HASH = 64
ANSWER_HASH = 16

_OPTION_LINE = re.compile(r"^\s*\(?[A-Za-z0-9]{1,2}\s*[\).:]\s", re.M)
_HEDGE = re.compile(r"not sure|cannot|can't|unclear|unsure|i think|maybe|perhaps|none of|"
                    r"no answer|unknown|don't know|impossible")
_ANSWER_PATTERNS = [
    re.compile(r"answer is\s*:?\s*\(?\s*([A-Za-z])\s*\)?(?![A-Za-z0-9])", re.I),
    re.compile(r"####\s*\$?\s*([-+]?[\d,]*\.?\d+)"),
    re.compile(r"\\boxed\{([^{}]{1,40})\}"),
    re.compile(r"answer\s*(?:is|:)\s*:?\s*\**\s*([^\n]{1,40}?)\s*\**\s*(?:[.\n]|$)", re.I),
]
_NUMBER = re.compile(r"[-+]?\d[\d,]*\.?\d*")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3})")
_PUNCT = re.compile(r"[^\w\s.-]")


def normalize_answer(text: str) -> str:
    """Lower-case, strip punctuation and spacing, canonical numbers: '1,000.0' -> '1000'."""
    text = _PUNCT.sub(" ", _THOUSANDS.sub("", text.lower())).strip(" .")
    text = " ".join(text.split())
    if _NUMBER.fullmatch(text):
        text = text.replace(",", "")
        if "." in text:
            text = text.rstrip("0").rstrip(".")
    return text


def extract_answer(output: str) -> tuple[str, int]:
    """(normalised answer, strength): 2 an explicit answer statement, 1 a short bare answer, 0 none.

    The first explicit statement wins: base models often go on to invent further questions.
    """
    for pattern in _ANSWER_PATTERNS:
        m = pattern.search(output)
        if m:
            ans = normalize_answer(m.group(1))
            if ans:
                return ans, 2
    stripped = output.strip()
    first = stripped.split("\n", 1)[0] if stripped else ""
    if first and len(first.split()) <= 4:
        return normalize_answer(first), 1
    nums = _NUMBER.findall(stripped[-200:])
    if nums:
        return normalize_answer(nums[-1]), 1
    return "", 0


_SCAN = 2000  # characters read for shares and counts: long rambles add cost, not signal
_DROP_DIGITS = str.maketrans("", "", "0123456789")
_DROP_UPPER = str.maketrans("", "", "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DROP_MATH = str.maketrans("", "", "=+-*/^$\\")


def _text_stats(texts) -> np.ndarray:
    """Length, words, lines, digit/upper-case share, option lines, math-symbol share."""
    out = np.zeros((len(texts), 7), dtype=np.float32)
    for i, full in enumerate(texts):
        t = full[:_SCAN]
        n = len(t)
        d = max(n, 1)
        out[i] = (
            np.log1p(len(full)), np.log1p(len(t.split())), np.log1p(t.count("\n")),
            (n - len(t.translate(_DROP_DIGITS))) / d, (n - len(t.translate(_DROP_UPPER))) / d,
            np.log1p(len(_OPTION_LINE.findall(t))), (n - len(t.translate(_DROP_MATH))) / d,
        )
    return out


_prompt_vec = HashingVectorizer(n_features=PROMPT_HASH, alternate_sign=False, ngram_range=(1, 1),
                                norm="l2", dtype=np.float32)
_meta_vec = HashingVectorizer(n_features=META_HASH, alternate_sign=False, analyzer=lambda s: s,
                              norm=None, dtype=np.float32)
_output_vec = HashingVectorizer(n_features=OUTPUT_HASH, alternate_sign=False, norm="l2",
                                dtype=np.float32)
_answer_vec = HashingVectorizer(n_features=ANSWER_HASH, alternate_sign=False,
                                analyzer=lambda s: [s] if s else [], norm=None, dtype=np.float32)


def prompt_block(prompts, prompt_text: dict, prompt_num: dict) -> tuple[np.ndarray, np.ndarray]:
    """(dense raw features to standardise, hashed features in [0,1]) for each prompt."""
    dense = _text_stats(prompts)
    if prompt_num:
        dense = np.hstack([dense] + [np.asarray(v, np.float32)[:, None] for v in prompt_num.values()])
    meta_tokens = [[f"{k}={v[i]}" for k, v in prompt_text.items()] for i in range(len(prompts))]
    hashed = np.hstack([_prompt_vec.transform(prompts).toarray(),
                        _meta_vec.transform(meta_tokens).toarray()])
    return dense, hashed


def tier_block(outputs, cost, output_num: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(dense raw features, hashed features, normalised answers) for one tier's outputs.

    `cost` is the realized cost of the outputs (known once the tier has run) or None.
    """
    answers, strength = zip(*(extract_answer(o) for o in outputs)) if len(outputs) else ((), ())
    strength = np.asarray(strength, np.float32)
    stats = _text_stats(outputs)[:, [0, 1, 2, 3, 5]]
    extra = np.stack([
        strength == 2, strength == 1,
        [_HEDGE.search(o[:_SCAN].lower()) is not None for o in outputs],
        [o.count("Question:") + o.count("Q:") for o in outputs],
        np.log(np.asarray(cost, np.float64) + 1e-12) if cost is not None else np.zeros(len(outputs)),
    ], axis=1).astype(np.float32) if len(outputs) else np.zeros((0, 5), np.float32)
    dense = np.hstack([stats, extra] + [np.asarray(v, np.float32)[:, None] for v in output_num.values()])
    answers = np.asarray(answers, dtype=object)
    hashed = np.hstack([_output_vec.transform([o[:_SCAN] for o in outputs]).toarray(),
                        _answer_vec.transform(list(answers)).toarray()])
    return dense, hashed, answers


def agreement(answers: dict[int, np.ndarray], outputs: dict[int, np.ndarray], tiers) -> np.ndarray:
    """Per pair of run tiers (in order): answers equal and non-empty; outputs identical."""
    cols = []
    for a, b in combinations(tiers, 2):
        cols.append((answers[a] == answers[b]) & (answers[a] != ""))
        cols.append(outputs[a] == outputs[b])
    if not cols:
        return np.zeros((len(next(iter(answers.values()), [])), 0), np.float32)
    return np.stack(cols, axis=1).astype(np.float32)


class Standardizer:
    """Mean/std scaling of dense features, fitted on calibration rows and stored in the artifact."""

    def __init__(self, mean=None, std=None):
        self.mean, self.std = mean, std

    def fit(self, x: np.ndarray) -> "Standardizer":
        """Statistics of the finite values of each column (a column with none: mean 0, std 1)."""
        finite = np.where(np.isfinite(x), x, np.nan).astype(np.float64)
        seen = np.isfinite(finite).any(0)
        filled = np.where(seen, finite, 0.0)            # a column never seen: zeros, no warning
        mean = np.where(seen, np.nanmean(filled, 0), 0.0) if len(x) else np.zeros(x.shape[1])
        std = np.where(seen, np.nanstd(filled, 0), 1.0) if len(x) else np.ones(x.shape[1])
        self.mean = mean.astype(np.float32)
        self.std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
        return self

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Standardised and clipped to [-6, 6]. A missing value (NaN) sits at the column's mean;
        -inf / +inf (a log-probability of an impossible token) go to the ends, so a feature stays
        monotone in the raw value."""
        z = (np.asarray(x, np.float32) - self.mean) / self.std
        return np.clip(np.nan_to_num(z, nan=0.0, posinf=6.0, neginf=-6.0), -6, 6).astype(np.float32)

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_json(cls, d) -> "Standardizer":
        return cls(np.asarray(d["mean"], np.float32), np.asarray(d["std"], np.float32))


class Observations:
    """What has been seen for a batch of rows: the prompt block and the blocks of run tiers.

    Tiers are added with `reveal` only once they have run, which is what keeps replay causal:
    a featurizer can only read blocks that were revealed.
    """

    def __init__(self, prompts, prompt_text, prompt_num, row_ids=None, embedding=None):
        self.n_rows = len(prompts)
        self.row_ids = None if row_ids is None else np.asarray(row_ids, dtype=object)
        self.prompt_dense, self.prompt_hashed = prompt_block(prompts, prompt_text, prompt_num)
        # (rows, dim) prompt embeddings (cascade.encoder), or None: read only by a featurizer
        # fitted with them
        self.embedding = None if embedding is None else np.asarray(embedding, np.float32)
        self.tiers: dict[int, tuple] = {}
        self.outputs: dict[int, np.ndarray] = {}

    def reveal(self, tier: int, outputs, cost, output_num: dict):
        self.tiers[tier] = tier_block(list(outputs), cost, output_num)
        self.outputs[tier] = np.asarray(outputs, dtype=object)

    def take(self, idx) -> "Observations":
        out = Observations.__new__(Observations)
        out.n_rows = len(idx)
        out.row_ids = None if self.row_ids is None else self.row_ids[idx]
        out.prompt_dense, out.prompt_hashed = self.prompt_dense[idx], self.prompt_hashed[idx]
        out.embedding = None if self.embedding is None else self.embedding[idx]
        out.tiers = {t: tuple(part[idx] for part in blk) for t, blk in self.tiers.items()}
        out.outputs = {t: o[idx] for t, o in self.outputs.items()}
        return out


class StateFeaturizer:
    """Dense design matrix for the predictor of one state (a set of run tiers).

    With `embedding_dim` > 0 the prompt's embedding is appended as the matrix's last columns
    (`embedding_columns`): everything before them is laid out as without embeddings, so the
    candidates that do not read embeddings see the same columns either way."""

    def __init__(self, prompt_scaler: Standardizer, tier_scalers: dict[int, Standardizer],
                 embedding_dim: int = 0):
        self.prompt_scaler = prompt_scaler
        self.tier_scalers = tier_scalers
        self.embedding_dim = embedding_dim

    @classmethod
    def fit(cls, obs: Observations) -> "StateFeaturizer":
        return cls(Standardizer().fit(obs.prompt_dense),
                   {t: Standardizer().fit(blk[0]) for t, blk in obs.tiers.items()},
                   0 if obs.embedding is None else obs.embedding.shape[1])

    def width(self, state: tuple[int, ...]) -> int:
        """Columns of the state's matrix before the embedding."""
        w = len(self.prompt_scaler.mean) + PROMPT_HASH + META_HASH
        w += sum(len(self.tier_scalers[t].mean) + OUTPUT_HASH + ANSWER_HASH for t in state)
        return w + len(state) * (len(state) - 1)         # agreement: two columns per pair

    def embedding_columns(self, state: tuple[int, ...]) -> slice:
        w = self.width(state)
        return slice(w, w + self.embedding_dim)

    def __call__(self, obs: Observations, state: tuple[int, ...]) -> np.ndarray:
        parts = [self.prompt_scaler(obs.prompt_dense), obs.prompt_hashed]
        for t in state:
            dense, hashed, _ = obs.tiers[t]
            parts += [self.tier_scalers[t](dense), hashed]
        if len(state) > 1:
            parts.append(agreement({t: obs.tiers[t][2] for t in state},
                                   {t: obs.outputs[t] for t in state}, state))
        if self.embedding_dim:
            if obs.embedding is None:
                raise ValueError("this policy reads prompt embeddings; the observations have none")
            parts.append(obs.embedding)
        return np.ascontiguousarray(np.hstack(parts), dtype=np.float32)

    def numeric_columns(self, state: tuple[int, ...], prompt_num: list[str],
                        output_num: list[str]) -> dict[str, int]:
        """Where the logged numeric signals sit in this state's design matrix: 'col' for a
        prompt-level number, 'col@tier{t}' for an output-level one of a run tier t."""
        out = {}
        n_stats = len(self.prompt_scaler.mean) - len(prompt_num)
        out.update({c: n_stats + k for k, c in enumerate(prompt_num)})
        offset = len(self.prompt_scaler.mean) + PROMPT_HASH + META_HASH
        for t in state:
            width = len(self.tier_scalers[t].mean)
            first = offset + width - len(output_num)
            out.update({f"{c}@tier{t}": first + k for k, c in enumerate(output_num)})
            offset += width + OUTPUT_HASH + ANSWER_HASH
        return out

    def dense_columns(self, state: tuple[int, ...]) -> list[int]:
        """The columns of this state's design matrix that are not hashed text: the prompt's
        statistics and logged numbers, and each run tier's."""
        cols = list(range(len(self.prompt_scaler.mean)))
        offset = len(self.prompt_scaler.mean) + PROMPT_HASH + META_HASH
        for t in state:
            width = len(self.tier_scalers[t].mean)
            cols += range(offset, offset + width)
            offset += width + OUTPUT_HASH + ANSWER_HASH
        return cols

    def to_json(self) -> dict:
        return {"prompt": self.prompt_scaler.to_json(),
                "tiers": {str(t): s.to_json() for t, s in self.tier_scalers.items()},
                "embedding_dim": self.embedding_dim}

    @classmethod
    def from_json(cls, d) -> "StateFeaturizer":
        return cls(Standardizer.from_json(d["prompt"]),
                   {int(t): Standardizer.from_json(s) for t, s in d["tiers"].items()},
                   int(d.get("embedding_dim", 0)))


def observe_all(ladder, embedding=None) -> Observations:
    """Observations with every tier revealed: for calibration, where all tiers were logged."""
    obs = Observations(ladder.prompts, ladder.prompt_text, ladder.prompt_num, ladder.row_ids,
                       embedding)
    for t in range(ladder.n_tiers):
        obs.reveal(t, ladder.outputs[t], None if ladder.cost is None else ladder.cost[t],
                   {k: v[t] for k, v in ladder.output_num.items()})
    return obs
