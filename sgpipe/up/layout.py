"""What `sgpipe up` keeps under ``--data-dir``, and its state file.

```
<data-dir>/
  .lock                     held (flock) by `sgpipe up` and its ClickHouse child while they run
  sgpipe-up.json            the state file: where everything listens, every child's PID (0600)
  clickhouse/               the embedded ClickHouse store (one process may open it)
  clickhouse-credentials.json
  broker/                   the embedded broker (docs/embedded.md)
  logs/<child>.log          each child's output, JSON lines (rotated to .1 past 16 MiB)
  run/<child>.yaml          each child's settings, written at start, removed at stop (0600)
  demo-key.pem              `sgpipe up --demo`'s signing key (0600)
```

The state file lets ``sgpipe query`` (and operators, and tests) find the running services: it
holds no secret (URLs are redacted; the store's credentials have their own file) and is
rewritten whenever a child is restarted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# --data-dir when none is given (relative to where the command runs).
DEFAULT_DATA_DIR = Path("sgpipe-data")
STATE_FILE = "sgpipe-up.json"
CLICKHOUSE_DIR = "clickhouse"
LOG_DIR = "logs"
RUN_DIR = "run"
DEMO_KEY_FILE = "demo-key.pem"


def state_file(data_dir: Path) -> Path:
    return data_dir / STATE_FILE


def private_directory(path: Path) -> Path:
    """``path`` created if needed, readable by its owner only (it holds secrets)."""
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically with mode 0600 (a temporary file, then a rename:
    a reader never sees half a file, and the mode is never wider, even for a moment)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.unlink(missing_ok=True)
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(text)
    temporary.replace(path)


def write_state(data_dir: Path, state: Mapping[str, Any]) -> None:
    write_private_file(state_file(data_dir), json.dumps(state, indent=2, sort_keys=True))


def remove_state(data_dir: Path) -> None:
    state_file(data_dir).unlink(missing_ok=True)
