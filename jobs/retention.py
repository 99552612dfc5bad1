"""Retention for a root of job directories (`cascade gc`): a finished job's unit files (its
routed shards, work files and unit results) are needed by nothing once results/ is written, and a
job older than the retention is removed whole. Unfinished jobs are never touched.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from jobs.roots import walk_jobs

UNIT_DIRS = ("routed", "work", "tiers")


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def finished_jobs(root: str) -> list[tuple[Path, float]]:
    """(job directory, when it finished) for every finished job below `root`, at any depth."""
    return [(d, (d / "finished.json").stat().st_mtime) for d in walk_jobs(root)
            if (d / "finished.json").exists()]


def gc(root: str, keep_days: float, dry_run: bool = False, now: float | None = None) -> dict:
    """Remove the unit files of every finished job below `root`, and whole job directories that
    finished more than `keep_days` days ago. Returns what was (or, dry, would be) removed:
    {"jobs_removed": [...], "unit_files_removed": [...], "bytes": N}."""
    now = time.time() if now is None else now
    out = {"jobs_removed": [], "unit_files_removed": [], "bytes": 0}
    for d, finished in finished_jobs(root):
        if now - finished > keep_days * 86400:
            out["jobs_removed"].append(str(d))
            out["bytes"] += _size(d)
            if not dry_run:
                shutil.rmtree(d)
            continue
        for sub in UNIT_DIRS:
            if (d / sub).exists():
                out["unit_files_removed"].append(str(d / sub))
                out["bytes"] += _size(d / sub)
                if not dry_run:
                    shutil.rmtree(d / sub)
    return out
