"""Engines behind one small interface, looked up by name in a registry.

An engine turns a batch of prompt strings into generations with per-token log-probabilities.
`transformers` runs here (CPU or CUDA); `vllm` is an optional extra imported only when used.
"""

from __future__ import annotations

from workers.engines.base import Engine, Generation, get_engine, register_engine

__all__ = ["Engine", "Generation", "get_engine", "register_engine"]
