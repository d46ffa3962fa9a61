"""Publishing raw batches to Kafka, and knowing whether the ingress can acknowledge at all.

The contract with SendGrid: 2xx only once Kafka acknowledged the batch with ``acks=all``.
Every way a send can fail while a broker restarts — ``KafkaConnectionError``,
``NotLeaderForPartitionError``, ``UnknownTopicOrPartitionError``, ``UnknownError`` (tansu while
its storage is down), request timeouts, a producer not connected yet — is a ``PublishError``,
which the ingress answers 503 with Retry-After, so SendGrid keeps the batch and retries.

Every record is signed with the first key of ``raw_auth.keys`` (``schemas.raw_auth``): the
processor dead-letters a raw record without a valid HMAC, so a producer that can write to the
raw topic but does not hold the key cannot inject events.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    UnknownTopicOrPartitionError,
)

from schemas.raw_auth import RawAuthKey, sign_raw_record
from schemas.raw_batch import KafkaHeaders, RawBatch, raw_batch_headers
from sgpipe.runtime.kafka import (
    NotServed,
    OutgoingRecord,
    ReadBack,
    TopicHealth,
    Written,
    confirm_topics,
    create_producer,
    ensure_topics,
    probe_topics,
)
from sgpipe.runtime.raw_auth import raw_auth_keys
from sgpipe.runtime.settings import Settings

log = structlog.get_logger(__name__)

_RECONNECT_BACKOFF_INITIAL_SECONDS = 0.5
_THREAD_SIGN_MIN_BYTES = 65_536
_RECONNECT_BACKOFF_MAX_SECONDS = 30.0


class PublishError(Exception):
    """The raw batch is not durable; the client must retry (503). ``reason`` is a short,
    low-cardinality label (``timeout``, ``not_connected`` or the Kafka client's error class)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class PublishRejected(Exception):
    """This batch can never be published as configured (it is larger than
    ``kafka.max_request_size`` allows): retrying cannot help (413)."""


class RawBatchPublisher(Protocol):
    async def publish(self, batch: RawBatch) -> None:
        """Return once the batch is durable in Kafka; raise PublishError otherwise (or
        PublishRejected for a batch that can never fit)."""


class AcknowledgeHealth:
    """Whether the ingress can acknowledge now: the producer has started and the last thing
    heard from Kafka — a publish or a metadata probe, whichever came last — was a success.

    A failed publish marks the ingress not ready until a later publish or probe succeeds.
    """

    def __init__(self, *, started: bool = False) -> None:
        self._started = started
        self._kafka: tuple[bool, str] = (
            (True, "no publish yet") if started else (False, "producer not started")
        )

    def producer_started(self) -> None:
        self._started = True
        self._kafka = (False, "producer connected; topic not checked yet")

    def producer_stopped(self, detail: str) -> None:
        self._started = False
        self._kafka = (False, detail)

    def record(self, ok: bool, detail: str) -> None:
        self._kafka = (ok, detail)

    def producer_check(self) -> tuple[bool, str]:
        return (True, "started") if self._started else (False, "not started")

    def kafka_check(self) -> tuple[bool, str]:
        return self._kafka


class KafkaRawBatchPublisher:
    """Owns the producer and reports to an AcknowledgeHealth.

    ``run`` connects (retrying while Kafka is unreachable, so that the ingress answers 503
    rather than refusing to start) and then probes the broker every
    ``readiness_probe_interval_seconds`` until stopped; ``create_app`` runs it with the app.
    ``start``/``stop`` connect once (raising if Kafka does not answer) and disconnect, for a
    caller that wants the producer up before it listens. ``publish`` sends with ``acks=all``.

    Publishing waits for a probe to have seen the raw topic with a leader for every partition,
    and after any failure (publish or probe) for the next such probe, which runs at once; a
    failed publish also replaces the producer, failing the batches it still queues. After the
    acknowledgement, the broker must still list the topic (else 503): an acknowledgement can
    come from a broker that restarted empty while the batch was in flight. The
    reason: a broker that restarted empty may auto-create the topic on a produce and
    acknowledge batches nobody can read (tansu's in-memory store does: the ingress answered
    200 for events that never arrived). While the topic is missing the ingress answers 503; with
    ``kafka.create_topics`` it re-creates the topics with their configured partitions.
    """

    def __init__(self, settings: Settings, health: AcknowledgeHealth | None = None) -> None:
        self._settings = settings
        self.health = health or AcknowledgeHealth()
        self._topic = settings.kafka.topics.raw
        self._timeout = settings.ingest.publish_timeout_seconds
        self._probe_interval = settings.ingest.readiness_probe_interval_seconds
        self._producer: AIOKafkaProducer[bytes, bytes] | None = None
        self._topic_verified = False
        self._probe_now = asyncio.Event()
        self._checked = asyncio.Event()
        self._abandon_producer = False
        # The publishes waiting for the next check after their acknowledgement, and the task
        # sending the checks (one in flight at a time).
        self._next_check: asyncio.Future[None] | None = None
        self._checks: asyncio.Task[None] | None = None
        self._read_back = ReadBack(settings.kafka)
        # ConfigError here (no key, no raw_auth.allow_unauthenticated): refuse to start.
        keys = raw_auth_keys(settings.raw_auth)
        self._signing_key = keys[0] if keys else None

    async def start(self) -> None:
        """Connect once; raises the Kafka client's error if it cannot."""
        if self._producer is None:
            await self._connect(raise_errors=True)

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        self._topic_verified = False
        self.health.producer_stopped("stopped")
        if producer is not None:
            await producer.stop()
        await self._read_back.stop()

    async def publish(self, batch: RawBatch) -> None:
        producer = self._producer
        if producer is None:
            raise PublishError("not_connected", "the Kafka producer is not connected yet")
        if not self._topic_verified:
            self._probe_now.set()
            raise PublishError(
                "topic_unverified", f"waiting for the broker to confirm topic {self._topic}"
            )
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    headers = (
                        # HMAC-SHA256 releases the GIL: a large body is signed off the loop.
                        await asyncio.to_thread(signed_headers, batch, self._signing_key)
                        if len(batch.body) >= _THREAD_SIGN_MIN_BYTES
                        else signed_headers(batch, self._signing_key)
                    )
                    acknowledged = await producer.send(self._topic, batch.body, headers=headers)
                except MessageSizeTooLargeError as exc:
                    # Raised by our client before sending: over kafka.max_request_size.
                    raise PublishRejected(str(exc)) from exc
                # Resolves once every in-sync replica has the batch (acks=all).
                metadata = await acknowledged
                written = Written(
                    metadata.topic_partition,
                    metadata.offset,
                    OutgoingRecord(self._topic, batch.body),
                )
                self._read_back.acknowledged(written.partition, written.offset)
                # A batch in flight when the broker died is resent by aiokafka by itself; a
                # broker back empty acknowledges it into a topic it no longer lists, that
                # consumers cannot commit from (sgpipe.runtime.kafka.send_all_confirmed).
                await self._confirm_after_ack()
                # And once the topic is back, that log may still hide this batch (ReadBack).
                await self._read_back.confirm([written])
        except PublishRejected:
            raise
        except NotServed as exc:
            # The producer and the topic are sound: only this batch is lost (SendGrid resends).
            raise PublishError("not_served", str(exc)) from exc
        except TimeoutError as exc:
            self._distrust()
            raise PublishError(
                "timeout", f"Kafka did not acknowledge within {self._timeout:g} s"
            ) from exc
        # Any other failure of the Kafka client is a batch not stored, never a 500: broker
        # restarts surface as many error classes, some not KafkaError at all.
        except Exception as exc:  # noqa: BLE001
            self._distrust()
            raise PublishError(type(exc).__name__, repr(exc)) from exc

    async def _confirm_after_ack(self) -> None:
        """Wait for a topic check sent after this batch's acknowledgement. One check is in
        flight at a time, and every publish acknowledged meanwhile waits for the next one (as
        a group commit does): a check per publish cost 2 KB batches ~30% of the ingress's
        throughput (bench/ingest.py)."""
        if self._next_check is None:
            self._next_check = asyncio.get_running_loop().create_future()
            if self._checks is None or self._checks.done():
                self._checks = asyncio.create_task(self._send_checks())
        # Shielded: one publish's timeout must not cancel the check the others wait for.
        await asyncio.shield(self._next_check)

    async def _send_checks(self) -> None:
        while self._next_check is not None:
            # Taken before the request leaves: a publish acknowledged from now on waits for
            # the next check.
            waiting, self._next_check = self._next_check, None
            try:
                if self._producer is None:
                    raise KafkaConnectionError("the producer is being replaced")
                await confirm_topics(self._producer, [self._topic])
            except Exception as exc:  # noqa: BLE001 - each waiting publish answers 503 with it
                if isinstance(exc, UnknownTopicOrPartitionError):
                    self._read_back.forget(self._topic)
                waiting.set_exception(exc)
                waiting.exception()  # retrieved: every waiting publish may have timed out
            else:
                waiting.set_result(None)

    def _distrust(self) -> None:
        # Until a probe sees the topic again, publishing is refused (see the class docstring),
        # and the producer is replaced: its queue still holds the batches just answered 503,
        # which aiokafka would deliver by itself once a broker answers — to a restarted empty
        # broker, before the topic is re-created, so that the broker creates it on the fly.
        self._topic_verified = False
        self._abandon_producer = True
        self._probe_now.set()

    async def wait_until_checked(self, timeout: float) -> None:
        """Until the first topic check finished (or ``timeout``): a process that starts
        against a healthy broker is verified before it takes a request."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._checked.wait(), timeout)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect (unless started), then probe, until ``stop``; then stop the producer."""
        backoff = _RECONNECT_BACKOFF_INITIAL_SECONDS
        try:
            while not stop.is_set():
                if self._abandon_producer:
                    self._abandon_producer = False
                    await self._abandon()
                if self._producer is None:
                    if await self._connect(raise_errors=False):
                        backoff = _RECONNECT_BACKOFF_INITIAL_SECONDS
                        continue
                    await _wait(stop, backoff)
                    backoff = min(backoff * 2, _RECONNECT_BACKOFF_MAX_SECONDS)
                    continue
                ok, detail = await self._check_topic(self._producer)
                self._topic_verified = ok and not self._abandon_producer
                self.health.record(ok, detail)
                self._checked.set()
                # Faster while failing: recovery should not wait a whole interval.
                interval = self._probe_interval if ok else min(self._probe_interval, 0.5)
                await _wait_any(stop, self._probe_now, interval)
                self._probe_now.clear()
        finally:
            await self.stop()

    async def _abandon(self) -> None:
        """Fail every batch the producer still holds (each was answered 503, or is about to
        be), then close it; ``run`` connects a fresh one."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        self.health.producer_stopped("reconnecting after a failed publish")
        # aiokafka has no public way to drop queued batches; its accumulator's fail_all does.
        accumulator = getattr(producer, "_message_accumulator", None)
        if accumulator is not None:
            accumulator.fail_all(KafkaConnectionError("abandoned after a failed publish"))
        try:
            async with asyncio.timeout(self._timeout):
                await producer.stop()
        except Exception as exc:  # noqa: BLE001 - a dead broker may make stop fail or hang
            log.warning("kafka producer did not stop cleanly", error=repr(exc))
        log.info("kafka producer replaced after a failed publish", topic=self._topic)

    async def _connect(self, *, raise_errors: bool) -> bool:
        producer = create_producer(self._settings.kafka)
        try:
            await producer.start()
        except Exception as exc:  # any failure to connect is retried (or raised by start)
            self.health.producer_stopped(f"cannot connect: {type(exc).__name__}")
            with contextlib.suppress(Exception):
                await producer.stop()
            if raise_errors:
                raise
            log.warning("kafka producer cannot connect; retrying", error=repr(exc))
            return False
        self._producer = producer
        self.health.producer_started()
        log.info("kafka producer connected", topic=self._topic)
        return True

    async def _check_topic(self, producer: AIOKafkaProducer[bytes, bytes]) -> tuple[bool, str]:
        health = await self._probe(producer)
        if health.missing:
            self._read_back.forget(self._topic)
        if health.missing and self._settings.kafka.create_topics:
            try:
                created = await ensure_topics(self._settings.kafka)
            except Exception as exc:  # noqa: BLE001 - retried at the next probe
                return False, f"topic {self._topic} missing; cannot create: {type(exc).__name__}"
            log.warning("raw topic was missing from the broker; created topics", topics=created)
            health = await self._probe(producer)
        return health.ok, health.detail

    async def _probe(self, producer: AIOKafkaProducer[bytes, bytes]) -> TopicHealth:
        """Ask one broker for the raw topic's metadata: reachable, topic present, every
        partition led. Cheap (one small request), and it never creates the topic."""
        try:
            async with asyncio.timeout(min(self._probe_interval, self._timeout)):
                health = await probe_topics(producer, [self._topic])
        except Exception as exc:  # noqa: BLE001 - every failure means "cannot acknowledge"
            return TopicHealth(False, f"broker unreachable: {type(exc).__name__}")
        return health[self._topic]


def signed_headers(batch: RawBatch, key: RawAuthKey | None) -> KafkaHeaders:
    """The raw batch's headers with its HMAC under ``key`` (unsigned without one: only with
    ``raw_auth.allow_unauthenticated``)."""
    headers = raw_batch_headers(batch)
    return headers if key is None else sign_raw_record(key, batch.body, headers)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def _wait_any(stop: asyncio.Event, wake: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
