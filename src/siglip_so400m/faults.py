"""The one fault-injection hook of the long-running jobs, for tests that kill a run at a chosen moment
and check what its rerun does: SIGLIP_SO400M_KILL_<POINT>=N SIGKILLs the process once the counter
reaches N at that point, as a crash or an OOM kill would (no cleanup, no final save). The points:

    AFTER_IMAGES  embed, once N images are embedded
    IN_COMMIT     embed, between the renames of the N-th part written
    AFTER_STEP    finetune, once step N is done

Unset (as always outside tests), a point costs one environment look-up."""

from __future__ import annotations

import os
import signal


def kill_point(point: str, count: int) -> None:
    at = os.environ.get(f"SIGLIP_SO400M_KILL_{point}")
    if at is not None and count >= int(at):
        os.kill(os.getpid(), signal.SIGKILL)
