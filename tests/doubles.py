"""Test doubles for unit tests of orchestration logic (the real engines are tested elsewhere).

ScriptedEngine is a fake engine: its "answer" to a prompt is fixed by a rule, its confidence is a
deterministic function of the prompt, and it counts its calls so tests can see batching.
"""

from __future__ import annotations

import os
import time
import zlib

from workers.engines.base import Engine, Generation, chosen, register_engine


class ScriptedEngine(Engine):
    name = "scripted"

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
        self.calls.append((self.tier.name, len(prompts)))
        if self.delay:
            time.sleep(self.delay)
        name, salt = self.tier.name, zlib.crc32(f"{self.tier.name}|".encode())
        out = []
        for p in prompts:
            words = p.split()
            h = zlib.crc32(p.encode(), salt) % 1000 / 1000.0
            logprobs = [-h, -0.1][:sampling.max_tokens]     # two tokens, fewer under a lower cap
            out.append(Generation(f"{name}:{words[-1]}", logprobs,
                                  "stop" if len(logprobs) == 2 else "length", len(words)))
        return out

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
