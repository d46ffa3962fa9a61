"""The durable embedded broker (tansu on SeaweedFS) as `sgpipe up` runs it, through its API:
acknowledged messages and committed offsets survive kill -9 of either process or both, the
supervisor restarts what dies, retention deletes only what every sgpipe group committed, and
the storage refuses anonymous access."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import OffsetAndMetadata, TopicPartition
from structlog.testing import capture_logs

from sgpipe.embedded import storage
from sgpipe.embedded.broker import EmbeddedKafka, PortInUse
from sgpipe.embedded.child import ChildProcess, port_is_free
from sgpipe.embedded.storage import BUCKET, DataDirInUse, stale_socket_paths
from sgpipe.runtime.settings import EmbeddedSettings
from tests.integration.kafka_tools import FAST_GROUP_SETTINGS

pytestmark = pytest.mark.kafka

TOPIC = "events"
GROUP = "sgpipe-sink"
MESSAGES = 60
PARTITIONS = 2


def embedded(**fields: object) -> EmbeddedSettings:
    return EmbeddedSettings.model_validate({"kafka_port": 0, **fields})


@pytest.fixture
async def durable(tmp_path: Path) -> AsyncIterator[EmbeddedKafka]:
    kafka = EmbeddedKafka(embedded(), tmp_path / "data", retention_groups={TOPIC: [GROUP]})
    await kafka.start()
    try:
        yield kafka
    finally:
        await kafka.stop()


async def create_topic(bootstrap_servers: str, topic: str = TOPIC) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, PARTITIONS, 1)])
    finally:
        await admin.close()


async def produce(bootstrap_servers: str, count: int, topic: str = TOPIC, start: int = 0) -> None:
    """``count`` messages, each acknowledged (acks=all) before the next: one batch each."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all")
    try:
        await producer.start()
        for number in range(start, start + count):
            await producer.send_and_wait(
                topic, f"message-{number}".encode(), partition=number % PARTITIONS
            )
    finally:
        await producer.stop()


async def read_all(bootstrap_servers: str, expected: int, topic: str = TOPIC) -> list[bytes]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap_servers, enable_auto_commit=False, group_id=None
    )
    values: list[bytes] = []
    try:
        await consumer.start()
        partitions = [TopicPartition(topic, number) for number in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        for _ in range(50):
            polled = await consumer.getmany(timeout_ms=200)
            values.extend(record.value for batch in polled.values() for record in batch)
            if len(values) >= expected and not polled:
                break
    finally:
        await consumer.stop()
    return values


async def commit(bootstrap_servers: str, offsets: dict[int, int], group: str = GROUP) -> None:
    consumer = AIOKafkaConsumer(
        TOPIC,
        bootstrap_servers=bootstrap_servers,
        group_id=group,
        enable_auto_commit=False,
        **FAST_GROUP_SETTINGS,
    )
    try:
        await consumer.start()
        await consumer.getmany(timeout_ms=2000)  # joined and assigned
        await consumer.commit(
            {
                TopicPartition(TOPIC, partition): OffsetAndMetadata(offset, "")
                for partition, offset in offsets.items()
            }
        )
    finally:
        await consumer.stop()


async def committed(bootstrap_servers: str, group: str = GROUP) -> dict[int, int]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers)
    await admin.start()
    try:
        partitions = [TopicPartition(TOPIC, number) for number in range(PARTITIONS)]
        answer = await admin.list_consumer_group_offsets(group, partitions=partitions)
    finally:
        await admin.close()
    return {tp.partition: meta.offset for tp, meta in answer.items()}


def expected_values(count: int) -> list[bytes]:
    return [f"message-{number}".encode() for number in range(count)]


@pytest.mark.parametrize("victim", ["broker", "storage", "both"])
async def test_acknowledged_messages_and_offsets_survive_kill_9(
    tmp_path: Path, victim: str
) -> None:
    data_dir = tmp_path / "data"
    first = EmbeddedKafka(embedded(), data_dir)
    servers = await first.start()
    try:
        await create_topic(servers)
        await produce(servers, MESSAGES)
        await commit(servers, {0: 10, 1: 20})
        assert first.storage is not None and first.broker is not None
        if victim in ("broker", "both"):
            first.broker.kill()
        if victim in ("storage", "both"):
            first.storage.kill()
    finally:
        await first.stop()  # reaps what was killed, stops what was not

    second = EmbeddedKafka(embedded(), data_dir)
    servers = await second.start()
    try:
        assert sorted(await read_all(servers, MESSAGES)) == sorted(expected_values(MESSAGES))
        assert await committed(servers) == {0: 10, 1: 20}
        # And it takes new writes after the old ones.
        await produce(servers, 4, start=MESSAGES)
        assert len(await read_all(servers, MESSAGES + 4)) == MESSAGES + 4
    finally:
        await second.stop()


async def test_supervisor_restarts_what_dies_and_nothing_is_lost(
    durable: EmbeddedKafka,
) -> None:
    servers = durable.bootstrap_servers
    assert durable.storage is not None and durable.broker is not None
    await create_topic(servers)
    await produce(servers, 20)

    durable.storage.kill()
    await durable.storage.wait_exited()
    await _wait_until(lambda: durable.restarts()["storage"] == 1 and durable.alive())
    durable.broker.kill()
    await durable.broker.wait_exited()
    await _wait_until(lambda: durable.restarts()["broker"] == 1 and durable.alive())

    await produce(servers, 20, start=20)
    assert sorted(await read_all(servers, 40)) == sorted(expected_values(40))
    assert durable.bootstrap_servers == servers  # clients keep their address


async def test_retention_deletes_only_expired_batches_every_group_committed(
    durable: EmbeddedKafka,
) -> None:
    servers = durable.bootstrap_servers
    await create_topic(servers)
    await create_topic(servers, "dead-letters")  # no sgpipe group: never trimmed
    await produce(servers, 40)  # 20 one-message batches per partition, offsets 0-19
    await produce(servers, 10, topic="dead-letters")
    await commit(servers, {0: 12, 1: 5})

    # Nothing is old enough yet.
    assert (await durable.sweep_retention()).batches == 0

    later = datetime.now(UTC) + timedelta(hours=durable.settings.retention_hours + 1)
    report = await durable.sweep_retention(now=later)
    # Partition 0: offsets 0-11 consumed; partition 1: 0-4.
    assert report.partitions == {(TOPIC, 0): 12, (TOPIC, 1): 5}
    assert report.batches == 12 + 5
    assert durable.retention_deleted_batches == 17

    remaining = await read_all(servers, 40 - 17)
    assert sorted(remaining) == sorted(
        [f"message-{n}".encode() for n in range(40) if n // PARTITIONS >= (12, 5)[n % PARTITIONS]]
    )
    assert len(await read_all(servers, 10, topic="dead-letters")) == 10
    # The group resumes where it was.
    assert await committed(servers) == {0: 12, 1: 5}
    # A second sweep finds nothing more to delete.
    assert (await durable.sweep_retention(now=later)).batches == 0


async def test_retention_waits_for_every_group_of_a_topic(tmp_path: Path) -> None:
    kafka = EmbeddedKafka(
        embedded(), tmp_path / "data", retention_groups={TOPIC: [GROUP, "sgpipe-other"]}
    )
    servers = await kafka.start()
    try:
        await create_topic(servers)
        await produce(servers, 20)
        await commit(servers, {0: 8, 1: 8})
        later = datetime.now(UTC) + timedelta(hours=kafka.settings.retention_hours + 1)
        # The other group has committed nothing: nothing may go.
        assert (await kafka.sweep_retention(now=later)).batches == 0
        await commit(servers, {0: 3, 1: 9}, group="sgpipe-other")
        report = await kafka.sweep_retention(now=later)
        assert report.partitions == {(TOPIC, 0): 3, (TOPIC, 1): 8}
    finally:
        await kafka.stop()


async def test_storage_refuses_anonymous_access_and_keeps_its_secrets_private(
    durable: EmbeddedKafka,
) -> None:
    assert durable.storage is not None
    credentials = durable.storage.layout.credentials
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{durable.storage.endpoint}/{BUCKET}/") as anonymous:
            assert anonymous.status == 403
        assert await durable.storage.s3_client(session).bucket_exists(BUCKET)
    # The filer's HTTP API (no authentication of its own) is switched off.
    assert durable.storage.ports is not None
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            f"http://127.0.0.1:{durable.storage.ports.filer}/buckets/{BUCKET}/",
            headers={"Accept": "application/json"},
        ) as listing,
    ):
        assert listing.status == 404
    options = (durable.storage.layout.seaweedfs / "mini.options").read_text()
    assert "master.telemetry=false" in options


async def test_ports_in_use_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=f"embedded.storage_port {port}"):
            await EmbeddedKafka(embedded(storage_port=port), tmp_path / "a").start()
        kafka = EmbeddedKafka(embedded(kafka_port=port), tmp_path / "b")
        with pytest.raises(PortInUse, match=f"embedded.kafka_port {port}"):
            await kafka.start()
        # The storage it had started was stopped again.
        assert kafka.storage is not None and not kafka.storage.alive()


async def test_restart_reuses_ports_and_leaves_no_sockets_in_tmp(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = EmbeddedKafka(embedded(), data_dir)
    await first.start()
    assert first.storage is not None and first.storage.ports is not None
    ports = first.storage.ports
    first.storage.kill()  # leaves its /tmp sockets behind
    await first.storage.wait_exited()
    await first.stop()
    assert not any(path.exists() for path in stale_socket_paths(ports))

    second = EmbeddedKafka(embedded(), data_dir)
    await second.start()
    try:
        assert second.storage is not None
        assert second.storage.ports == ports
        recorded = json.loads(second.storage.layout.ports.read_text())
        assert recorded["s3"] == ports.s3
    finally:
        await second.stop()
    assert not any(path.exists() for path in stale_socket_paths(ports))


@contextlib.contextmanager
def _squatting_the_volume_port(layout: storage.StorageLayout) -> Iterator[storage.StoragePorts]:
    """Ports recorded as a previous start left them, the volume port then taken by somebody
    else (chosen again should another process take it first: the suite runs weeds beside)."""
    for _ in range(20):
        recorded = storage.choose_ports("127.0.0.1", layout, 0)
        with socket.socket() as squatter:
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                squatter.bind(("127.0.0.1", recorded.volume))
            except OSError:
                layout.ports.unlink()
                continue
            squatter.listen()
            yield recorded
            return
    raise AssertionError("no port to squat on")


def _lie_that_it_is_free(monkeypatch: pytest.MonkeyPatch, port: int) -> None:
    """``port`` looks free to every check of the storage, as it did in the moment between
    a check and weed's bind, when somebody else took it."""
    honest = port_is_free
    monkeypatch.setattr(storage, "port_is_free", lambda h, p: p == port or honest(h, p))
    monkeypatch.setattr(storage, "require_free_ports", lambda host, ports: None)


async def test_a_weed_that_loses_a_port_race_at_start_starts_again_on_other_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    layout = storage.StorageLayout(tmp_path / "data" / "broker")
    layout.root.mkdir(parents=True)
    with _squatting_the_volume_port(layout) as recorded:
        _lie_that_it_is_free(monkeypatch, recorded.volume)
        weed = storage.SeaweedStorage(tmp_path / "data")
        with capture_logs() as logs:
            await weed.start()
        try:
            assert weed.alive() and weed.ports is not None
            assert set(weed.ports.named().values()).isdisjoint(recorded.named().values())
            assert json.loads(layout.ports.read_text(encoding="utf-8")) == asdict(weed.ports)
            [retry] = [e for e in logs if e["event"].startswith("embedded storage exited at start")]
            assert retry["ports"] == asdict(recorded)
            # weed's own words, quoted from its log
            assert f"port {recorded.volume} for Volume" in retry["error"]
        finally:
            await weed.stop()


async def test_a_weed_that_cannot_start_fails_after_its_attempts_quoting_its_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spawns = 0
    spawn = ChildProcess.spawn

    def counted(child: ChildProcess) -> None:
        nonlocal spawns
        spawns += 1
        spawn(child)

    monkeypatch.setattr(ChildProcess, "spawn", counted)
    monkeypatch.setattr(storage, "START_ATTEMPTS", 2)  # each one takes weed ~2 s to give up
    scratch = storage.StorageLayout(tmp_path / "scratch")
    scratch.root.mkdir()
    with _squatting_the_volume_port(scratch) as taken:
        pinned = taken.volume
        _lie_that_it_is_free(monkeypatch, pinned)
        # A pinned port is never traded for another: every attempt meets the squatter.
        weed = storage.SeaweedStorage(tmp_path / "data", s3_port=pinned)
        with pytest.raises(storage.ExitedAtStart, match=f"port {pinned} for S3"):
            await weed.start()
        await weed.stop()
    assert spawns == 2
    assert not weed.alive()


async def test_memory_storage_starts_no_storage_and_keeps_nothing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    kafka = EmbeddedKafka(embedded(broker_storage="memory"), data_dir)
    servers = await kafka.start()
    try:
        assert kafka.storage is None and kafka.alive()
        await create_topic(servers)
        await produce(servers, 4)
    finally:
        await kafka.stop()
    assert not (data_dir / "broker" / "seaweedfs").exists()


async def _wait_until(condition: object, timeout: float = 60.0) -> None:
    assert callable(condition)
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


async def test_a_second_instance_on_the_same_data_dir_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "LOCK_WAIT_SECONDS", 0.5)
    data_dir = tmp_path / "data"
    first = EmbeddedKafka(embedded(), data_dir)
    await first.start()
    try:
        # Even on other ports: two SeaweedFS on one directory would corrupt it.
        with pytest.raises(DataDirInUse):
            await EmbeddedKafka(embedded(), data_dir).start()
        assert first.alive()
    finally:
        await first.stop()
    second = EmbeddedKafka(embedded(), data_dir)
    await second.start()  # the lock went with the first one
    await second.stop()


async def test_storage_restarted_on_new_ports_gets_the_broker_along(
    durable: EmbeddedKafka,
) -> None:
    servers = durable.bootstrap_servers
    assert durable.storage is not None and durable.storage.ports is not None
    await create_topic(servers)
    await produce(servers, 10)
    old_ports = durable.storage.ports
    old_s3_port = old_ports.s3
    durable.storage.kill()
    await durable.storage.wait_exited()
    with socket.socket() as squatter:  # someone takes the S3 port before the restart
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", old_s3_port))
        squatter.listen()
        await _wait_until(lambda: durable.restarts()["storage"] == 1 and durable.alive())
        assert durable.storage.ports.s3 != old_s3_port
        await produce(servers, 10, start=10)
        assert sorted(await read_all(servers, 20)) == sorted(expected_values(20))
    # The killed weed's /tmp sockets went, though its ports are not used any more.
    assert [path for path in stale_socket_paths(old_ports) if path.exists()] == []


async def test_the_supervisor_sweeps_retention_periodically(tmp_path: Path) -> None:
    settings = embedded(retention_hours=0.0001, retention_check_seconds=0.2)  # 0.36 s
    kafka = EmbeddedKafka(settings, tmp_path / "data", retention_groups={TOPIC: [GROUP]})
    servers = await kafka.start()
    try:
        await create_topic(servers)
        await produce(servers, 12)
        await commit(servers, {0: 6, 1: 6})
        await _wait_until(lambda: kafka.retention_deleted_batches == 12 - 2)
        assert sorted(await read_all(servers, 2)) == [b"message-10", b"message-11"]
    finally:
        await kafka.stop()


async def test_a_relative_data_dir_works_and_the_broker_dir_is_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # `make up` passes --data-dir sgpipe-data
    kafka = EmbeddedKafka(embedded(), Path("sgpipe-data"))
    servers = await kafka.start()
    try:
        await create_topic(servers)
        await produce(servers, 2)
        broker_dir = tmp_path / "sgpipe-data" / "broker"
        assert (broker_dir / "seaweedfs" / "mini.options").exists()
        assert stat.S_IMODE(broker_dir.stat().st_mode) == 0o700  # personal data inside
    finally:
        await kafka.stop()


async def test_a_data_dir_too_deep_for_unix_sockets_still_works_and_cleans_up(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / ("deep" * 20) / "data"  # past the 107-byte unix socket path limit
    kafka = EmbeddedKafka(embedded(), data_dir)
    servers = await kafka.start()
    assert kafka.storage is not None and kafka.storage.ports is not None
    ports = kafka.storage.ports
    try:
        await create_topic(servers)
        await produce(servers, 2)
        assert Path(f"/tmp/seaweedfs-filer-{ports.filer}.sock").is_socket()
        kafka.storage.kill()  # leaves every /tmp socket behind
        await kafka.storage.wait_exited()
    finally:
        await kafka.stop()
    assert [path for path in stale_socket_paths(ports) if path.exists()] == []
