"""``sgpipe keys generate`` and ``sgpipe simulate``: arguments in, key or summary out.

Registered on the main parser by ``add_commands``; every heavy import happens inside the
handlers, so that other commands do not pay for them.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from sgpipe.simulator.simulation import SimulationOptions, SimulationProgress, SimulationSummary

EXIT_NOT_ACCEPTED = 1
EXIT_USAGE = 2


def add_commands(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    common: argparse.ArgumentParser,
) -> None:
    """Register ``keys generate`` and ``simulate``; ``common`` holds the options every command
    takes (--config, --log-level, --log-format)."""
    keys = commands.add_parser(
        "keys",
        help="make signing keys for webhooks",
        description="Signing keys for SendGrid webhooks (see docs/simulator.md).",
    )
    keys_actions = keys.add_subparsers(title="actions", required=True, metavar="ACTION")
    generate = keys_actions.add_parser(
        "generate",
        parents=[common],
        help="make a P-256 key pair: private key to FILE, public key (SendGrid's format) out",
        description="Write a new ECDSA P-256 private key (PEM, mode 0600) to FILE and print "
        "its public key as SendGrid shows it (base64 DER), for webhooks[].public_keys.",
    )
    generate.add_argument("--out", type=Path, required=True, metavar="FILE")
    generate.add_argument("--force", action="store_true", help="overwrite FILE if it exists")
    generate.set_defaults(command=keys_generate, serves_webhooks=False)

    simulate = commands.add_parser(
        "simulate",
        parents=[common],
        help="post realistic, signed SendGrid event batches to a webhook URL",
        description="Behave like SendGrid's Event Webhook: realistic event streams, batched, "
        "signed, retried. Exits 1 if any event was not accepted. See docs/simulator.md.",
    )
    simulate.add_argument("--url", required=True, help="the webhook URL to POST to")
    simulate.add_argument("--private-key", type=Path, metavar="FILE", help="sign with this key")
    oauth = simulate.add_argument_group("OAuth (client credentials; all three or none)")
    oauth.add_argument("--oauth-token-url", metavar="U")
    oauth.add_argument("--client-id", metavar="I")
    oauth.add_argument("--client-secret", metavar="S")
    oauth.add_argument(
        "--oauth-client-auth",
        choices=("basic", "post"),
        default="basic",
        help="how the secret is sent: HTTP Basic (default) or form fields",
    )
    amount = simulate.add_mutually_exclusive_group()
    amount.add_argument("--events", type=_positive(int), metavar="N", help="default 1000")
    amount.add_argument("--duration", type=_positive(float), metavar="T", help="seconds")
    simulate.add_argument("--rate", type=_positive(float), metavar="R", help="events/s")
    simulate.add_argument(
        "--duplicates", type=_share, default=0.0, metavar="P", help="share re-sent, 0-1"
    )
    simulate.add_argument("--concurrency", type=_positive(int), default=4, metavar="C")
    simulate.add_argument("--seed", type=int, metavar="S", help="reproducible bodies")
    simulate.add_argument("--start-time", type=int, metavar="UNIX", help="first event's timestamp")
    simulate.add_argument("--flush-interval", type=_positive(float), default=1.0, metavar="SECONDS")
    simulate.add_argument(
        "--max-batch-bytes", type=_positive(int), default=768 * 1024, metavar="BYTES"
    )
    simulate.add_argument("--timeout", type=_positive(float), default=30.0, metavar="SECONDS")
    simulate.add_argument(
        "--retry-for", type=float, default=300.0, metavar="SECONDS", help="then give up"
    )
    simulate.add_argument("--json", action="store_true", help="print the summary as JSON")
    simulate.set_defaults(command=simulate_command, serves_webhooks=False)


def keys_generate(args: argparse.Namespace, settings: object) -> int:
    # Imported when the command runs, not when the CLI builds its parser (sgpipe/cli.py).
    import structlog

    from sgpipe.runtime.logs import report_fatal
    from sgpipe.simulator.keys import (
        KeyFileError,
        generate_private_key,
        public_key_base64,
        write_private_key,
    )

    private_key = generate_private_key()
    try:
        write_private_key(private_key, args.out, overwrite=args.force)
    except KeyFileError as exc:
        report_fatal(str(exc), exit_code=EXIT_USAGE)
        return EXIT_USAGE
    print(public_key_base64(private_key), flush=True)
    # Looked up now, not cached at import: the CLI configured logging just before.
    structlog.get_logger("sgpipe").info(
        "private key written; the public key printed on stdout goes in webhooks[].public_keys",
        path=str(args.out),
        mode="0600",
    )
    return 0


def simulate_command(args: argparse.Namespace, settings: object) -> int:
    from sgpipe.runtime.logs import report_fatal

    try:
        options = _options(args)
    except ValueError as exc:
        report_fatal(str(exc), exit_code=EXIT_USAGE)
        return EXIT_USAGE
    progress_line = _ProgressLine(sys.stderr) if sys.stderr.isatty() else None
    summary = _run(options, progress_line)
    if progress_line is not None:
        progress_line.finish()
    if summary is None:
        report_fatal("simulation abandoned without a summary", exit_code=EXIT_NOT_ACCEPTED)
        return EXIT_NOT_ACCEPTED
    if args.json:
        print(json.dumps(summary.to_dict(), indent=2))
    else:
        print(format_summary(summary))
    return 0 if summary.ok else EXIT_NOT_ACCEPTED


def _options(args: argparse.Namespace) -> SimulationOptions:
    """ValueError with a one-line message for anything unusable."""
    from sgpipe.simulator.keys import KeyFileError, load_private_key
    from sgpipe.simulator.oauth import OAuthClientSettings
    from sgpipe.simulator.simulation import SimulationOptions

    oauth_values = (args.oauth_token_url, args.client_id, args.client_secret)
    if any(value is not None for value in oauth_values) and None in oauth_values:
        raise ValueError("OAuth needs --oauth-token-url, --client-id and --client-secret")
    oauth = None
    if args.oauth_token_url is not None:
        oauth = OAuthClientSettings(
            token_url=args.oauth_token_url,
            client_id=args.client_id,
            client_secret=args.client_secret,
            auth_method="client_secret_post"
            if args.oauth_client_auth == "post"
            else "client_secret_basic",
        )
    private_key = None
    if args.private_key is not None:
        try:
            private_key = load_private_key(args.private_key)
        except KeyFileError as exc:
            raise ValueError(str(exc)) from exc
    events = args.events if args.events is not None or args.duration is not None else 1000
    return SimulationOptions(
        url=args.url,
        private_key=private_key,
        oauth=oauth,
        events=events,
        duration_seconds=args.duration,
        rate=args.rate,
        duplicates=args.duplicates,
        concurrency=args.concurrency,
        seed=args.seed,
        start_time=args.start_time,
        flush_interval_seconds=args.flush_interval,
        max_batch_bytes=args.max_batch_bytes,
        request_timeout_seconds=args.timeout,
        retry_for_seconds=args.retry_for,
    )


def _run(
    options: SimulationOptions, progress_line: _ProgressLine | None
) -> SimulationSummary | None:
    """Run to the end; the first Ctrl-C stops generating and lets posts in flight finish,
    a second one abandons them (no summary then)."""
    import asyncio

    from sgpipe.simulator.simulation import simulate

    async def runner() -> SimulationSummary:
        stop = asyncio.Event()
        task = asyncio.current_task()
        assert task is not None

        def on_signal() -> None:
            if stop.is_set():
                task.cancel()
            stop.set()

        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, on_signal)
        return await simulate(options, stop=stop, on_progress=progress_line)

    try:
        return asyncio.run(runner())
    except asyncio.CancelledError:
        return None


class _ProgressLine:
    """One self-overwriting status line on a terminal."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._last_time = time.monotonic()
        self._last_acknowledged = 0

    def __call__(self, progress: SimulationProgress) -> None:
        now = time.monotonic()
        elapsed = now - self._last_time
        rate = (progress.events_acknowledged - self._last_acknowledged) / elapsed if elapsed else 0
        self._last_time, self._last_acknowledged = now, progress.events_acknowledged
        self._stream.write(
            f"\rsent {progress.events_sent:,}  acknowledged {progress.events_acknowledged:,}  "
            f"retried {progress.retries:,}  rejected {progress.events_rejected:,}  "
            f"{rate:,.0f} events/s\x1b[K"
        )
        self._stream.flush()

    def finish(self) -> None:
        self._stream.write("\n")
        self._stream.flush()


def format_summary(summary: SimulationSummary) -> str:
    answers = ", ".join(f"{label} ×{count:,}" for label, count in sorted(summary.responses.items()))
    lines = [
        f"simulated {summary.events:,} events to {summary.url} "
        f"(seed {summary.seed}, start time {summary.start_time})",
        f"  accepted    {summary.events_accepted:,} of {summary.events:,} unique events "
        f"(+{summary.duplicate_events:,} duplicate copies, "
        f"{summary.resent_batches:,} re-sent batches)",
        f"  posts       {summary.posts:,} sent, {summary.posts_acknowledged:,} acknowledged, "
        f"{summary.posts_rejected:,} given up, {summary.retries:,} retries",
        f"  answers     {answers or 'none'}",
        f"  throughput  {summary.events_per_second:,.0f} events/s acknowledged in "
        f"{summary.elapsed_seconds:,.1f} s; generated and signed "
        f"{summary.generation_events_per_second:,.0f} events per CPU second",
    ]
    if summary.token_requests:
        lines.append(f"  oauth       {summary.token_requests:,} token requests")
    if not summary.ok:
        lines.append(
            f"NOT ACCEPTED: {summary.events_not_accepted:,} events; last error: "
            f"{summary.last_error}"
        )
    return "\n".join(lines)


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
        return value

    return parse


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"a share between 0 and 1, got {text!r}")
    return value
