"""Decision core of the cascade: quality predictors, optimal-stopping policy, replay and evaluation.

Nothing here imports ``jobs`` or ``workers``: tier workers load what ``cascade calibrate`` writes.
"""

__all__ = ["Ladder", "load_ladder", "Policy", "calibrate", "load_policy"]


def __getattr__(name):  # lazy re-exports keep `import cascade` cheap for the workers
    if name in ("Ladder", "load_ladder"):
        from cascade import ladder

        return getattr(ladder, name)
    if name in ("Policy", "calibrate"):
        from cascade import policy

        return getattr(policy, name)
    if name == "load_policy":
        from cascade.artifact import load_policy

        return load_policy
    raise AttributeError(name)
