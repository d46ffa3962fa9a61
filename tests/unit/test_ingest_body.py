"""Decoding and hashing bodies: exact round trips, caps against bombs, clear refusals for
broken streams, and work split into steps that give the event loop a turn."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import zlib
from collections.abc import Awaitable, Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ingest.body import (
    BodyLimits,
    BodyRejected,
    Encoding,
    Turns,
    decode_body,
    decoded_size_limit,
    hash_cooperatively,
    parse_content_encoding,
)

ROOMY = BodyLimits(max_bytes=8 * 1_048_576, max_ratio=1_000_000.0, timeout_seconds=30.0)


def deflate(data: bytes, *, raw: bool = False) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS if raw else zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, Encoding.IDENTITY),
        ("", Encoding.IDENTITY),
        ("identity", Encoding.IDENTITY),
        ("gzip", Encoding.GZIP),
        (" GZIP ", Encoding.GZIP),
        ("x-gzip", Encoding.GZIP),
        ("deflate", Encoding.DEFLATE),
    ],
)
def test_supported_encodings(header: str | None, expected: Encoding) -> None:
    assert parse_content_encoding(header) is expected


@pytest.mark.parametrize("header", ["br", "zstd", "compress", "gzip, gzip", "gzip,identity", "*"])
def test_other_encodings_are_415(header: str) -> None:
    with pytest.raises(BodyRejected) as caught:
        parse_content_encoding(header)
    assert (caught.value.status, caught.value.code) == (415, "unsupported_encoding")


@settings(max_examples=60, deadline=None)
@given(body=st.binary(max_size=200_000), encoding=st.sampled_from(["gzip", "zlib", "raw"]))
async def test_round_trip_is_exact(body: bytes, encoding: str) -> None:
    encoded = {
        "gzip": lambda: gzip.compress(body),
        "zlib": lambda: deflate(body),
        "raw": lambda: deflate(body, raw=True),
    }[encoding]()
    kind = Encoding.GZIP if encoding == "gzip" else Encoding.DEFLATE
    assert await decode_body(encoded, kind, ROOMY) == body


async def test_identity_is_returned_as_is() -> None:
    body = b'[{"event":"open"}]\r\n'
    assert await decode_body(body, Encoding.IDENTITY, ROOMY) is body


async def test_concatenated_gzip_members_are_decoded_in_turn() -> None:
    encoded = gzip.compress(b'[{"a":1},') + gzip.compress(b'{"b":2}]\r\n')
    assert await decode_body(encoded, Encoding.GZIP, ROOMY) == b'[{"a":1},{"b":2}]\r\n'


async def test_bomb_past_the_size_cap_is_413() -> None:
    bomb = gzip.compress(bytes(64 * 1_048_576))  # 64 MiB of zeros in ~64 KB
    limits = BodyLimits(max_bytes=1_048_576, max_ratio=1_000_000.0, timeout_seconds=30.0)
    with pytest.raises(BodyRejected) as caught:
        await decode_body(bomb, Encoding.GZIP, limits)
    assert (caught.value.status, caught.value.code) == (413, "body_too_large")


async def test_ratio_cap_refuses_a_small_bomb_within_the_size_cap() -> None:
    body = bytes(500_000)
    encoded = gzip.compress(body)
    assert len(body) / len(encoded) > 100
    strict = BodyLimits(max_bytes=4 * 1_048_576, max_ratio=100.0, timeout_seconds=30.0)
    with pytest.raises(BodyRejected) as caught:
        await decode_body(encoded, Encoding.GZIP, strict)
    assert caught.value.status == 413
    assert "100x" in caught.value.description
    lenient = BodyLimits(max_bytes=4 * 1_048_576, max_ratio=10_000.0, timeout_seconds=30.0)
    assert await decode_body(encoded, Encoding.GZIP, lenient) == body


def test_decoded_limit_is_the_smaller_of_size_and_ratio() -> None:
    limits = BodyLimits(max_bytes=1000, max_ratio=10.0, timeout_seconds=1.0)
    assert decoded_size_limit(50, limits) == 500
    assert decoded_size_limit(500, limits) == 1000


async def test_body_at_the_exact_limit_is_accepted() -> None:
    body = bytes(range(256)) * 4096  # 1 MiB
    limits = BodyLimits(max_bytes=len(body), max_ratio=1_000_000.0, timeout_seconds=1.0)
    assert await decode_body(gzip.compress(body), Encoding.GZIP, limits) == body
    smaller = BodyLimits(max_bytes=len(body) - 1, max_ratio=1_000_000.0, timeout_seconds=1.0)
    with pytest.raises(BodyRejected):
        await decode_body(gzip.compress(body), Encoding.GZIP, smaller)


PERSONAL = b'[{"email":"secret-person@example.com"}]'


@pytest.mark.parametrize(
    ("encoded", "encoding", "fragment"),
    [
        pytest.param(b"\x1f\x8b" + PERSONAL, Encoding.GZIP, "not valid gzip", id="corrupt-gzip"),
        pytest.param(PERSONAL, Encoding.GZIP, "not valid gzip", id="plain-text-as-gzip"),
        pytest.param(gzip.compress(PERSONAL)[:-12], Encoding.GZIP, "truncated", id="truncated"),
        pytest.param(
            gzip.compress(PERSONAL) + PERSONAL, Encoding.GZIP, "not valid gzip", id="gzip-garbage"
        ),
        pytest.param(
            deflate(PERSONAL) + b"xx", Encoding.DEFLATE, "after the end", id="deflate-garbage"
        ),
        pytest.param(b"\x78\x9c" + PERSONAL, Encoding.DEFLATE, "not valid deflate", id="corrupt"),
    ],
)
async def test_broken_streams_are_400_without_quoting_the_body(
    encoded: bytes, encoding: Encoding, fragment: str
) -> None:
    with pytest.raises(BodyRejected) as caught:
        await decode_body(encoded, encoding, ROOMY)
    assert (caught.value.status, caught.value.code) == (400, "invalid_body")
    assert fragment in caught.value.description
    assert "secret" not in str(caught.value)


async def loop_turns_during(work: Callable[[], Awaitable[object]]) -> int:
    """How many times another task ran while ``work`` did."""
    turns = 0
    done = False

    async def ticker() -> None:
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = turns
    await work()
    done = True
    await ticking
    return turns - before


async def test_decoding_gives_the_loop_a_turn_between_steps() -> None:
    body = bytes(4 * 1_048_576)
    encoded = gzip.compress(body)
    # A zero budget yields at every checkpoint: one per 64 KiB of output at least.
    turns = await loop_turns_during(
        lambda: decode_body(encoded, Encoding.GZIP, ROOMY, Turns(budget=0.0))
    )
    assert turns >= len(body) // 65_536 - 1


async def test_hashing_gives_the_loop_a_turn_between_slices_and_matches_sha256() -> None:
    body = bytes(range(256)) * 16_384  # 4 MiB
    digests: list[bytes] = []

    async def work() -> None:
        digests.append(await hash_cooperatively(hashlib.sha256(b"ts"), body, Turns(budget=0.0)))

    turns = await loop_turns_during(work)
    assert digests == [hashlib.sha256(b"ts" + body).digest()]
    assert turns >= len(body) // 262_144 - 1


async def test_turns_yield_only_once_the_budget_is_spent() -> None:
    now = [0.0]
    turns = Turns(budget=0.001, clock=lambda: now[0])
    yielded = await loop_turns_during(turns.checkpoint)
    assert yielded == 0
    now[0] = 0.002
    yielded = await loop_turns_during(turns.checkpoint)
    assert yielded >= 1
