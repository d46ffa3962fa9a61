"""`sgpipe up`: the whole pipeline on one machine, as a supervisor of separate processes.

``supervisor`` runs it (the process tree and the order of things are described there);
``children`` watches one child process, ``logstream`` merges their output, ``configs`` writes
their settings, ``backlog`` and ``report`` say what a stop wrote and what it left, ``store`` is
the embedded ClickHouse child, ``demo`` is ``--demo``, ``layout`` is what lives in the data dir.
"""

from sgpipe.up.layout import CLICKHOUSE_DIR, STATE_FILE, state_file
from sgpipe.up.supervisor import StageFailed, UpOptions, retention_groups, run_up

__all__ = [
    "CLICKHOUSE_DIR",
    "STATE_FILE",
    "StageFailed",
    "UpOptions",
    "retention_groups",
    "run_up",
    "state_file",
]
