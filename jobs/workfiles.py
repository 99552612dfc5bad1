"""Work files: the input of a cut unit, the rows its sources escalated to its tier gathered into
one file. The cut itself (which sources, how many rows) is decided atomically in the state
store (jobs/state.py); this is the Parquet-free, lock-free I/O that follows it.

The work file is written once, with the unit's sources in its metadata: it is the durable record
that those sources' rows for that tier are taken, which is what a rebuild from the job directory
reads. A cut whose work file was never written leaves its sources waiting after a rebuild.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from jobs.layout import LINEAGE_NAME, source_file


def materialize(job, unit: dict, state) -> bool:
    """Write a cut unit's input file (idempotent). Returns False if the cut is stale."""
    store = job.store
    if store.exists(unit["file"]):
        return True
    tier = unit["tier"]
    parts = []
    for src in unit["sources"]:
        t = store.read_arrow(source_file(src))
        if not job.policy.needs_lineage:      # earlier runs stay in their results for finalize
            t = t.drop_columns([c for c in t.column_names if LINEAGE_NAME.fullmatch(c)])
        parts.append(t.filter(pc.equal(t.column("next_tier"), tier)))
    table = pa.concat_tables(parts, promote_options="permissive")
    # The cut belongs to the state epoch in its id; after a reload (Redis restarted empty, or
    # resume) its sources may already be cut again, so it must not be written.
    epoch = unit["id"].split("-")[1]
    if not state.exists() or state.job().get("epoch") != epoch:
        return False
    store.write_arrow(unit["file"], table, {"unit": unit["id"], "tier": tier,
                                            "rows": table.num_rows, "sources": unit["sources"]},
                      once=True)
    return True


def materialize_all(job, units: list[dict], state) -> list[dict]:
    """Write the inputs of cut units; returns those ready to send."""
    return [u for u in units if materialize(job, u, state)]
