"""A free port for a server a test starts, often in another process, a moment later.

The product's ``free_port`` binds port 0: the kernel answers with an *ephemeral* port, and once
the test closes it, that port may go to anybody's next port-0 bind or outgoing connection before
the server binds it. Once, `sgpipe up`'s own embedded ClickHouse took the ingress port a test
had picked, and the ingress exited 2 ("port in use"). Ports below the kernel's ephemeral range
are never handed out that way, so the tests pick theirs there.

Nor from the embedded storage's range (``sgpipe.embedded.storage.PORT_RANGE``, 10000-22700,
and its gRPC twins 10000 above): every `sgpipe up` another worker starts picks five ports
there at random, and once one of them took the ingress port of a test that had just killed
its `sgpipe up` to restart it on the same port (exit 2, "ingest.port ... is in use"). So the
tests pick below it, between 2000 and 10000.
"""

from __future__ import annotations

import random
from pathlib import Path

from sgpipe.embedded.child import port_is_free
from sgpipe.embedded.storage import PORT_RANGE

# Below the storage's range and the ephemeral one (Linux: net.ipv4.ip_local_port_range, 32768
# by default), above the ports well-known services register.
_LOWEST = 2_000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port(host: str = "127.0.0.1") -> int:
    """A port a server can listen on now, outside the ephemeral range and the storage's."""
    highest = max(min(_ephemeral_start(), PORT_RANGE[0]), _LOWEST + 1_000)
    for _ in range(1_000):
        port = random.randrange(_LOWEST, highest)
        if port_is_free(host, port):
            return port
    raise RuntimeError(f"no free port in {_LOWEST}-{highest - 1} on {host}")
