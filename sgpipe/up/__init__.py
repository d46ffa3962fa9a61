"""`sgpipe up`: the whole pipeline on one machine, as a supervisor of separate processes.

``supervisor`` runs it (the process tree and the order of things are described there);
``children`` watches one child process, ``logstream`` merges their output, ``configs`` writes
their settings, ``backlog`` and ``report`` say what a stop wrote and what it left, ``store`` is
the embedded ClickHouse child, ``demo`` is ``--demo``, ``layout`` is what lives in the data dir.

The supervisor's names are imported on first use: `sgpipe query` and the other commands that
only read ``layout`` (where a data dir keeps things) must not pay for the whole supervisor.
"""

from typing import TYPE_CHECKING, Any

from sgpipe.up.layout import CLICKHOUSE_DIR, STATE_FILE, state_file

if TYPE_CHECKING:
    from sgpipe.up.supervisor import StageFailed, UpOptions, retention_groups, run_up

_SUPERVISOR_NAMES = frozenset({"StageFailed", "UpOptions", "retention_groups", "run_up"})


def __getattr__(name: str) -> Any:
    if name in _SUPERVISOR_NAMES:
        from sgpipe.up import supervisor

        return getattr(supervisor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CLICKHOUSE_DIR",
    "STATE_FILE",
    "StageFailed",
    "UpOptions",
    "retention_groups",
    "run_up",
    "state_file",
]
