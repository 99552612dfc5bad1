"""A job's progress as `cascade status` shows it: units and rows per tier and state, from a
state store's counters (O(tiers)), and on a cluster who serves each tier and what waits on whom.
"""

from __future__ import annotations

import time

from jobs.state import lease_seconds


def live_status(job, state) -> dict:
    """The status of a job from its state store (see the module docstring)."""
    raw, meta = state.status(), state.job()
    tiers = []
    for k, t in enumerate(job.spec.tiers):
        s = raw["tiers"][k]
        tiers.append({"tier": k, "name": t.name, "states": s["states"],
                      "waiting_rows": s["waiting_rows"], "escalated": s["escalated"],
                      "rows_done": s["states"].get("done", {}).get("rows", 0)})
    out = {"job_id": job.id, "state": meta["state"], "rows": job.meta["rows"], "tiers": tiers,
           "failed": raw["failing"], "finalize_error": meta.get("finalize_error"),
           "dir": job.dir, "live": True}
    registry = state.registry
    if registry is not None:                # a cluster: who serves each tier, what waits on whom
        now = time.time()
        alive_within = max(3 * lease_seconds() / 4, 5.0)      # three reconciler passes
        out["reconciler_errors"] = registry.errors(job.dir)
        expired = state.lease_expired(now)
        for t in tiers:
            w = registry.tier_workers(t["name"], now, alive_within)
            t["workers"], t["worker_last_seen_s"] = len(w["alive"]), w["last_seen_s"]
            t["lease_expired_units"] = expired.get(t["tier"], 0)
            waiting = sum(v["units"] for k, v in t["states"].items() if k in ("queued", "retry", "running"))
            if meta["state"] == "running" and waiting and not w["alive"]:
                since = ("no worker has ever served it" if w["last_seen_s"] is None else
                         f"no worker has served it for {w['last_seen_s']:.0f} s")
                out.setdefault("waiting_for", []).append(
                    f"tier {t['tier']} ({t['name']}): {waiting} unit(s) wait and {since}; start "
                    f"`cascade worker --tier {t['name']}`")
    return out
