"""The ingress alone: `POST /webhooks/<name>` over loopback, acknowledged by the embedded
in-memory broker, with no processor or sink competing; next to a bare aiohttp server whose
handler only reads the body, measured in the same run by the same client.

Scenarios: signed 2 KB and 768 KB batches (SendGrid's smallest and largest), each with the
ECDSA signature (``auth: signature``) and with a bearer token from the ingress's own
``/oauth/token`` (``auth: token``), at ``--concurrency`` (32) for ``--seconds`` each. Prints
requests/s, MB/s, p50/p99 latency and the ratio of requests/s to the bare server's at the same
size. Targets (issue 18): >= 0.45x bare on 2 KB, >= 0.7x on 768 KB.

Each server runs in its own process (spawned), the client in this one. Asserts nothing about
time. Run: ``.venv/bin/python -m bench.ingest [--seconds S] [--concurrency C] [--json]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sgpipe.embedded.broker import EmbeddedBroker, free_port
from sgpipe.runtime.kafka import ensure_topics
from sgpipe.runtime.settings import Settings
from sgpipe.simulator.keys import generate_private_key, public_key_base64, sign

SIZES = {"2KB": 2 * 1024, "768KB": 768 * 1024}
CLIENT_ID, CLIENT_SECRET = "bench", "bench-secret-0123456789abcdef"


@dataclass(frozen=True)
class Result:
    server: str  # "bare" or "ingress"
    auth: str  # "none", "signature" or "token"
    size: str
    requests: int
    errors: int
    seconds: float
    requests_per_second: float
    megabytes_per_second: float
    p50_ms: float
    p99_ms: float
    # CPU (user + system) of the server's process per answered request: less sensitive to the
    # machine's load than requests/s.
    cpu_ms_per_request: float


def batch(size: int) -> bytes:
    """A SendGrid-shaped body of about ``size`` bytes (events joined by ``,\\r\\n``)."""
    events = []
    total = 2
    index = 0
    while total < size:
        event = json.dumps(
            {
                "email": f"user{index}@example.com",
                "event": "delivered",
                "sg_event_id": f"ZXZlbnQtMTAwMDA{index:012d}",
                "sg_message_id": f"bench{index}.filterdrecv-p3mdw1-1-5F5FC76C-9.0",
                "smtp-id": f"<bench{index}@ismtpd0039p1iad1.sendgrid.net>",
                "timestamp": 1_700_000_000 + index,
                "response": "250 OK",
            },
            separators=(",", ":"),
        ).encode()
        events.append(event)
        total += len(event) + 3
        index += 1
    return b"[" + b",\r\n".join(events) + b"]\r\n"


def _serve_bare(port: int) -> None:
    async def receive(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"status": "accepted"})

    app = web.Application(client_max_size=4 * 1_048_576)
    app.router.add_post("/webhooks/{name}", receive)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def _serve_ingress(document: dict[str, Any], port: int) -> None:
    from ingest.app import create_app
    from ingest.protocol import start_ingress
    from sgpipe.runtime.logs import configure_logging

    configure_logging("warning", "json")
    settings = Settings.model_validate(document)

    async def serve() -> None:
        runner = await start_ingress(create_app(settings), "127.0.0.1", port)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    asyncio.run(serve())


async def _wait_ready(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as response:
                    if response.status in (200, 404, 405):
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout} s")
            await asyncio.sleep(0.1)


async def drive(
    url: str, body: bytes, headers: dict[str, str], seconds: float, concurrency: int
) -> tuple[list[float], int]:
    """POST ``body`` from ``concurrency`` workers for ``seconds``: latencies of the 2xx, and
    the number of other answers."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as http:
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                started = time.perf_counter()
                async with http.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if 200 <= response.status < 300:
                        latencies.append(time.perf_counter() - started)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, errors


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


def process_cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (Linux ``/proc/<pid>/stat``)."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def result(
    server: str,
    auth: str,
    size: str,
    body: bytes,
    run: tuple[list[float], int],
    seconds: float,
    cpu_seconds: float,
) -> Result:
    latencies, errors = run
    return Result(
        server=server,
        auth=auth,
        size=size,
        requests=len(latencies),
        errors=errors,
        seconds=seconds,
        requests_per_second=len(latencies) / seconds,
        megabytes_per_second=len(latencies) * len(body) / seconds / 1_000_000,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        cpu_ms_per_request=cpu_seconds / max(1, len(latencies) + errors) * 1000,
    )


async def fetch_token(base: str) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{base}/oauth/token",
            data={"grant_type": "client_credentials"},
            auth=aiohttp.BasicAuth(CLIENT_ID, CLIENT_SECRET),
        ) as response,
    ):
        document = await response.json()
        if response.status != 200:
            raise RuntimeError(f"token endpoint answered {response.status}: {document}")
        return str(document["access_token"])


async def bench(arguments: argparse.Namespace) -> list[Result]:
    from ingest.oauth import generate_signing_key_pem, hash_client_secret
    from sgpipe.up.configs import settings_document

    key = generate_private_key()
    broker = EmbeddedBroker()
    servers = await broker.start()
    settings = Settings.model_validate(
        {
            "kafka": {
                "bootstrap_servers": servers,
                "topics": {"raw": "bench.raw"},
                **({"compression_type": arguments.compression} if arguments.compression else {}),
            },
            "webhooks": [
                {"name": "signed", "public_keys": [public_key_base64(key)]},
                {
                    "name": "token",
                    "auth": "token",
                    "oauth_clients": [
                        {"client_id": CLIENT_ID, "secret_hash": hash_client_secret(CLIENT_SECRET)}
                    ],
                },
            ],
            "ingest": {"oauth_signing_keys": [generate_signing_key_pem()]},
            # The ingress signs every raw record (HMAC-SHA256), as in production.
            "raw_auth": {"keys": [{"id": "bench", "secret": "bench-raw-auth-0123456789abcdef-x"}]},
        }
    )
    await ensure_topics(settings.kafka)
    context = multiprocessing.get_context("spawn")
    bare_port, ingress_port = free_port(), free_port()
    processes = [
        context.Process(target=_serve_bare, args=(bare_port,), daemon=True),
        context.Process(
            target=_serve_ingress, args=(settings_document(settings), ingress_port), daemon=True
        ),
    ]
    for process in processes:
        process.start()
    results: list[Result] = []
    try:
        bare = f"http://127.0.0.1:{bare_port}"
        ingress = f"http://127.0.0.1:{ingress_port}"
        await _wait_ready(f"{bare}/webhooks/x")
        await _wait_ready(f"{ingress}/readyz")
        token = await fetch_token(ingress)
        seconds, concurrency = arguments.seconds, arguments.concurrency
        for size_name, size in SIZES.items():
            if arguments.size and size_name != arguments.size:
                continue
            body = batch(size)
            timestamp = str(int(time.time()))
            signed = {
                "Content-Type": "application/json;charset=utf-8",
                "X-Twilio-Email-Event-Webhook-Signature": sign(key, timestamp, body),
                "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
            }
            bearer = {
                "Content-Type": "application/json;charset=utf-8",
                "Authorization": f"Bearer {token}",
            }
            bare_pid, ingress_pid = processes[0].pid, processes[1].pid
            runs = [
                ("bare", "none", f"{bare}/webhooks/main", signed, bare_pid),
                ("ingress", "signature", f"{ingress}/webhooks/signed", signed, ingress_pid),
                ("ingress", "token", f"{ingress}/webhooks/token", bearer, ingress_pid),
            ]
            for server, auth, url, headers, pid in runs:
                cpu_before = process_cpu_seconds(pid)
                run = await drive(url, body, headers, seconds, concurrency)
                cpu = process_cpu_seconds(pid) - cpu_before
                results.append(result(server, auth, size_name, body, run, seconds, cpu))
    finally:
        for process in processes:
            process.terminate()
            process.join(10)
        await broker.stop()
    return results


def print_report(results: list[Result]) -> None:
    bare = {r.size: r.requests_per_second for r in results if r.server == "bare"}
    bare_cpu = {r.size: r.cpu_ms_per_request for r in results if r.server == "bare"}
    print(
        f"{'server':8} {'auth':9} {'size':6} {'req/s':>9} {'MB/s':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'errors':>6} {'x bare':>7} {'CPU ms/req':>10} {'CPU x bare':>10}"
    )
    for r in results:
        ratio = r.requests_per_second / bare[r.size] if bare.get(r.size) else float("nan")
        cpu_ratio = r.cpu_ms_per_request / bare_cpu[r.size] if bare_cpu.get(r.size) else 0.0
        print(
            f"{r.server:8} {r.auth:9} {r.size:6} {r.requests_per_second:9.1f} "
            f"{r.megabytes_per_second:8.1f} {r.p50_ms:8.2f} {r.p99_ms:8.2f} {r.errors:6d} "
            f"{ratio:7.2f} {r.cpu_ms_per_request:10.2f} {cpu_ratio:10.2f}"
        )
    print("targets: >= 0.45x bare on 2KB, >= 0.70x on 768KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per scenario (default 5)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--size", choices=sorted(SIZES), help="only this batch size")
    parser.add_argument(
        "--compression",
        choices=["none", "gzip", "snappy", "lz4", "zstd"],
        help="the ingress's kafka.compression_type (default: the setting's default)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    arguments = parser.parse_args()
    results = asyncio.run(bench(arguments))
    print_report(results)
    if arguments.json:
        print(json.dumps([asdict(r) for r in results]))


if __name__ == "__main__":
    main()
