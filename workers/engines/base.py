"""The engine interface and registry."""

from __future__ import annotations

import importlib
import itertools
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Generation:
    text: str
    token_logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"          # "stop" (end of sequence or a stop string) or "length"
    prompt_tokens: int = 0
    choice_prob: float | None = None     # with choices: the answer's probability over the choices
    choice_margin: float | None = None   # ... minus the runner-up's

    @property
    def output_tokens(self) -> int:
        return len(self.token_logprobs)

    def features(self) -> dict:
        """Confidence statistics of the generated tokens (NaN-free: an empty output scores 0)."""
        lp = [x for x in self.token_logprobs if math.isfinite(x)]
        return {
            "first_logprob": lp[0] if lp else 0.0,
            "mean_logprob": sum(lp) / len(lp) if lp else 0.0,
            "min_logprob": min(lp) if lp else 0.0,
            "sum_logprob": sum(lp),
        }


def chosen(prompt_tokens: int, choices: list[str], token_logprobs: list[list[float]]) -> Generation:
    """The most likely of `choices` given each one's token log-probabilities after the prompt:
    its probability renormalised over the choices (softmax of the summed log-probabilities) and
    its margin over the runner-up."""
    totals = np.array([sum(lp) for lp in token_logprobs], dtype=np.float64)
    p = np.exp(totals - totals.max())
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    best = int(order[0])
    margin = float(p[best] - p[order[1]]) if len(p) > 1 else 1.0
    return Generation(text=choices[best], token_logprobs=list(token_logprobs[best]), finish_reason="stop",
                      prompt_tokens=prompt_tokens, choice_prob=float(p[best]), choice_margin=margin)


def choice_text(prompt: str, choice: str) -> str:
    """What a choice is scored as following the prompt: one space between, unless the prompt
    already ends in whitespace. Every engine scores choices on this text."""
    return ("" if prompt[-1:].isspace() else " ") + choice


def chosen_each(prompt_tokens: list[int], choices: list[list[str]], scores: list[list[float]]) -> list[Generation]:
    """`chosen` per row, from the flat list of every row's choices' token log-probabilities."""
    out, at = [], 0
    for tokens, cs in zip(prompt_tokens, choices):
        out.append(chosen(tokens, list(cs), scores[at:at + len(cs)]))
        at += len(cs)
    return out


def token_features(gens: list[Generation]) -> dict[str, np.ndarray]:
    """Generation.features() of many generations at once, column-wise (same values)."""
    n = len(gens)
    lists = [g.token_logprobs for g in gens]
    lengths = np.fromiter(map(len, lists), np.int64, n)
    if n and lengths[0] > 0 and (lengths == lengths[0]).all():
        grid = np.array(lists, dtype=np.float64)          # one length: a 2-D array at once
        if np.isfinite(grid).all():
            total = grid.sum(axis=1)
            return {"first_logprob": grid[:, 0].copy(), "mean_logprob": total / grid.shape[1],
                    "min_logprob": grid.min(axis=1), "sum_logprob": total}
    flat = np.fromiter(itertools.chain.from_iterable(lists), np.float64, int(lengths.sum()))
    finite = np.isfinite(flat)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    seg = np.repeat(np.arange(n), lengths)
    count = np.bincount(seg[finite], minlength=n)
    total = np.bincount(seg[finite], weights=flat[finite], minlength=n)
    low = np.full(n, np.inf)
    np.minimum.at(low, seg[finite], flat[finite])
    where = np.flatnonzero(finite)
    k = np.searchsorted(where, starts)
    has = count > 0
    first = np.zeros(n)
    first[has] = flat[where[k[has]]]
    return {"first_logprob": first, "mean_logprob": np.where(has, total / np.maximum(count, 1), 0.0),
            "min_logprob": np.where(has, low, 0.0), "sum_logprob": total}


class Engine:
    """One loaded model. Subclasses set `context_length` and implement the three methods."""

    name = "base"
    context_length: int = 0

    def render(self, messages: list[dict]) -> str:
        """A chat as a prompt string, with the model's chat template and a generation prompt."""
        raise NotImplementedError

    def count_tokens(self, prompts: list[str]) -> list[int]:
        raise NotImplementedError

    def generate(self, prompts: list[str], sampling) -> list[Generation]:
        """One batched call for the whole list; returns one Generation per prompt, in order."""
        raise NotImplementedError

    def choose(self, prompts: list[str], choices: list[list[str]]) -> list[Generation]:
        """For each prompt, the most likely of its choices (scored, not generated), with
        choice_prob and choice_margin set (see `chosen`)."""
        raise NotImplementedError(f"engine {self.name!r} cannot score a fixed set of answers (choices)")


_REGISTRY: dict[str, str] = {
    "transformers": "workers.engines.transformers_engine:TransformersEngine",
    "vllm": "workers.engines.vllm_engine:VLLMEngine",
}
_LOADED: OrderedDict = OrderedDict()
_LOCK = threading.Lock()


def load_plugins():
    """Import the modules named in CASCADE_PLUGINS (comma-separated); they register engines."""
    import os

    for mod in filter(None, (m.strip() for m in os.environ.get("CASCADE_PLUGINS", "").split(","))):
        importlib.import_module(mod)


def engine_names() -> list[str]:
    load_plugins()
    return sorted(_REGISTRY)


def register_engine(name: str, target: str | type):
    """Register an engine class (or 'module:Class' path, imported on first use) under a name."""
    _REGISTRY[name] = target


def engine_class(name: str) -> type:
    if name not in _REGISTRY:
        load_plugins()
    if name not in _REGISTRY:
        raise KeyError(f"unknown engine {name!r}; registered: {sorted(_REGISTRY)}")
    target = _REGISTRY[name]
    if isinstance(target, str):
        module, cls = target.split(":")
        target = getattr(importlib.import_module(module), cls)
    return target


def get_engine(tier, keep: int = 2) -> Engine:
    """The loaded engine for a tier spec; a process loads each model once and keeps the `keep`
    most recently used ones."""
    key = (tier.engine, tier.model, tier.device, tier.dtype, tier.context,
           tuple(sorted(tier.engine_args.items())))
    with _LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
        while len(_LOADED) >= keep:
            _LOADED.popitem(last=False)
        engine = engine_class(tier.engine)(tier)
        _LOADED[key] = engine
        return engine
