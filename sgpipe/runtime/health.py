"""Health and metrics over HTTP: ``GET /healthz``, ``GET /readyz``, ``GET /metrics``.

* ``/healthz`` -- the process is alive: its event loop answers. A Kubernetes liveness probe.
* ``/readyz`` -- the stage can do its job now: every readiness check holds (connected,
  partitions assigned, not stalled past its threshold; for the ingress, able to acknowledge).
  200 with the checks as JSON, or 503 naming the ones that fail. A readiness probe.
* ``/metrics`` -- Prometheus text format.

Every stage process serves these: the ingress on its own port next to the webhooks,
``sgpipe process`` / ``sgpipe sink`` on ``health_port``. A process that runs several stages
(``sgpipe sink``: the events sink and the dead-letter sink) serves one endpoint for all of
them: ready when every stage is. A process that fronts others (the
ingress of ``sgpipe up``) passes their base URLs as ``peers``: its ``/readyz`` is ready only if
every peer is, and its ``/metrics`` merges theirs, so one scrape covers the whole pipeline.
``peers`` may be a function returning the current URLs, for peers that move (a supervised
child restarted on a new port); a peer that fronts others in turn answers for them too.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Sample

from sgpipe.runtime import metrics, status

# A readiness check: (holds, a short reason people can act on).
Check = Callable[[], tuple[bool, str]]

PEER_TIMEOUT_SECONDS = 2.0

# Base URLs of peers, or a function returning the current ones.
Peers = Sequence[str] | Callable[[], Sequence[str]]


class Readiness:
    """A stage's named readiness checks; ready when every one holds.

    Components either push a state (``set``) or register a function evaluated on each probe
    (``add_check``), whichever is natural for what they know.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self._checks: dict[str, Check] = {}
        self._states: dict[str, tuple[bool, str]] = {}

    def add_check(self, name: str, check: Check) -> None:
        self._checks[name] = check

    def set(self, name: str, ok: bool, detail: str = "") -> None:
        self._states[name] = (ok, detail)

    def evaluate(self) -> dict[str, tuple[bool, str]]:
        results = dict(self._states)
        for name, check in self._checks.items():
            try:
                results[name] = check()
            except Exception as exc:  # noqa: BLE001 - a broken check is a failing check
                results[name] = (False, f"check failed: {exc!r}")
        ready = bool(results) and all(ok for ok, _ in results.values())
        metrics.READY.labels(self.stage).set(1 if ready else 0)
        return results

    @property
    def ready(self) -> bool:
        results = self.evaluate()
        return bool(results) and all(ok for ok, _ in results.values())


@dataclass(frozen=True, slots=True)
class Progress:
    """Stall detection: ``busy_since`` is when the stage last had work it could not finish
    (None when idle or caught up); stalled once that is older than ``threshold``."""

    threshold_seconds: float

    def check(self, busy_since: float | None) -> tuple[bool, str]:
        if busy_since is None:
            return True, "idle or progressing"
        stalled_for = time.monotonic() - busy_since
        if stalled_for > self.threshold_seconds:
            return False, f"no progress for {stalled_for:.0f} s"
        return True, "progressing"


# A peer that is busy (a stage stepping a huge record holds the GIL for seconds) may miss the
# timeout while it is well: its last answer stands for this long before it counts as
# unreachable, so that the fronting /readyz does not flap on a loaded machine. A peer that is
# down (connection refused) is unreachable at once.
PEER_ANSWER_FRESH_SECONDS = 15.0


@dataclass(slots=True)
class _PeerSource:
    current: Callable[[], tuple[str, ...]]
    timeout_seconds: float
    # peer -> (monotonic time, its last /readyz answer)
    last_answers: dict[str, tuple[float, tuple[int, str]]] = field(default_factory=dict)

    def remember(
        self, peers: Sequence[str], answers: Sequence[tuple[int, str] | BaseException]
    ) -> list[tuple[int, str] | BaseException]:
        """``answers``, with a timed-out peer's last answer put in when it is fresh enough."""
        now = time.monotonic()
        kept: list[tuple[int, str] | BaseException] = []
        for peer, answer in zip(peers, answers, strict=True):
            if isinstance(answer, tuple):
                self.last_answers[peer] = (now, answer)
            elif isinstance(answer, TimeoutError) and peer in self.last_answers:
                at, last = self.last_answers[peer]
                if now - at <= PEER_ANSWER_FRESH_SECONDS:
                    answer = last
            kept.append(answer)
        return kept


HEALTH_READINESS: web.AppKey[tuple[Readiness, ...]] = web.AppKey("sgpipe_readiness")
HEALTH_PEERS = web.AppKey("sgpipe_health_peers", _PeerSource)


def add_health_routes(
    app: web.Application,
    readiness: Readiness | Sequence[Readiness],
    peers: Peers = (),
    *,
    peer_timeout_seconds: float = PEER_TIMEOUT_SECONDS,
) -> None:
    """Add ``/healthz``, ``/readyz`` and ``/metrics`` to ``app``; ``readiness`` is the stage's,
    or the stages' of a process that runs several (``/healthz`` names the first); ``peers``
    are base URLs of other stage processes whose readiness and metrics this app reports too
    (a peer that does not answer within ``peer_timeout_seconds`` is reported unreachable)."""
    app[HEALTH_READINESS] = (readiness,) if isinstance(readiness, Readiness) else tuple(readiness)
    if callable(peers):
        source = peers
        app[HEALTH_PEERS] = _PeerSource(lambda: tuple(source()), peer_timeout_seconds)
    else:
        fixed = tuple(peers)
        app[HEALTH_PEERS] = _PeerSource(lambda: fixed, peer_timeout_seconds)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/metrics", _metrics)


def create_health_app(
    readiness: Readiness | Sequence[Readiness],
    peers: Peers = (),
    *,
    peer_timeout_seconds: float = PEER_TIMEOUT_SECONDS,
) -> web.Application:
    app = web.Application()
    add_health_routes(app, readiness, peers, peer_timeout_seconds=peer_timeout_seconds)
    return app


async def serve_health(
    readiness: Readiness | Sequence[Readiness],
    host: str,
    port: int,
    peers: Peers = (),
    *,
    peer_timeout_seconds: float = PEER_TIMEOUT_SECONDS,
) -> web.AppRunner:
    """Start the health server; the caller awaits ``runner.cleanup()`` to stop it. The bound
    port is ``runner.addresses[0][1]`` (port 0 picks a free one)."""
    app = create_health_app(readiness, peers, peer_timeout_seconds=peer_timeout_seconds)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    # A child of `sgpipe up` says where (its supervisor fronts it there); else nothing.
    status.report_listening("health", runner.addresses[0][1])
    return runner


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "stage": request.app[HEALTH_READINESS][0].stage})


async def _readyz(request: web.Request) -> web.Response:
    checks = {
        f"{readiness.stage}.{name}": {"ok": ok, "detail": detail}
        for readiness in request.app[HEALTH_READINESS]
        for name, (ok, detail) in readiness.evaluate().items()
    }
    source = request.app[HEALTH_PEERS]
    peers = source.current()
    if peers:
        answers = source.remember(
            peers, await _gather_peers(peers, "/readyz", source.timeout_seconds)
        )
        for peer, result in zip(peers, answers, strict=True):
            for name, check in _peer_checks(peer, result).items():
                # Replicas of a stage answer under the same names: one that fails shows.
                if name not in checks or (checks[name].get("ok") and not check.get("ok")):
                    checks[name] = check
    ready = bool(checks) and all(check["ok"] for check in checks.values())
    return web.json_response(
        {"status": "ready" if ready else "not_ready", "checks": checks},
        status=200 if ready else 503,
    )


async def _metrics(request: web.Request) -> web.Response:
    source = request.app[HEALTH_PEERS]
    peers = source.current()
    body, content_type = metrics.render()
    if peers:
        texts = [body.decode()]
        for result in await _gather_peers(peers, "/metrics", source.timeout_seconds):
            if isinstance(result, tuple) and result[0] == 200:
                texts.append(result[1])
        body = merge_exposition(texts)
    # aiohttp wants the charset apart from the media type.
    media_type, _, _ = content_type.partition(";")
    return web.Response(body=body, content_type=media_type, charset="utf-8")


async def _gather_peers(
    peers: Sequence[str], path: str, timeout_seconds: float
) -> list[tuple[int, str] | BaseException]:
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def fetch(base: str) -> tuple[int, str]:
            async with session.get(base.rstrip("/") + path) as response:
                return response.status, await response.text()

        return await asyncio.gather(*(fetch(peer) for peer in peers), return_exceptions=True)


def _peer_checks(
    peer: str, result: tuple[int, str] | BaseException
) -> dict[str, dict[str, object]]:
    if isinstance(result, BaseException):
        return {peer: {"ok": False, "detail": f"unreachable: {result!r}"}}
    status, text = result
    try:
        checks = json.loads(text)["checks"]
    except (ValueError, KeyError, TypeError):
        return {peer: {"ok": status == 200, "detail": f"HTTP {status}"}}
    if not isinstance(checks, dict):
        return {peer: {"ok": False, "detail": "malformed readiness answer"}}
    return {str(name): value for name, value in checks.items()}


class _Families(Collector):
    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_exposition(texts: Sequence[str]) -> bytes:
    """Merge Prometheus text expositions of several processes into one.

    Plain concatenation is invalid (a family's HELP/TYPE may appear once), so families are
    merged by name; the ``stage`` label keeps each process's series apart. A series present
    twice comes from replicas of one stage (`sgpipe up --processors 2`): a counter's,
    histogram's or summary's values add up (what the stage did in all), a gauge's is kept
    once, from the first text (adding up a state, such as a creation time, means nothing).
    """
    families: dict[str, Metric] = {}
    kept: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], Sample]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, family)
            series = kept.setdefault(family.name, {})
            adds_up = merged.type in ("counter", "histogram", "summary")
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in series:
                    series[key] = sample
                elif adds_up and not sample.name.endswith("_created"):
                    series[key] = series[key]._replace(value=series[key].value + sample.value)
    for name, family in families.items():
        family.samples[:] = list(kept[name].values())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families.values()))
    return generate_latest(registry)
