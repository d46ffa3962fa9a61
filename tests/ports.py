"""A free port for a server a test starts, often in another process, a moment later.

The product's ``free_port`` binds port 0: the kernel answers with an *ephemeral* port, and once
the test closes it, that port may go to anybody's next port-0 bind or outgoing connection before
the server binds it. Once, `sgpipe up`'s own embedded ClickHouse took the ingress port a test
had picked, and the ingress exited 2 ("port in use"). Ports below the kernel's ephemeral range
are never handed out that way, so the tests pick theirs there.
"""

from __future__ import annotations

import random
from pathlib import Path

from sgpipe.embedded.child import port_is_free

# Below the ephemeral range (Linux: net.ipv4.ip_local_port_range, 32768 by default), above the
# ports well-known services register.
_LOWEST = 20_000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port(host: str = "127.0.0.1") -> int:
    """A port a server can listen on now, outside the ephemeral range."""
    highest = max(_ephemeral_start(), _LOWEST + 1_000)
    for _ in range(1_000):
        port = random.randrange(_LOWEST, highest)
        if port_is_free(host, port):
            return port
    raise RuntimeError(f"no free port in {_LOWEST}-{highest - 1} on {host}")
