"""The embedded storage's ports: chosen free, and never one reserved for somebody else.

The ports are free in these tests by decree (``port_is_free`` patched): what is checked is the
choice, not the machine's sockets."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from sgpipe.embedded import storage
from sgpipe.embedded.storage import GRPC_PORT_OFFSET, StorageLayout, StoragePorts, choose_ports

LOW = 11_000


@pytest.fixture
def layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> StorageLayout:
    monkeypatch.setattr(storage, "port_is_free", lambda host, port: True)
    tmp_path.joinpath("broker").mkdir()
    return StorageLayout(tmp_path / "broker")


def every_port(ports: StoragePorts) -> set[int]:
    return set(ports.named().values())


def test_a_reserved_port_is_never_chosen_nor_its_grpc_twin(
    layout: StorageLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Seven candidates for five components: with two of them reserved (one as an HTTP port,
    # one as the gRPC twin of another), exactly the other five can be chosen.
    monkeypatch.setattr(storage, "PORT_RANGE", (LOW, LOW + 7))
    reserved = {LOW + 3, LOW + GRPC_PORT_OFFSET}

    for _ in range(20):  # the choice is random: the rule must hold for every draw
        layout.ports.unlink(missing_ok=True)
        ports = choose_ports("127.0.0.1", layout, 0, reserved)

        assert every_port(ports) & reserved == set()
        assert set(asdict(ports).values()) == {LOW + 1, LOW + 2, LOW + 4, LOW + 5, LOW + 6}


def test_recorded_ports_that_are_now_reserved_are_chosen_again(
    layout: StorageLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(storage, "PORT_RANGE", (LOW, LOW + 100))
    recorded = StoragePorts(
        s3=LOW, master=LOW + 10, volume=LOW + 20, filer=LOW + 30, admin=LOW + 40
    )
    layout.ports.write_text(json.dumps(asdict(recorded)))

    assert choose_ports("127.0.0.1", layout, 0) == recorded  # all free: kept

    ingress_port = LOW + 10 + GRPC_PORT_OFFSET  # the master's gRPC twin
    ports = choose_ports("127.0.0.1", layout, 0, {ingress_port})

    assert ingress_port not in every_port(ports)
    assert json.loads(layout.ports.read_text()) == asdict(ports)  # recorded for next time


def test_the_pinned_s3_port_is_kept_even_when_listed_among_the_reserved(
    layout: StorageLayout, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `sgpipe up` reserves every port it claims, embedded.storage_port included.
    monkeypatch.setattr(storage, "PORT_RANGE", (LOW, LOW + 100))
    pinned = 9_555

    ports = choose_ports("127.0.0.1", layout, pinned, {pinned, LOW + 1})

    assert ports.s3 == pinned
    assert LOW + 1 not in every_port(ports)


def test_sgpipe_ups_storage_reserves_the_ports_sgpipe_up_claims(tmp_path: Path) -> None:
    from sgpipe.runtime.settings import Settings
    from sgpipe.up.supervisor import embedded_kafka

    settings = Settings.model_validate(
        {"ingest": {"port": 22_570}, "embedded": {"kafka_port": 22_571, "storage_port": 22_572}}
    )

    broker = embedded_kafka(settings, tmp_path)

    assert broker.storage is not None
    assert {22_570, 22_571, 22_572} <= broker.storage.reserved_ports


def test_the_tests_pick_their_ports_outside_every_range_sgpipe_up_picks_from() -> None:
    # Another worker's `sgpipe up` picks its storage ports at random (and the kernel hands
    # out ephemeral ones): a test's port held across a restart must not be among them.
    from tests.ports import _ephemeral_start, free_port

    picked = {free_port() for _ in range(200)}

    assert max(picked) < min(storage.PORT_RANGE[0], _ephemeral_start())
