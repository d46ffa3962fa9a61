"""normalize_event and its helpers over one realistic payload per SendGrid event type and quirk
(``tests/fixtures/events/*.json``), invalid inputs, and hypothesis properties."""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.errors import InvalidEvent, InvalidMessage
from processors.normalize import (
    RESERVED_FIELDS,
    BatchContext,
    custom_arguments,
    normalize_category,
    normalize_event,
    normalize_timestamp,
)
from schemas.email_event import EmailEvent, EmailEventCodec

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "events"
CONTEXT = BatchContext(webhook="main", received_at_ms=1_700_000_100_000, request_id="req-1")
CODEC = EmailEventCodec()
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

MSG_ID = "14c5d75ce93.dfd.64b469.filter0001.16648.5515E0B88.000000000000000000000"
SMTP_ID = "<14c5d75ce93.dfd.64b469@ismtpd-555>"


class Expected(NamedTuple):
    event: str
    sg_event_id: str
    event_time_ms: int
    email: str | None
    sg_message_id: str | None
    smtp_id: str | None
    category: list[str]
    custom_args: dict[str, str]


EXPECTED: dict[str, Expected] = {
    "processed": Expected(
        "processed", "rbtnWrG1DVDGGGFHFyun0A==", 1_513_299_569_000, "example@test.com",
        MSG_ID, SMTP_ID, ["cat facts", "onboarding"], {"userid": "1123"},
    ),
    "dropped": Expected(
        "dropped", "ZHJvcC0xMDk5NDkxOS1MUnpYbF9OSFN0T0doUTRrb2ZTbV9BLTA", 1_600_112_492_000,
        "hello@world.com",
        "LRzXl_NHStOGhQ4kofSm_A.filterdrecv-p3mdw1-756b745b58-kmzbl-18-5F5FC76C-9.0",
        "<LRzXl_NHStOGhQ4kofSm_A@ismtpd0039p1iad1.sendgrid.net>", ["cat facts"], {},
    ),
    "delivered": Expected(
        "delivered", "rWVYmVk90MjZJ9iohOBa3w==", 1_513_299_569_000, "example@test.com",
        MSG_ID, SMTP_ID, ["cat facts"], {},
    ),
    "deferred": Expected(
        "deferred", "t7LEShmowp86DTdUW8M-GQ==", 1_513_299_569_000, "example@test.com",
        MSG_ID, SMTP_ID, ["cat facts"], {},
    ),
    "bounce": Expected(
        "bounce", "6g4ZI7SA-xmRDv57GoPIPw==", 1_513_299_569_000, "example@test.com",
        MSG_ID, SMTP_ID, ["cat facts"], {},
    ),
    "bounce_blocked_async": Expected(
        "bounce", "Ym91bmNlLWFzeW5jLTE", 1_513_299_600_000, "invalid-address",
        None, None, [], {},
    ),
    "open": Expected(
        "open", "FOTFFO0ecsBE-zxFXfs6WA==", 1_513_299_569_000, "example@test.com",
        MSG_ID, None, ["cat facts"], {},
    ),
    "click": Expected(
        "click", "kCAi1KttyQdEKHhdC-nuEA==", 1_513_299_569_000, "example@test.com",
        MSG_ID, None, ["cat facts"], {},
    ),
    "spamreport": Expected(
        "spamreport", "37nvH5QBz858KGVYCM4uOA==", 1_513_299_569_000, "example@test.com",
        MSG_ID, SMTP_ID, ["cat facts"], {},
    ),
    "unsubscribe": Expected(
        "unsubscribe", "zz_BjPgU_5pS-J8vlfB1sg==", 1_513_299_569_000, "example@test.com",
        MSG_ID, SMTP_ID, ["cat facts"], {},
    ),
    "group_unsubscribe": Expected(
        "group_unsubscribe", "ahSCB7xYcXFb-hEaawsPRw==", 1_513_299_569_000, "example@test.com",
        MSG_ID, SMTP_ID, ["cat facts"], {},
    ),
    "group_resubscribe": Expected(
        "group_resubscribe", "w_u0vJhLT-OFfprar5N93g==", 1_513_299_569_000, "example@test.com",
        MSG_ID, SMTP_ID, ["cat facts"], {},
    ),
    "account_status_change": Expected(
        "account_status_change", "MjEzNTg5OTcyOC10ZXJtaW5hdGUtMTcwNzg1MTUzMQ",
        1_709_142_428_000, None, None, None, [], {},
    ),
    "quirk_timestamp_string": Expected(
        "delivered", "dGltZXN0YW1wLXN0cmluZw", 1_700_000_001_000, "quirk@example.com",
        "tsstr.filterdrecv-1", None, [], {},
    ),
    "quirk_timestamp_milliseconds": Expected(
        "delivered", "c2luZ2xlc2VuZC1tcw", 1_700_000_002_123, "single@example.com",
        "singlesend.filterdrecv-2", None, [], {"campaign_code": "OCT24"},
    ),
    "quirk_category_string": Expected(
        "processed", "Y2F0ZWdvcnktc3RyaW5n", 1_700_000_003_000, "cat@example.com",
        "catstr.filterdrecv-3", None, ["newsletter"], {},
    ),
    "quirk_category_array": Expected(
        "processed", "Y2F0ZWdvcnktYXJyYXk", 1_700_000_004_000, "cat@example.com",
        "catarr.filterdrecv-4", None, ["newsletter", "week 42", "Zürich"], {},
    ),
    "quirk_sg_message_id_leading_space": Expected(
        "open", "bGVhZGluZy1zcGFjZQ", 1_700_000_005_000, "space@example.com",
        "filterdrecv-p3las1-5bf99c48d5-2nmvr-20-5F5BD4E7-3.0", None, [], {},
    ),
    "quirk_smtp_id_empty": Expected(
        "processed", "ZW1wdHktc210cC1pZA", 1_700_000_006_000, "smtp@example.com",
        "smtpempty.filterdrecv-6", None, [], {},
    ),
    "quirk_custom_args": Expected(
        "delivered", "Y3VzdG9tLWFyZ3M", 1_700_000_007_000, "args@example.com",
        "customargs.filterdrecv-7", None, [],
        {
            "userid": "1123",
            "plan_id": "42",
            "ratio": "0.25",
            "vip": "true",
            "coupon": "null",
            "tags": '["spring","sale"]',
            "meta": '{"source":"app","ab":[1,2]}',
            "city": "Zürich",
            "empty": "",
        },
    ),
    "quirk_unknown_event_type": Expected(
        "ai_summary_read", "bmV3LWV2ZW50LXR5cGU", 1_700_000_008_000, "future@example.com",
        "future.filterdrecv-8", None, [], {"reading_seconds": "12.5"},
    ),
}  # fmt: skip


def load_fixture(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text("utf-8"))
    return document


def decoded_expectation(event: EmailEvent) -> dict[str, Any]:
    """What EmailEventCodec.decode must return for ``event``."""
    record = dataclasses.asdict(event)
    record["event_time"] = EPOCH + timedelta(milliseconds=record.pop("event_time_ms"))
    record["received_at"] = EPOCH + timedelta(milliseconds=record.pop("received_at_ms"))
    return record


def invalid_reason(item: Any) -> str:
    with pytest.raises(InvalidEvent) as caught:
        normalize_event(item, CONTEXT)
    return caught.value.reason


# --- fixtures --------------------------------------------------------------------------------


def test_every_fixture_has_an_expectation() -> None:
    assert {path.stem for path in FIXTURES.glob("*.json")} == set(EXPECTED)


def test_fixtures_cover_every_documented_event_type() -> None:
    documented = {
        "processed", "dropped", "delivered", "deferred", "bounce", "open", "click",
        "spamreport", "unsubscribe", "group_unsubscribe", "group_resubscribe",
        "account_status_change",
    }  # fmt: skip
    assert documented <= {load_fixture(name)["event"] for name in EXPECTED}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_normalizes_to_the_expected_fields(name: str) -> None:
    item = load_fixture(name)
    expected = EXPECTED[name]

    event = normalize_event(item, CONTEXT)

    assert event.event == expected.event
    assert event.sg_event_id == expected.sg_event_id
    assert event.event_time_ms == expected.event_time_ms
    assert event.email == expected.email
    assert event.sg_message_id == expected.sg_message_id
    assert event.smtp_id == expected.smtp_id
    assert event.category == expected.category
    assert event.custom_args == expected.custom_args
    assert not event.custom_args.keys() & RESERVED_FIELDS
    assert set(event.custom_args) == set(item) - RESERVED_FIELDS
    assert (event.webhook, event.received_at_ms, event.request_id) == (
        "main",
        1_700_000_100_000,
        "req-1",
    )
    assert json.loads(event.raw) == item


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_fixture_round_trips_through_the_codec(name: str) -> None:
    event = normalize_event(load_fixture(name), CONTEXT)
    assert CODEC.decode(CODEC.encode(event)) == decoded_expectation(event)


def test_raw_keeps_non_ascii_and_reserved_fields_verbatim() -> None:
    item = load_fixture("click")
    event = normalize_event(item, CONTEXT)
    raw = json.loads(event.raw)
    assert raw["url_offset"] == {"index": 0, "type": "html"}
    assert raw["url"] == "http://www.sendgrid.com/"
    assert "url_offset" not in event.custom_args
    assert event.raw == json.dumps(item, separators=(",", ":"), ensure_ascii=False)


def test_reserved_fields_include_the_documented_extras() -> None:
    # Marketing Campaigns and deferred-event keys are SendGrid's, not the sender's.
    documented = {
        "marketing_campaign_version", "singlesend_id", "mc_stats", "domain", "from",
        "cert_err", "reseller_id", "sg_machine_open", "url_offset", "tls", "attempt",
    }  # fmt: skip
    assert documented <= RESERVED_FIELDS


# --- invalid events --------------------------------------------------------------------------

VALID: dict[str, Any] = {"event": "delivered", "sg_event_id": "abc", "timestamp": 1_700_000_000}


_DROP = object()  # with_fields(key=_DROP) leaves the key out


def with_fields(**fields: Any) -> dict[str, Any]:
    item = {**VALID, **fields}
    return {key: value for key, value in item.items() if value is not _DROP}


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        pytest.param([VALID], "not_an_object", id="array"),
        pytest.param("delivered", "not_an_object", id="string"),
        pytest.param(None, "not_an_object", id="null"),
        pytest.param(17, "not_an_object", id="number"),
        pytest.param({}, "missing_event", id="empty-object"),
        pytest.param(with_fields(event=_DROP), "missing_event", id="no-event"),
        pytest.param(with_fields(event=""), "missing_event", id="empty-event"),
        pytest.param(with_fields(event=None), "missing_event", id="null-event"),
        pytest.param(with_fields(event=5), "invalid_event", id="numeric-event"),
        pytest.param(with_fields(event=["open"]), "invalid_event", id="array-event"),
        pytest.param(with_fields(sg_event_id=_DROP), "missing_sg_event_id", id="no-id"),
        pytest.param(with_fields(sg_event_id=""), "missing_sg_event_id", id="empty-id"),
        pytest.param(with_fields(sg_event_id=12345), "invalid_sg_event_id", id="numeric-id"),
        pytest.param(with_fields(sg_event_id={"id": "x"}), "invalid_sg_event_id", id="object-id"),
        pytest.param(with_fields(sg_event_id=True), "invalid_sg_event_id", id="bool-id"),
        pytest.param(with_fields(timestamp=_DROP), "missing_timestamp", id="no-timestamp"),
        pytest.param(with_fields(timestamp=None), "missing_timestamp", id="null-timestamp"),
        pytest.param(with_fields(timestamp=True), "invalid_timestamp", id="bool-timestamp"),
        pytest.param(with_fields(timestamp=False), "invalid_timestamp", id="false-timestamp"),
        pytest.param(with_fields(timestamp=-1), "invalid_timestamp", id="negative"),
        pytest.param(with_fields(timestamp="-1700000000"), "invalid_timestamp", id="negative-str"),
        pytest.param(with_fields(timestamp=math.nan), "invalid_timestamp", id="nan"),
        pytest.param(with_fields(timestamp="NaN"), "invalid_timestamp", id="nan-string"),
        pytest.param(with_fields(timestamp=math.inf), "invalid_timestamp", id="infinity"),
        pytest.param(with_fields(timestamp="1e400"), "invalid_timestamp", id="overflowing-str"),
        pytest.param(with_fields(timestamp="soon"), "invalid_timestamp", id="non-numeric"),
        pytest.param(with_fields(timestamp=""), "invalid_timestamp", id="empty-string"),
        pytest.param(with_fields(timestamp=[1700000000]), "invalid_timestamp", id="array"),
        pytest.param(with_fields(timestamp={"s": 1}), "invalid_timestamp", id="object"),
        pytest.param(with_fields(timestamp=10**20), "invalid_timestamp", id="absurdly-large"),
        pytest.param(with_fields(timestamp=1e300), "invalid_timestamp", id="absurd-float"),
        pytest.param(
            with_fields(timestamp=10_413_792_000_000), "invalid_timestamp", id="after-2299"
        ),
        # Seconds past 2299 would wrap around in ClickHouse rather than fail: refuse them.
        pytest.param(
            with_fields(timestamp=99_999_999_999), "invalid_timestamp", id="seconds-in-5138"
        ),
        pytest.param(with_fields(email={"address": "a@b.c"}), "invalid_email", id="dict-email"),
        pytest.param(with_fields(email=["a@b.c"]), "invalid_email", id="array-email"),
        pytest.param(with_fields(email=True), "invalid_email", id="bool-email"),
        pytest.param(with_fields(sg_message_id=["m"]), "invalid_sg_message_id", id="array-msg"),
        pytest.param(with_fields(**{"smtp-id": {}}), "invalid_smtp_id", id="object-smtp-id"),
    ],
)
def test_invalid_event_reason(item: Any, reason: str) -> None:
    assert invalid_reason(item) == reason


def test_invalid_event_is_an_invalid_message_with_detail() -> None:
    with pytest.raises(InvalidMessage) as caught:
        normalize_event(with_fields(sg_event_id=_DROP), CONTEXT)
    assert isinstance(caught.value, InvalidEvent)
    assert caught.value.detail == "the event has no sg_event_id"
    assert str(caught.value) == "missing_sg_event_id: the event has no sg_event_id"


# Found by this suite: math.isfinite raised OverflowError on such an int.
def test_integer_timestamp_beyond_float_range_is_invalid() -> None:
    item = json.loads('{"event":"open","sg_event_id":"x","timestamp":1' + "0" * 400 + "}")
    assert invalid_reason(item) == "invalid_timestamp"


# --- field helpers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(0, 0, id="epoch"),
        pytest.param(1_600_112_492, 1_600_112_492_000, id="seconds"),
        pytest.param("1600112492", 1_600_112_492_000, id="string-seconds"),
        pytest.param(" 1600112492\n", 1_600_112_492_000, id="padded-string"),
        pytest.param(1_600_112_492.25, 1_600_112_492_250, id="float-seconds"),
        pytest.param("1600112492.5", 1_600_112_492_500, id="string-float-seconds"),
        pytest.param(17e8, 1_700_000_000_000, id="exponent-float"),
        pytest.param("1.7e9", 1_700_000_000_000, id="exponent-string"),
        pytest.param(1_600_112_492_123, 1_600_112_492_123, id="milliseconds"),
        pytest.param("1600112492123", 1_600_112_492_123, id="string-milliseconds"),
        pytest.param(10_413_791_999, 10_413_791_999_000, id="largest-seconds"),
        pytest.param(100_000_000_000, 100_000_000_000, id="smallest-milliseconds"),
        pytest.param(10_413_791_999_999, 10_413_791_999_999, id="end-of-2299"),
    ],
)
def test_normalize_timestamp(value: Any, expected: int) -> None:
    assert normalize_timestamp(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, [], id="absent"),
        pytest.param("cat facts", ["cat facts"], id="string"),
        pytest.param("", [""], id="empty-string"),
        pytest.param([], [], id="empty-array"),
        pytest.param(["a", "b"], ["a", "b"], id="array"),
        pytest.param(["a", 1, None, {"k": "v"}], ["a", "1", "null", '{"k":"v"}'], id="mixed"),
        pytest.param(5, ["5"], id="number"),
        pytest.param({"k": "ü"}, ['{"k":"ü"}'], id="object"),
    ],
)
def test_normalize_category(value: Any, expected: list[str]) -> None:
    assert normalize_category(value) == expected


def test_custom_arguments_are_the_non_reserved_keys_as_strings() -> None:
    item = {"event": "open", "email": "x@y.z", "tls": 1, "plan": "pro", "n": 3, "f": math.nan}
    assert custom_arguments(item) == {"plan": "pro", "n": "3", "f": "NaN"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("  a@example.com ", "a@example.com", id="padded"),
        pytest.param("", None, id="empty"),
        pytest.param("   ", None, id="blank"),
        pytest.param(12345, "12345", id="number"),
        pytest.param("not an address", "not an address", id="invalid-address-kept"),
    ],
)
def test_email_is_text_or_absent(value: Any, expected: str | None) -> None:
    assert normalize_event(with_fields(email=value), CONTEXT).email == expected


# --- properties ------------------------------------------------------------------------------

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=6,
)
json_keys = st.text(max_size=6) | st.sampled_from(sorted(RESERVED_FIELDS))
arbitrary_objects = st.dictionaries(json_keys, json_values, max_size=6)

timestamps = (
    st.integers(min_value=0, max_value=10**10)
    | st.integers(min_value=10**11, max_value=3 * 10**14)
    | st.floats(min_value=0, max_value=1e15)
    | st.integers(min_value=0, max_value=10**10).map(str)
    | json_values
)
likely_valid_objects = st.builds(
    lambda required, extra: {**required, **extra},
    st.fixed_dictionaries(
        {
            "event": st.sampled_from(["open", "bounce", "click"]) | st.text(min_size=1),
            "sg_event_id": st.text(min_size=1, max_size=110),
            "timestamp": timestamps,
        },
        optional={
            "email": st.text(max_size=30) | json_scalars,
            "sg_message_id": st.text(max_size=30) | json_scalars,
            "smtp-id": st.text(max_size=30) | json_scalars,
            "category": st.text(max_size=10) | st.lists(json_values, max_size=4) | json_values,
        },
    ),
    arbitrary_objects,
)


@settings(max_examples=200, deadline=None)
@given(st.one_of(arbitrary_objects, likely_valid_objects))
def test_normalize_event_returns_an_encodable_event_or_raises_invalid_event(
    item: dict[str, Any],
) -> None:
    try:
        event = normalize_event(item, CONTEXT)
    except InvalidEvent as exc:
        assert exc.reason.startswith(("missing_", "invalid_"))
        return
    assert event.event == item["event"]
    assert event.sg_event_id == item["sg_event_id"]
    assert 0 <= event.event_time_ms <= 10_413_791_999_999
    assert set(event.custom_args) == set(item) - RESERVED_FIELDS
    assert all(isinstance(value, str) for value in event.category)
    assert json.loads(event.raw) == item
    decoded = CODEC.decode(CODEC.encode(event))
    expected = decoded_expectation(event)
    for name, value in expected.items():
        assert decoded[name] == value, name
    assert decoded.keys() == expected.keys()


@given(st.integers(min_value=0, max_value=10**10))
def test_integer_seconds_become_milliseconds(seconds: int) -> None:
    assert normalize_timestamp(seconds) == seconds * 1000
    assert normalize_timestamp(str(seconds)) == seconds * 1000


@given(st.integers(min_value=100_000_000_000, max_value=10_413_791_999_999))
def test_integer_milliseconds_are_kept(milliseconds: int) -> None:
    assert normalize_timestamp(milliseconds) == milliseconds
