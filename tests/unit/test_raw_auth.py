"""The raw-record HMAC (schemas/raw_auth.py) and the processor's check of it
(processors/authenticate.py, processors/stage.py): a raw record becomes events only when it
carries a valid HMAC by a configured key; every other one is dead-lettered as
``unauthenticated_raw_record``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.publisher import KafkaRawBatchPublisher, signed_headers
from processors.authenticate import UNAUTHENTICATED_RAW_RECORD, RawRecordAuthenticator
from processors.stage import processor_stage
from schemas.dead_letter import DeadLetterOrigin
from schemas.email_event import EmailEventCodec
from schemas.raw_auth import (
    RAW_HMAC_HEADER,
    TRUSTED_HEADERS,
    RawAuthKey,
    UnauthenticatedRawRecord,
    canonical_input,
    sign_raw_record,
    verify_raw_record,
)
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.dlq.letters import ReplayRecord, StoredLetter, forecast, plan_replay
from sgpipe.runtime.dead_letters import build_dead_letter
from sgpipe.runtime.messages import Message
from sgpipe.runtime.raw_auth import require_raw_auth
from sgpipe.runtime.settings import ConfigError, RawAuthSettings, Settings, load_settings
from tests.raw_auth_support import RAW_AUTH_DOCUMENT, TEST_RAW_AUTH_KEY, signed_raw_batch_headers

NEW_KEY = RawAuthKey("k2", b"n" * 40)
OLD_KEY = RawAuthKey("k1", b"o" * 40)
REMOVED_KEY = RawAuthKey("k0", b"r" * 40)
BODY = (
    b'[{"event":"delivered","sg_event_id":"ev-1","email":"a@example.com","timestamp":1700000000},'
    b'"not an event"]'
)
BATCH = RawBatch("main", BODY, 1_700_000_010_000, "req-1", 1_700_000_009, "signature", "json")


def rotation_settings(**raw_auth: Any) -> Settings:
    """Processor settings during a rotation: the new key signs, the old one still verifies."""
    keys = [{"id": key.key_id, "secret": key.secret.decode()} for key in (NEW_KEY, OLD_KEY)]
    return Settings.model_validate({"raw_auth": {"keys": keys, **raw_auth}})


def message(headers: list[tuple[str, bytes]], value: bytes | None = BODY) -> Message:
    return Message("raw", 0, 7, 0, None, value, tuple(headers))


def replaced(headers: list[tuple[str, bytes]], name: str, value: bytes) -> list[tuple[str, bytes]]:
    return [(n, value if n == name else v) for n, v in headers]


# --- the HMAC function ------------------------------------------------------------------------

header_values = st.binary(max_size=40)
# Every header the ingress writes and the processor reads (a batch with every optional field),
# named independently of TRUSTED_HEADERS: a header left out of the MAC fails below.
READ_HEADERS = tuple(name for name, _ in raw_batch_headers(BATCH))
trusted = st.fixed_dictionaries(dict.fromkeys(READ_HEADERS, header_values))


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=200), values=trusted, data=st.data())
def test_any_change_to_the_body_or_a_trusted_header_breaks_the_hmac(
    body: bytes, values: dict[str, bytes], data: st.DataObject
) -> None:
    headers = list(values.items())
    signed = sign_raw_record(NEW_KEY, body, headers)
    assert verify_raw_record([NEW_KEY], body, signed) == NEW_KEY

    # The body changed.
    other_body = data.draw(st.binary(max_size=200).filter(lambda b: b != body), "body")
    with pytest.raises(UnauthenticatedRawRecord, match="does not match"):
        verify_raw_record([NEW_KEY], other_body, signed)
    with pytest.raises(UnauthenticatedRawRecord, match="does not match"):
        verify_raw_record([NEW_KEY], None, signed)
    # One trusted header changed, dropped, or repeated.
    name = data.draw(st.sampled_from(READ_HEADERS), "header")
    value = data.draw(header_values.filter(lambda v: v != values[name]), "value")
    for tampered in (
        replaced(signed, name, value),
        [(n, v) for n, v in signed if n != name],
        [*signed, (name, values[name])],
    ):
        with pytest.raises(UnauthenticatedRawRecord, match="does not match"):
            verify_raw_record([NEW_KEY], body, tampered)


@settings(max_examples=200, deadline=None)
@given(first=st.binary(max_size=30), second=st.binary(max_size=30), cut=st.integers(0, 30))
def test_moving_bytes_between_fields_gives_another_input(
    first: bytes, second: bytes, cut: int
) -> None:
    # Length-prefixed fields: bytes moved from a header into the body (or between two
    # headers) never give the same input, so never the same MAC.
    joined = first + second
    moved = (joined[:cut], joined[cut:])
    if moved == (first, second):
        return
    webhook, request = TRUSTED_HEADERS[1], TRUSTED_HEADERS[3]
    original = canonical_input("k", second, [(webhook, first)])
    assert original != canonical_input("k", moved[1], [(webhook, moved[0])])
    assert canonical_input("k", b"", [(webhook, first), (request, second)]) != canonical_input(
        "k", b"", [(webhook, moved[0]), (request, moved[1])]
    )
    # Two values of one header: only their lengths tell where one ends.
    assert canonical_input("k", b"", [(webhook, first), (webhook, second)]) != canonical_input(
        "k", b"", [(webhook, moved[0]), (webhook, moved[1])]
    )


def test_headers_the_processor_does_not_trust_are_not_signed() -> None:
    signed = sign_raw_record(NEW_KEY, BODY, raw_batch_headers(BATCH))
    # A proxy's tracing header, or the replay headers of `sgpipe dlq replay`.
    with_more = [*signed, ("traceparent", b"00-abc"), ("sgpipe-replay-of", b"raw/0/1/0")]
    assert verify_raw_record([NEW_KEY], BODY, with_more) == NEW_KEY


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        pytest.param(raw_batch_headers(BATCH), "has no sgpipe-raw-hmac", id="missing"),
        pytest.param(
            [*raw_batch_headers(BATCH), (RAW_HMAC_HEADER, b"k2:" + b"0" * 64)],
            "malformed",
            id="malformed",
        ),
        pytest.param(
            replaced(
                sign_raw_record(NEW_KEY, BODY, raw_batch_headers(BATCH)),
                RAW_HMAC_HEADER,
                b"v1:k2:" + b"0" * 64,
            ),
            "does not match",
            id="wrong-mac",
        ),
        pytest.param(
            [
                *sign_raw_record(NEW_KEY, BODY, raw_batch_headers(BATCH)),
                *sign_raw_record(NEW_KEY, BODY, [])[-1:],
            ],
            "2 sgpipe-raw-hmac headers",
            id="two-macs",
        ),
        pytest.param(
            sign_raw_record(REMOVED_KEY, BODY, raw_batch_headers(BATCH)),
            "'k0', which is not in raw_auth.keys",
            id="removed-key",
        ),
        pytest.param(
            # The right key id, not the right secret: someone guessing.
            sign_raw_record(RawAuthKey("k2", b"x" * 40), BODY, raw_batch_headers(BATCH)),
            "does not match",
            id="forged-with-key-id",
        ),
    ],
)
def test_a_record_without_a_valid_hmac_is_refused(
    headers: list[tuple[str, bytes]], why: str
) -> None:
    with pytest.raises(UnauthenticatedRawRecord, match=why):
        verify_raw_record([NEW_KEY, OLD_KEY], BODY, headers)


def test_null_header_values_are_refused_or_signed_not_crashed_on() -> None:
    # Kafka allows a null header value; aiokafka hands it over as None.
    headers: list[Any] = [*raw_batch_headers(BATCH), (RAW_HMAC_HEADER, None)]
    with pytest.raises(UnauthenticatedRawRecord, match="malformed"):
        verify_raw_record([NEW_KEY], BODY, headers)
    nulled: list[Any] = [(n, None if n == "sgpipe-webhook" else v) for n, v in SIGNED_BY_NEW]
    with pytest.raises(UnauthenticatedRawRecord, match="does not match"):
        verify_raw_record([NEW_KEY], BODY, nulled)
    # Null and empty are different inputs.
    assert canonical_input("k", b"", [("sgpipe-webhook", None)]) != canonical_input(  # type: ignore[list-item]
        "k", b"", [("sgpipe-webhook", b"")]
    )


def test_the_secret_is_never_in_a_repr() -> None:
    assert "n" * 40 not in repr(NEW_KEY)
    settings = rotation_settings()
    assert "n" * 40 not in repr(settings) and "n" * 40 not in str(settings.raw_auth)


# --- the processor stage ----------------------------------------------------------------------


def processed(settings: Settings, headers: list[tuple[str, bytes]]) -> tuple[list[str], list[str]]:
    """(event ids, dead-letter reasons) of one raw record through the processor's step."""
    stage = processor_stage(settings, EmailEventCodec())
    result = stage.transform(message(headers))
    return [event.sg_event_id for event in result.outputs], [r.reason for r in result.rejections]


SIGNED_BY_NEW = sign_raw_record(NEW_KEY, BODY, raw_batch_headers(BATCH))


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(raw_batch_headers(BATCH), id="no-hmac"),
        pytest.param(
            replaced(SIGNED_BY_NEW, RAW_HMAC_HEADER, b"v1:k2:" + b"ab" * 32), id="wrong-hmac"
        ),
        pytest.param(replaced(SIGNED_BY_NEW, "sgpipe-webhook", b"other"), id="tampered-webhook"),
        pytest.param(
            replaced(SIGNED_BY_NEW, "sgpipe-received-at-ms", b"1"), id="tampered-received-at"
        ),
        pytest.param(
            sign_raw_record(REMOVED_KEY, BODY, raw_batch_headers(BATCH)), id="removed-key"
        ),
    ],
)
def test_the_processor_dead_letters_a_raw_record_without_a_valid_hmac(
    headers: list[tuple[str, bytes]],
) -> None:
    stage = processor_stage(rotation_settings(), EmailEventCodec())
    result = stage.transform(message(headers))
    assert result.outputs == []
    assert [(r.reason, r.payload, r.event_index) for r in result.rejections] == [
        (UNAUTHENTICATED_RAW_RECORD, None, None)  # the whole record, as it came
    ]
    letter = build_dead_letter(
        message(headers), result.rejections[0], stage="process", max_payload_bytes=1 << 20
    )
    assert (letter.reason, letter.payload) == (UNAUTHENTICATED_RAW_RECORD, BODY)


@pytest.mark.parametrize("key", [NEW_KEY, OLD_KEY], ids=["new-key", "old-key-in-list"])
def test_the_processor_takes_a_record_signed_by_any_key_in_the_list(key: RawAuthKey) -> None:
    headers = sign_raw_record(key, BODY, raw_batch_headers(BATCH))
    assert processed(rotation_settings(), headers) == (["ev-1"], ["not_an_object"])


def test_the_processor_refuses_to_start_without_a_key() -> None:
    with pytest.raises(ConfigError, match=r"raw_auth\.keys is empty"):
        processor_stage(Settings(), EmailEventCodec())


def test_allow_unauthenticated_processes_unsigned_records() -> None:
    settings = Settings.model_validate({"raw_auth": {"allow_unauthenticated": True}})
    assert processed(settings, raw_batch_headers(BATCH)) == (["ev-1"], ["not_an_object"])
    # With keys too: a record signed by none of them is processed anyway.
    with_keys = rotation_settings(allow_unauthenticated=True)
    assert processed(with_keys, raw_batch_headers(BATCH)) == (["ev-1"], ["not_an_object"])


def test_the_escape_hatch_is_warned_about_at_start() -> None:
    with structlog.testing.capture_logs() as logs:
        require_raw_auth(RawAuthSettings(allow_unauthenticated=True), stage="process")
    assert [(entry["log_level"], entry["setting"], entry["stage"]) for entry in logs] == [
        ("warning", "raw_auth.allow_unauthenticated", "process")
    ]
    assert logs[0]["event"].startswith("raw records are not authenticated")
    with structlog.testing.capture_logs() as logs:
        require_raw_auth(rotation_settings().raw_auth, stage="process")
    assert logs == []


# --- dead letters of elements, and their replay -------------------------------------------------


def stored(letter_headers: Sequence[tuple[str, bytes]], payload: bytes, index: int) -> StoredLetter:
    """The letter as `sgpipe dlq` reads it back from ClickHouse (headers as a text map)."""
    return StoredLetter(
        origin=DeadLetterOrigin("raw", 0, 7, index),
        stage="process",
        reason="not_an_object",
        detail="",
        webhook="main",
        request_id="req-1",
        dead_lettered_at="2026-01-01 00:00:00",
        replay_generation=0,
        replayed_at=None,
        payload_bytes=len(payload),
        payload=payload,
        headers={name: value.decode() for name, value in letter_headers},
    )


def test_an_element_dead_letter_replays_as_an_authenticated_batch_of_one() -> None:
    signed = sign_raw_record(OLD_KEY, BODY, raw_batch_headers(BATCH))
    stage = processor_stage(rotation_settings(), EmailEventCodec())
    raw = message(signed)
    rejection = stage.transform(raw).rejections[0]
    letter = build_dead_letter(raw, rejection, stage="process", max_payload_bytes=1 << 20)
    assert letter.payload == b'"not an event"'

    replay = plan_replay(stored(letter.context_headers, letter.payload, 1))
    assert isinstance(replay, ReplayRecord)
    assert replay.value == b'["not an event"]'
    # Signed by the processor with the current signing key, over the batch of one.
    assert verify_raw_record([NEW_KEY], replay.value, replay.headers) == NEW_KEY
    # The whole record's letter keeps the ingress's own HMAC, which still verifies.
    whole = plan_replay(stored(tuple(signed), BODY, -1))
    assert isinstance(whole, ReplayRecord)
    assert verify_raw_record([NEW_KEY, OLD_KEY], whole.value, whole.headers) == OLD_KEY


def test_an_unauthenticated_record_is_never_vouched_for() -> None:
    # With the escape hatch on, an unsigned record is processed, but its element dead letters
    # get no HMAC: a replay of them stays unauthenticated.
    settings = rotation_settings(allow_unauthenticated=True)
    stage = processor_stage(settings, EmailEventCodec())
    rejection = stage.transform(message(raw_batch_headers(BATCH))).rejections[0]
    assert rejection.reason == "not_an_object" and rejection.headers is None


# --- the ingress signs, with the first key ----------------------------------------------------


def test_the_ingress_signs_with_the_first_key() -> None:
    publisher = KafkaRawBatchPublisher(rotation_settings())
    headers = signed_headers(BATCH, publisher._signing_key)
    assert verify_raw_record([NEW_KEY], BATCH.body, headers) == NEW_KEY
    assert dict(headers)[RAW_HMAC_HEADER].startswith(b"v1:k2:")
    # Every header the ingress writes is covered.
    assert {name for name, _ in raw_batch_headers(BATCH)} <= set(TRUSTED_HEADERS)


def test_the_ingress_refuses_to_start_without_a_key() -> None:
    with pytest.raises(ConfigError, match=r"raw_auth\.keys is empty"):
        KafkaRawBatchPublisher(Settings())


def test_the_test_helper_signs_like_the_ingress() -> None:
    settings = Settings.model_validate({"raw_auth": RAW_AUTH_DOCUMENT})
    publisher = KafkaRawBatchPublisher(settings)
    assert signed_raw_batch_headers(BATCH) == signed_headers(BATCH, publisher._signing_key)
    assert publisher._signing_key == TEST_RAW_AUTH_KEY


# --- settings ---------------------------------------------------------------------------------


def test_keys_come_from_the_environment_as_json() -> None:
    keys = [{"id": "k2", "secret": "n" * 40}, {"id": "k1", "secret": "o" * 40}]
    settings = load_settings(None, {"SGPIPE_RAW_AUTH__KEYS": json.dumps(keys)})
    assert [key.id for key in settings.raw_auth.keys] == ["k2", "k1"]
    assert settings.raw_auth.keys[1].secret.get_secret_value() == "o" * 40


@pytest.mark.parametrize(
    ("keys", "message_part"),
    [
        ([{"id": "k1", "secret": "short"}], "at least 32 characters"),
        ([{"id": "k1", "secret": "a" * 32}, {"id": "k1", "secret": "b" * 32}], "unique"),
        ([{"id": "k 1", "secret": "a" * 32}], "pattern"),
    ],
)
def test_bad_keys_are_configuration_errors(keys: list[dict[str, str]], message_part: str) -> None:
    with pytest.raises(ConfigError, match=message_part) as raised:
        load_settings(None, {"SGPIPE_RAW_AUTH__KEYS": json.dumps(keys)})
    assert "a" * 32 not in str(raised.value)


def test_a_replay_of_a_forged_record_is_forecast_to_be_dead_lettered_again() -> None:
    # `sgpipe dlq replay` signs nothing: a forged record dead-lettered as unauthenticated
    # stays unauthenticated when replayed, and the dry run says so.
    authenticator = processor_stage_authenticator()
    forged = plan_replay(stored(raw_batch_headers(BATCH), BODY, -1))
    assert isinstance(forged, ReplayRecord)
    assert [f.reason for f in forecast(forged, authenticator)] == [UNAUTHENTICATED_RAW_RECORD]
    # A genuine element letter (vouched for by the processor) is judged on its content.
    signed = sign_raw_record(NEW_KEY, BODY, raw_batch_headers(BATCH))
    stage = processor_stage(rotation_settings(), EmailEventCodec())
    rejection = stage.transform(message(signed)).rejections[0]
    letter = build_dead_letter(message(signed), rejection, stage="process", max_payload_bytes=999)
    element = plan_replay(stored(letter.context_headers, letter.payload, 1))
    assert isinstance(element, ReplayRecord)
    assert [f.reason for f in forecast(element, authenticator)] == ["not_an_object"]


def processor_stage_authenticator() -> RawRecordAuthenticator:
    return RawRecordAuthenticator((NEW_KEY, OLD_KEY))


# MACs computed by the first implementation (schemas/raw_auth.py as merged with issue 15): a
# record signed by an ingress of one version must verify in a processor of another, so the
# canonical input may be built faster but never differently.
@pytest.mark.parametrize(
    ("value", "headers", "expected"),
    [
        (
            b'[{"event":"delivered"}]',
            [
                ("sgpipe-format", b"sendgrid-event-webhook-v1"),
                ("sgpipe-webhook", b"main"),
                ("sgpipe-request-id", b"req-1"),
                ("sgpipe-request-id", None),
                ("tracing", b"x"),
            ],
            "1a5964a842c3a11c03d06e35ce6894189f114c1e06843a9203510f957fd4a87c",
        ),
        (
            None,
            [
                ("sgpipe-format", b"sendgrid-event-webhook-v1"),
                ("sgpipe-webhook", b"main"),
                ("sgpipe-request-id", b"req-1"),
                ("sgpipe-request-id", None),
                ("tracing", b"x"),
            ],
            "b938c35913efff424df4c7b94566131e018557e84732b3052d86c9ed724552da",
        ),
        (b"", [], "719d0d5cd6e570138d097965b714ffe344aa32ee0222664dd7d890e7a495fdcf"),
    ],
)
def test_the_mac_of_a_fixed_record_never_changes(
    value: bytes | None, headers: list[tuple[str, bytes]], expected: str
) -> None:
    signed = sign_raw_record(OLD_KEY, value, headers)
    assert signed[-1] == (RAW_HMAC_HEADER, f"v1:k1:{expected}".encode("ascii"))
    assert verify_raw_record([OLD_KEY], value, signed) == OLD_KEY
