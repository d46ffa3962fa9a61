"""Run a simulation: plan SendGrid POSTs, pace them, sign them, send them, retry them.

``simulate(options)`` is the one entry point: ``sgpipe simulate`` calls it, and so do
``sgpipe up --demo`` and the end-to-end benchmark. It returns a SimulationSummary; whether every
event was accepted is ``summary.ok``.

Sending follows SendGrid's documented behaviour: a 2xx acknowledges the whole batch; anything
else (a 3xx included: redirects are never followed) or a timeout is retried at increasing
intervals; a 4xx other than 408 and 429 is final. With OAuth, a 4xx whose body names a token
error makes the sender fetch a new token and try again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER
from sgpipe.simulator.batches import SENDGRID_MAX_BATCH_BYTES, PlannedPost, PostPlanner
from sgpipe.simulator.events import EventStream
from sgpipe.simulator.keys import sign
from sgpipe.simulator.oauth import (
    OAuthClientSettings,
    TokenError,
    TokenSource,
    is_token_rejection,
)

# What SendGrid sends besides the signature (docs/sendgrid-event-webhook.md).
SENDGRID_HEADERS = {
    "Content-Type": "application/json;charset=utf-8",
    "User-Agent": "SendGrid Event API",
}
# The start of the datasets tests and benchmarks build from a seed (sgpipe/simulator/dataset.py),
# 2025-01-01T00:00:00Z; `sgpipe simulate` dates its events from now unless --start-time pins them.
SEEDED_START_TIME = 1_735_689_600
# Simulated messages per second when no --rate ties simulated time to the wall clock: slow
# enough that even a short run covers whole lifecycles (opens come minutes after delivery).
_DEFAULT_MESSAGES_PER_SECOND = 1.0
# Events per message, on average, in EventStream's mix: turns an event rate into a message
# rate, so that event timestamps advance about as fast as the wall clock.
_EVENTS_PER_MESSAGE = 2.4
_RESPONSE_BYTES_READ = 65_536


@dataclass(frozen=True, slots=True)
class SimulationOptions:
    """What to send, where, and how hard. ``events`` and ``duration_seconds`` both None: run
    until ``stop`` is set."""

    url: str
    private_key: ec.EllipticCurvePrivateKey | None = None
    oauth: OAuthClientSettings | None = None
    events: int | None = 1000
    duration_seconds: float | None = None
    rate: float | None = None  # events per second, copies included; None: as fast as possible
    duplicates: float = 0.0  # share of extra copies, see PostPlanner
    concurrency: int = 4  # POSTs in flight
    seed: int | None = None  # None: a random seed, reported in the summary
    start_time: int | None = None  # Unix seconds of the first event
    flush_interval_seconds: float = 1.0  # with a rate: a batch spans at most this much time
    max_batch_bytes: int = SENDGRID_MAX_BATCH_BYTES
    request_timeout_seconds: float = 30.0
    retry_for_seconds: float = 300.0  # SendGrid retries for 24 h; a test run should not
    initial_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0

    def __post_init__(self) -> None:
        checks = (
            (self.events is None or self.events > 0, "events must be positive"),
            (
                self.duration_seconds is None or self.duration_seconds > 0,
                "duration must be positive",
            ),
            (self.events is None or self.duration_seconds is None, "give events or duration"),
            (self.rate is None or self.rate > 0, "rate must be positive"),
            (0.0 <= self.duplicates <= 1.0, "duplicates is a share between 0 and 1"),
            (self.concurrency >= 1, "concurrency must be at least 1"),
            (self.flush_interval_seconds > 0, "flush interval must be positive"),
            (self.max_batch_bytes >= 1024, "max batch bytes must be at least 1024"),
            (self.request_timeout_seconds > 0, "timeout must be positive"),
            (self.retry_for_seconds >= 0, "retry-for must not be negative"),
            (self.initial_backoff_seconds > 0, "backoff must be positive"),
            (self.url.startswith(("http://", "https://")), "the URL must be http(s)://"),
        )
        for passed, message in checks:
            if not passed:
                raise ValueError(message)


@dataclass(slots=True)
class SimulationProgress:
    """Live counters, updated as posts are answered (what the progress line shows)."""

    events_sent: int = 0  # event objects in first attempts, copies included
    events_acknowledged: int = 0
    events_rejected: int = 0  # in posts given up on
    posts_sent: int = 0
    posts_acknowledged: int = 0
    posts_rejected: int = 0
    retries: int = 0
    bytes_sent: int = 0
    duplicate_events: int = 0
    resent_batches: int = 0
    responses: Counter[str] = field(default_factory=Counter)
    last_error: str | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def elapsed_seconds(self) -> float:
        return time.monotonic() - self.started


@dataclass(frozen=True, slots=True)
class SimulationSummary:
    """The result of a run. ``events`` counts unique events; copies are counted apart."""

    url: str
    seed: int
    start_time: int
    events: int  # unique events posted
    events_accepted: int  # unique events in at least one acknowledged POST
    events_not_accepted: int
    duplicate_events: int  # event copies posted (single re-sends and re-sent batches)
    resent_batches: int
    posts: int
    posts_acknowledged: int
    posts_rejected: int
    retries: int
    bytes_sent: int
    responses: dict[str, int]  # answer ("200", "503", "timeout", ...) -> count
    token_requests: int
    elapsed_seconds: float
    events_per_second: float  # event objects acknowledged per second, copies included
    generation_events_per_second: float  # generated, serialized and signed per CPU second
    last_error: str | None

    @property
    def ok(self) -> bool:
        return self.events_not_accepted == 0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


ProgressCallback = Callable[[SimulationProgress], None]
PostCallback = Callable[[PlannedPost], None]


async def simulate(
    options: SimulationOptions,
    *,
    stop: asyncio.Event | None = None,
    on_progress: ProgressCallback | None = None,
    progress_interval_seconds: float = 0.5,
    on_post: PostCallback | None = None,
    on_acknowledged: PostCallback | None = None,
) -> SimulationSummary:
    """Post a simulated SendGrid event stream to ``options.url`` and report how it went.

    Runs until ``options.events`` unique events were posted, ``options.duration_seconds``
    passed, or ``stop`` is set; then waits for the posts already planned (with their retries,
    bounded by ``retry_for_seconds``). Cancelling the task abandons posts in flight.
    ``on_progress`` is called every ``progress_interval_seconds`` and once at the end;
    ``on_post`` with every post as planned (before it is sent); ``on_acknowledged`` with
    each post the moment its 2xx arrived (end-to-end latency starts there).
    """
    seed = options.seed if options.seed is not None else secrets.randbits(63)
    start_time = options.start_time
    if start_time is None:
        # From now, seeded or not: demo data then shows up in "last 7 days" queries and
        # dashboards. A seeded run is byte-identical again with the --start-time its summary
        # prints.
        start_time = int(time.time())
    messages_per_second = (
        options.rate / _EVENTS_PER_MESSAGE if options.rate else _DEFAULT_MESSAGES_PER_SECOND
    )
    stream = EventStream(seed, start_time, messages_per_second)
    planner = PostPlanner(
        stream,
        seed=seed,
        duplicates=options.duplicates,
        max_batch_bytes=options.max_batch_bytes,
        max_batch_events=(
            max(1, math.ceil(options.rate * options.flush_interval_seconds))
            if options.rate
            else None
        ),
        event_limit=options.events,
    )
    progress = SimulationProgress()
    run = _Run(options, progress, stop or asyncio.Event(), on_acknowledged)
    connector = aiohttp.TCPConnector(limit=options.concurrency + 1)
    async with aiohttp.ClientSession(
        connector=connector, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        tokens = (
            TokenSource(session, options.oauth, options.request_timeout_seconds)
            if options.oauth
            else None
        )
        sender = _Sender(session, options, tokens, progress)
        reporter = (
            asyncio.create_task(_report(on_progress, progress, progress_interval_seconds))
            if on_progress
            else None
        )
        try:
            await run.execute(planner, sender, on_post)
        finally:
            if reporter is not None:
                reporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reporter
        if on_progress is not None:
            on_progress(progress)
    elapsed = progress.elapsed_seconds
    accepted = run.accepted[: run.events].count(1)
    busy = run.generation_seconds + sender.signing_seconds
    return SimulationSummary(
        url=options.url,
        seed=seed,
        start_time=start_time,
        events=run.events,
        events_accepted=accepted,
        events_not_accepted=run.events - accepted,
        duplicate_events=progress.duplicate_events,
        resent_batches=progress.resent_batches,
        posts=progress.posts_sent,
        posts_acknowledged=progress.posts_acknowledged,
        posts_rejected=progress.posts_rejected,
        retries=progress.retries,
        bytes_sent=progress.bytes_sent,
        responses=dict(progress.responses),
        token_requests=tokens.requests if tokens else 0,
        elapsed_seconds=round(elapsed, 3),
        events_per_second=round(progress.events_acknowledged / elapsed, 1) if elapsed else 0.0,
        generation_events_per_second=round(progress.events_sent / busy, 1) if busy else 0.0,
        last_error=progress.last_error,
    )


class _Run:
    """The producer (plan, pace) and the workers (send) of one simulation."""

    def __init__(
        self,
        options: SimulationOptions,
        progress: SimulationProgress,
        stop: asyncio.Event,
        on_acknowledged: PostCallback | None,
    ) -> None:
        self._options = options
        self._progress = progress
        self._stop = stop
        self._on_acknowledged = on_acknowledged
        self.accepted = bytearray()  # per unique event (by serial): 1 once acknowledged
        self.events = 0  # unique events in planned posts
        self.generation_seconds = 0.0

    async def execute(
        self,
        planner: PostPlanner,
        sender: _Sender,
        on_post: PostCallback | None,
    ) -> None:
        queue: asyncio.Queue[PlannedPost | None] = asyncio.Queue(self._options.concurrency)
        # A task group, so that a worker that fails cancels the producer instead of leaving it
        # blocked on a full queue forever.
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(self._options.concurrency):
                    group.create_task(self._work(queue, sender))
                await self._produce(planner, queue, on_post)
                for _ in range(self._options.concurrency):
                    await queue.put(None)
        except BaseExceptionGroup as failure:
            raise failure.exceptions[0] from failure

    async def _produce(
        self,
        planner: PostPlanner,
        queue: asyncio.Queue[PlannedPost | None],
        on_post: PostCallback | None,
    ) -> None:
        options = self._options
        started = time.monotonic()
        deadline = started + options.duration_seconds if options.duration_seconds else None
        posts = iter(planner)
        while not self._stop.is_set():
            # CPU time of this thread: the figure is per core, whatever else the machine runs.
            generating = time.thread_time()
            post = next(posts, None)
            self.generation_seconds += time.thread_time() - generating
            if post is None:
                return
            # With a rate, a post leaves when its last event is due: the batch filled at that
            # rate, or its flush interval passed.
            due = started + post.stream_position / options.rate if options.rate else None
            if deadline is not None and (due or time.monotonic()) > deadline:
                return
            if due is not None and not await self._sleep_until(due):
                return
            if on_post is not None:
                on_post(post)
            self.events = max(self.events, max(post.serials) + 1)
            if len(self.accepted) < self.events:
                self.accepted.extend(bytes(self.events - len(self.accepted)))
            await queue.put(post)

    async def _sleep_until(self, moment: float) -> bool:
        """False if ``stop`` was set meanwhile."""
        delay = moment - time.monotonic()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
        return not self._stop.is_set()

    async def _work(self, queue: asyncio.Queue[PlannedPost | None], sender: _Sender) -> None:
        progress = self._progress
        while (post := await queue.get()) is not None:
            progress.posts_sent += 1
            progress.events_sent += post.events
            progress.bytes_sent += len(post.body)
            progress.duplicate_events += post.duplicate_events
            progress.resent_batches += post.resend_of is not None
            if await sender.deliver(post):
                if self._on_acknowledged is not None:
                    self._on_acknowledged(post)
                progress.posts_acknowledged += 1
                progress.events_acknowledged += post.events
                accepted = self.accepted
                for serial in post.serials:
                    accepted[serial] = 1
            else:
                progress.posts_rejected += 1
                progress.events_rejected += post.events


class _Sender:
    """POSTs one planned body until it is acknowledged or given up on."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        options: SimulationOptions,
        tokens: TokenSource | None,
        progress: SimulationProgress,
    ) -> None:
        self._session = session
        self._options = options
        self._tokens = tokens
        self._progress = progress
        self._timeout = aiohttp.ClientTimeout(total=options.request_timeout_seconds)
        self.signing_seconds = 0.0

    async def deliver(self, post: PlannedPost) -> bool:
        """True once a POST of ``post`` was answered 2xx; False when given up on."""
        options = self._options
        progress = self._progress
        first_attempt = time.monotonic()
        delays = backoff_delays(options.initial_backoff_seconds, options.max_backoff_seconds)
        token_refreshed = False
        while True:
            answer = await self._attempt(post.body)
            progress.responses[answer.label] += 1
            if answer.accepted:
                return True
            progress.last_error = answer.detail
            if (
                self._tokens is not None
                and answer.token is not None
                and answer.status is not None
                and is_token_rejection(answer.status, answer.body)
                and not token_refreshed
            ):
                # SendGrid's rule: a token error in a 4xx body means "fetch a new token".
                self._tokens.invalidate(answer.token)
                token_refreshed = True
                progress.retries += 1
                continue
            token_refreshed = False
            if answer.final:
                return False
            delay = next(delays)
            if time.monotonic() + delay - first_attempt > options.retry_for_seconds:
                return False
            progress.retries += 1
            await asyncio.sleep(delay)

    async def _attempt(self, body: bytes) -> _Answer:
        headers = dict(SENDGRID_HEADERS)
        key = self._options.private_key
        if key is not None:
            signing = time.thread_time()
            # Signed afresh on each attempt, with the time of that attempt.
            timestamp = str(int(time.time()))
            headers[TIMESTAMP_HEADER] = timestamp
            headers[SIGNATURE_HEADER] = sign(key, timestamp, body)
            self.signing_seconds += time.thread_time() - signing
        token = None
        if self._tokens is not None:
            try:
                token = await self._tokens.token()
            except TokenError as exc:
                return _Answer.failed("token error", str(exc), final=exc.permanent)
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with self._session.post(
                self._options.url,
                data=body,
                headers=headers,
                allow_redirects=False,  # SendGrid never follows one; a 3xx is a failure
                timeout=self._timeout,
            ) as response:
                answer_body = await response.content.read(_RESPONSE_BYTES_READ)
                status = response.status
        except TimeoutError:
            return _Answer.failed("timeout", "no answer within the request timeout", final=False)
        except aiohttp.ClientError as exc:
            return _Answer.failed("connection error", repr(exc), final=False)
        return _Answer.from_status(status, answer_body, token)


def backoff_delays(initial: float, maximum: float) -> Iterator[float]:
    """Waits between attempts: doubling from ``initial``, capped at ``maximum``, with up to 10%
    less at random so that many failed posts do not come back in lockstep."""
    delay = initial
    while True:
        yield delay * (1.0 - 0.1 * random.random())
        delay = min(delay * 2, maximum)


@dataclass(frozen=True, slots=True)
class _Answer:
    label: str  # for the summary's response counts
    status: int | None
    body: bytes
    token: str | None
    accepted: bool
    final: bool  # retrying cannot help
    detail: str

    @classmethod
    def failed(cls, label: str, detail: str, *, final: bool) -> _Answer:
        return cls(label, None, b"", None, False, final, detail)

    @classmethod
    def from_status(cls, status: int, body: bytes, token: str | None) -> _Answer:
        accepted = 200 <= status < 300
        # SendGrid gives up only where a retry cannot succeed: 4xx, except a timeout (408)
        # and a rate limit (429). 3xx and 5xx are retried.
        final = 400 <= status < 500 and status not in (408, 429)
        text = body[:200].decode("utf-8", "replace").strip()
        detail = f"HTTP {status}" + (f": {text}" if text else "")
        if 300 <= status < 400:
            detail += " (redirect not followed)"
        return cls(str(status), status, body, token, accepted, final, detail)


async def _report(
    on_progress: ProgressCallback, progress: SimulationProgress, interval: float
) -> None:
    while True:
        await asyncio.sleep(interval)
        on_progress(progress)
