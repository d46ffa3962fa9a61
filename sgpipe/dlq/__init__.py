"""``sgpipe dlq list`` and ``sgpipe dlq replay``: the dead letters in ClickHouse's
``dead_letters`` table, summarised, and fed back through the processor (docs/dead-letters.md).

``letters`` is pure (stored letters, replay records, predicted and observed outcomes),
``store`` holds the SQL, ``report`` the output, ``command`` the CLI and its I/O.
"""

from __future__ import annotations

from collections.abc import Callable

# (sql, output format) -> the output, as ``sgpipe query`` would print it.
SqlRunner = Callable[[str, str], bytes]
