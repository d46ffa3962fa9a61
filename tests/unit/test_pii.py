"""The processor's PII policy: per field keep, hash (keyed, stable, domain kept for addresses) or
drop, the same in the typed field, custom_args and raw; raw re-serialized only when needed."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.normalize import BatchContext, normalize_event
from processors.pii import PSEUDONYM_PREFIX, PiiPolicy
from processors.pipeline import process_raw_record
from processors.stage import pii_policy
from schemas.email_event import EmailEventCodec
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.messages import Message
from sgpipe.runtime.settings import ConfigError, PiiSettings, read_settings

KEY = b"a test key of at least 16 bytes"
HASH_ALL = PiiPolicy("hash", "hash", "hash", KEY)
DROP_ALL = PiiPolicy("drop", "drop", "drop")
CONTEXT = BatchContext("main", 1_700_000_000_000, "req-1")
# Built once: building the codec compiles its encoder (a tenth of a second), which per example
# made this property test the slowest of the unit suite.
PII_CODEC = EmailEventCodec()


def apply(policy: PiiPolicy, event: dict[str, Any]) -> tuple[dict[str, Any], str, tuple[str, ...]]:
    raw = json.dumps(event)
    item = msgspec.json.decode(raw.encode())
    return policy.apply(item, raw)


OPEN = {
    "email": "Alice.Smith@Example.COM",
    "event": "open",
    "sg_event_id": "ev-1",
    "sg_message_id": "msg-1",
    "timestamp": 1700000000,
    "ip": "203.0.113.7",
    "useragent": "Mozilla/5.0 (iPhone)",
    "user_email": "alice.smith@example.com",
    "note": "sent to Alice.Smith@example.com by campaign 7",
    "unsubscribe_url": "https://shop.example/u?email=alice.smith%40example.com&x=1",
    "profile": {"contact": ["ALICE.SMITH@EXAMPLE.COM"], "agent": "Mozilla/5.0 (iPhone)"},
    "last_ip": "203.0.113.7",
}


def test_keep_changes_nothing_and_keeps_raw_as_sent() -> None:
    raw = ' {"email":"a@b.com", "event":"open"} '
    item = {"email": "a@b.com", "event": "open"}
    assert PiiPolicy().apply(item, raw) == (item, raw, ())
    assert not PiiPolicy().active


def test_hash_replaces_every_occurrence_consistently() -> None:
    item, raw, changed = apply(HASH_ALL, OPEN)
    assert changed == ("email", "ip", "useragent")
    pseudonym = HASH_ALL.email_pseudonym("alice.smith@example.com")
    assert pseudonym.startswith(PSEUDONYM_PREFIX) and pseudonym.endswith("@example.com")
    assert item["email"] == item["user_email"] == pseudonym
    assert item["note"] == f"sent to {pseudonym} by campaign 7"
    assert item["unsubscribe_url"] == f"https://shop.example/u?email={pseudonym}&x=1"
    assert item["profile"]["contact"] == [pseudonym]
    assert item["ip"] == item["last_ip"] == HASH_ALL.pseudonym("203.0.113.7")
    assert (
        item["useragent"] == item["profile"]["agent"] == HASH_ALL.pseudonym("Mozilla/5.0 (iPhone)")
    )
    assert json.loads(raw) == item  # raw is the same object, re-serialized
    for secret in ("alice.smith", "203.0.113.7", "Mozilla/5.0 (iPhone)"):
        assert secret.lower() not in raw.lower()


def test_pseudonyms_are_keyed_stable_and_ignore_letter_case() -> None:
    assert HASH_ALL.email_pseudonym(" Bob@X.org") == HASH_ALL.email_pseudonym("bob@x.org")
    other_key = PiiPolicy("hash", key=b"another key, also long enough")
    assert other_key.email_pseudonym("bob@x.org") != HASH_ALL.email_pseudonym("bob@x.org")
    assert HASH_ALL.email_pseudonym("no-domain") == HASH_ALL.pseudonym("no-domain")


def test_drop_removes_the_field_and_blanks_its_copies() -> None:
    item, raw, changed = apply(DROP_ALL, OPEN)
    assert changed == ("email", "ip", "useragent")
    assert not {"email", "ip", "useragent"} & set(item)
    assert item["user_email"] == item["last_ip"] == ""
    assert item["note"] == "sent to  by campaign 7"
    record = normalize_event(item, raw, CONTEXT).record
    assert record.get("email") is None and "ip" not in record and "useragent" not in record
    assert record["custom_args"]["user_email"] == ""


def test_the_sending_ip_of_deliverability_events_is_kept() -> None:
    delivered = {**OPEN, "event": "delivered", "ip": "168.245.12.3"}
    item, _, changed = apply(PiiPolicy(ip="hash", key=KEY), delivered)
    assert changed == () and item["ip"] == "168.245.12.3"
    unknown = {**OPEN, "event": "a_new_type", "ip": "203.0.113.9"}
    item, _, changed = apply(PiiPolicy(ip="drop"), unknown)
    assert changed == ("ip",) and "ip" not in item


def test_an_event_without_the_fields_keeps_its_exact_bytes() -> None:
    raw = '{"event":"processed",  "sg_event_id":"x"}'
    item = {"event": "processed", "sg_event_id": "x"}
    assert HASH_ALL.apply(item, raw) == (item, raw, ())


def test_a_non_text_address_is_hashed_inside() -> None:
    item, _, _ = apply(HASH_ALL, {"event": "open", "email": ["a@b.com", 7]})
    assert item["email"] == [HASH_ALL.email_pseudonym("a@b.com"), 7]
    item, _, _ = apply(DROP_ALL, {"event": "open", "email": {"x": "a@b.com"}, "y": "a@b.com"})
    assert "email" not in item and item["y"] == ""


def test_hashing_needs_a_key() -> None:
    with pytest.raises(ValueError, match="key"):
        PiiPolicy(email="hash")
    with pytest.raises(ConfigError, match="pii.hash_key"):
        read_settings(None, {"SGPIPE_PII__EMAIL": "hash"})
    with pytest.raises(ConfigError, match="at least 16"):
        read_settings(None, {"SGPIPE_PII__IP": "hash", "SGPIPE_PII__HASH_KEY": "short"})
    loaded = read_settings(
        None, {"SGPIPE_PII__EMAIL": "hash", "SGPIPE_PII__HASH_KEY": KEY.decode()}
    )
    policy = pii_policy(loaded.settings.pii)
    assert policy is not None and policy.email_pseudonym("a@b.c") == HASH_ALL.email_pseudonym(
        "a@b.c"
    )
    assert pii_policy(PiiSettings()) is None  # off by default


def batch_message(elements: list[bytes]) -> Message:
    body = b"[" + b",\r\n".join(elements) + b"]\r\n"
    raw = RawBatch("main", body, 1_700_000_000_000, "req-1", None, "signature")
    return Message("raw", 0, 0, 0, None, body, raw_batch_headers(raw))


def test_the_processor_publishes_no_plaintext_and_counts_what_it_masked() -> None:
    codec = EmailEventCodec()
    elements = [
        json.dumps(OPEN).encode(),
        b'{"event":"processed","sg_event_id":"p","email":"carol@d.io"}',
    ]
    processed = process_raw_record(batch_message(elements), codec, pii=HASH_ALL)
    assert processed.rejections == []
    assert processed.pii_masked == {"email": 2, "ip": 1, "useragent": 1}
    for event in processed.events:
        for secret in (b"alice.smith", b"carol@d.io", b"203.0.113.7", b"iphone"):
            assert secret not in event.value.lower()
        record = codec.decode(event.value)
        assert record["email"].startswith(PSEUDONYM_PREFIX)


# A local part that cannot occur in the hex of a pseudonym (which keeps the domain).
addresses = st.builds(
    lambda local, domain: f"u{local}@{domain}.com",
    st.text("abcdefghij0123456789._+", min_size=1, max_size=12),
    st.text("abcdefghij", min_size=1, max_size=8),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text("xyz_", max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=200, deadline=None)
@given(
    address=addresses,
    extra=st.dictionaries(st.text("xyz_", min_size=1, max_size=5), json_values, max_size=4),
    placements=st.lists(
        st.tuples(st.text("xyz_", min_size=1, max_size=5), st.text(max_size=5), st.booleans()),
        max_size=3,
    ),
)
def test_with_hashing_no_plaintext_address_reaches_the_record(
    address: str, extra: dict[str, Any], placements: list[tuple[str, str, bool]]
) -> None:
    event: dict[str, Any] = {**extra, "event": "open", "email": address.upper()}
    for key, prefix, nested in placements:  # the address inside other values, in any case
        text = f"{prefix}{address.swapcase()}{prefix}"
        event[f"arg_{key}"] = [{"v": text}] if nested else text
    raw = json.dumps(event)
    item, new_raw, _ = HASH_ALL.apply(msgspec.json.decode(raw.encode()), raw)
    record = normalize_event(item, new_raw, CONTEXT).record
    encoded = PII_CODEC.encode(record).decode("utf-8", "replace")
    assert address.lower() not in encoded.lower()
    assert record["email"] == HASH_ALL.email_pseudonym(address)
