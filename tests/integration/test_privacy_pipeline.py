"""PII controls end to end: `sgpipe up` (embedded broker and ClickHouse) with every personal
field hashed receives signed SendGrid posts; no table then holds a plaintext address, recipient
IP or user agent, per-domain counts still work, and `sgpipe forget` -- run while `sgpipe up`
serves the data dir, through its endpoint as the writer -- removes one person's rows, found
from the plaintext address."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from processors.pii import DELIVERABILITY_EVENTS, PiiPolicy
from sgpipe.embedded.credentials import load_credentials
from sgpipe.runtime.clickhouse import connect, with_credentials
from sgpipe.runtime.settings import ClickHouseSettings
from sgpipe.simulator.dataset import simulated_posts
from sgpipe.simulator.keys import generate_private_key, public_key_base64, sign
from sgpipe.up import state_file
from tests import forked
from tests.integration.bi_support import Store, tables_containing
from tests.integration.test_up import SGPIPE, _wait_until_serving, start_pipeline, stop_pipeline

pytestmark = [pytest.mark.kafka, pytest.mark.clickhouse]

HASH_KEY = "a hash key for this test only"
POLICY = PiiPolicy("hash", "hash", "hash", HASH_KEY.encode())


def post(url: str, body: bytes, key: Any) -> int:
    timestamp = str(int(time.time()))
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json;charset=utf-8",
            "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
            "X-Twilio-Email-Event-Webhook-Signature": sign(key, timestamp, body),
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return int(response.status)


def personal_values(bodies: list[bytes]) -> tuple[set[str], set[str], set[str], set[str]]:
    """Addresses, recipient IPs and user agents the posts carry, and their event ids."""
    addresses, ips, agents, ids = set(), set(), set(), set()
    for body in bodies:
        for event in json.loads(body):
            ids.add(event["sg_event_id"])
            if "@" in str(event.get("email", "")):
                addresses.add(event["email"].strip())
            if event.get("ip") and event["event"] not in DELIVERABILITY_EVENTS:
                ips.add(event["ip"])
            if event.get("useragent"):
                agents.add(event["useragent"])
    return addresses, ips, agents, ids


def test_hashed_personal_data_stays_out_of_every_table_and_forget_works_while_up_runs(
    tmp_path: Path,
) -> None:
    key = generate_private_key()
    webhooks = [{"name": "main", "public_keys": [public_key_base64(key)]}]
    pii = {"email": "hash", "ip": "hash", "useragent": "hash", "hash_key": HASH_KEY}
    running = start_pipeline(tmp_path, webhooks=webhooks, pii=pii)
    try:
        _wait_until_serving(running)
        bodies = [p.body for p in simulated_posts(600, seed=41, duplicates=0.1)]
        for body in bodies:
            assert post(f"{running.base_url}/webhooks/main", body, key) == 200
        addresses, ips, agents, ids = personal_values(bodies)
        assert len(addresses) > 50 and ips and agents
        running.wait_for("SELECT count() FROM email_events_dedup", f"{len(ids)}\n", timeout=120)

        store_url = json.loads(state_file(running.data_dir).read_text())["clickhouse_url"]
        writer = load_credentials(running.data_dir).writer
        settings = with_credentials(ClickHouseSettings(), writer.name, writer.password)

        async def scan() -> dict[str, dict[str, int]]:
            client = await connect(settings, store_url)
            try:
                s = Store(store_url, client, "sgpipe")
                needles = sorted(addresses)[:25] + sorted(ips)[:5] + sorted(agents)
                return {n: found for n in needles if (found := await tables_containing(s, n))}
            finally:
                await client.close()

        assert asyncio.run(scan()) == {}
        domains = running.query(
            "SELECT count() FROM daily_domain_counts WHERE recipient_domain = 'gmail.com'"
        )
        assert int(domains) > 0

        victim = sorted(addresses)[0]
        pseudonym = POLICY.email_pseudonym(victim)
        rows = running.query(f"SELECT count() FROM email_events WHERE email = '{pseudonym}'")
        assert int(rows) > 0
        forgotten = forked.run(
            [
                *SGPIPE, "forget", "--config", str(running.config), "--data-dir",
                str(running.data_dir), "--email", victim.upper(), "--yes",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )  # fmt: skip
        assert forgotten.returncode == 0, forgotten.stderr
        assert f"email_events\t{int(rows)}" in forgotten.stdout.splitlines()
        for table in ("email_events", "message_lifecycle_state"):
            left = running.query(f"SELECT count() FROM {table} WHERE email = '{pseudonym}'")
            assert left == "0\n", table
        assert running.query("SELECT count() FROM email_events_dedup") != f"{len(ids)}\n"
    finally:
        stop_pipeline(running)
