"""Test doubles for unit tests of orchestration logic (the real engines are tested elsewhere).

ScriptedEngine is a fake engine: its "answer" to a prompt is fixed by a rule, its confidence is a
deterministic function of the prompt, and it counts its calls so tests can see batching.
"""

from __future__ import annotations

import os
import time
import zlib

import numpy as np

from workers.engines.base import Engine, Generations, chosen, register_engine


# A prompt holding this makes the engine call that carries it fail, every time (a unit whose
# engine keeps failing ends as per-row errors).
FAULT = "<scripted-engine-fault>"


class ScriptedEngine(Engine):
    name = "scripted"
    per_tier = True          # it answers with its tier's name: tiers sharing a model differ

    def __init__(self, tier, context_length: int = 64, calls: list | None = None):
        self.tier = tier
        self.delay = float(os.environ.get("CASCADE_SCRIPTED_DELAY", "0"))
        self.context_length = context_length
        self.calls = calls if calls is not None else []

    def render(self, messages):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def count_tokens(self, prompts):
        return [len(p.split()) for p in prompts]

    def generate(self, prompts, sampling):
        """Two tokens (fewer under a lower cap): the first's log-probability fixed by a hash of
        the prompt, the second's -0.1; the answer is the tier's name and the prompt's last word.
        Column-wise (a Generations batch), as an engine with array outputs would answer."""
        self.calls.append((self.tier.name, len(prompts)))
        if self.delay:
            time.sleep(self.delay)
        if any(FAULT in p for p in prompts):
            raise RuntimeError("scripted engine fault")
        name, salt, crc = f"{self.tier.name}:", zlib.crc32(f"{self.tier.name}|".encode()), zlib.crc32
        n, k = len(prompts), min(2, sampling.max_tokens)
        words = [p.split() for p in prompts]
        texts = [name + w[-1] for w in words]
        counts = np.fromiter(map(len, words), np.int64, n)
        hashes = np.fromiter((crc(p.encode(), salt) for p in prompts), np.int64, n)
        lps = np.stack([-(hashes % 1000 / 1000.0), np.full(n, -0.1)], axis=1)[:, :k]
        return Generations(texts, ["stop" if k == 2 else "length"] * n, counts, lps.ravel(),
                           np.arange(n + 1, dtype=np.int64) * k)

    def choose(self, prompts, choices):
        """Each choice's two token log-probabilities fixed by a hash of prompt and choice."""
        self.calls.append((self.tier.name, len(prompts)))
        out = []
        for p, cs in zip(prompts, choices):
            lps = [[-(zlib.crc32(f"{self.tier.name}|{p}|{c}".encode()) % 1000) / 250.0, -0.1] for c in cs]
            out.append(chosen(len(p.split()), list(cs), lps))
        return out


def scripted_factory(calls: list | None = None, context_length: int = 64):
    cache = {}

    def factory(tier):
        if tier.name not in cache:
            cache[tier.name] = ScriptedEngine(tier, context_length, calls)
        return cache[tier.name]

    return factory


# Worker processes started with CASCADE_PLUGINS=tests.doubles serve tiers with engine: scripted.
register_engine("scripted", ScriptedEngine)
