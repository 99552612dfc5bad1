"""Decision core of the cascade: quality predictors, optimal-stopping policy, replay and evaluation.

Nothing here imports ``jobs`` or ``workers``: tier workers load what ``cascade calibrate`` writes.
"""

__all__ = ["Ladder", "load_ladder", "Policy", "fit_policy", "load_policy", "save_policy", "replay"]

_HOME = {"Ladder": "cascade.ladder", "load_ladder": "cascade.ladder", "Policy": "cascade.runtime",
         "replay": "cascade.runtime", "fit_policy": "cascade.calibrate",
         "load_policy": "cascade.artifact", "save_policy": "cascade.artifact"}


def __getattr__(name):  # lazy re-exports keep `import cascade` cheap for the workers
    if name not in _HOME:
        raise AttributeError(f"module 'cascade' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_HOME[name]), name)
