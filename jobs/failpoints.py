"""Named crash points for fault tests (as in FoundationDB or TiKV "failpoints"): with
CASCADE_FAILPOINT=NAME and CASCADE_FAILPOINT_DIR=DIR set, the first process in the whole test
that reaches NAME kills itself with SIGKILL, exactly as a `kill -9` at that line would. Unset
(always, in production) a point costs one dictionary lookup.

Points: before_result_write, after_result_write, after_state_update (a unit committed and
recorded, the units it cut not yet written), between_commit_and_cut (the same, at the first
commit that does cut units: the escalated rows are recorded only in the cut units, whose work
files are not yet written), before_dispatch (new units recorded as queued, not
yet sent), holding_rebuild_lock, during_finalize (after the first results part).
"""

from __future__ import annotations

import os
import signal

_POINT = os.environ.get("CASCADE_FAILPOINT")


def hit(name: str):
    if _POINT != name:
        return
    marker = os.path.join(os.environ["CASCADE_FAILPOINT_DIR"], f"{name}.fired")
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)
