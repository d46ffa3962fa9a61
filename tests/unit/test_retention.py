"""Retention's decision (which batch objects may go) and the S3 pieces it relies on."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from datetime import UTC, datetime, timedelta

import pytest

from sgpipe.embedded.retention import StoredBatch, batches_to_delete, parse_batch
from sgpipe.embedded.s3 import (
    S3Credentials,
    S3Object,
    build_delete_request,
    parse_listing,
    sign_v4,
)

NOW = datetime(2026, 1, 10, tzinfo=UTC)
OLD = NOW - timedelta(days=30)
CUTOFF = NOW - timedelta(days=7)


def batch(offset: int, when: datetime = OLD) -> StoredBatch:
    return StoredBatch(f"records/{offset:020d}.batch", offset, 100, when)


def offsets(batches: list[StoredBatch]) -> list[int]:
    return [item.base_offset for item in batches]


def test_deletes_the_expired_batches_below_the_committed_offset() -> None:
    log = [batch(0), batch(5), batch(10), batch(15)]
    # Committed 10: records 0-9 are consumed, so batches 0 and 5 may go, 10 may not.
    assert offsets(batches_to_delete(log, committed_offset=10, older_than=CUTOFF)) == [0, 5]


def test_a_batch_is_kept_until_the_next_one_proves_it_consumed() -> None:
    log = [batch(0), batch(5), batch(10)]
    # Committed 9: batch 5 may hold record 9, which is not consumed yet.
    assert offsets(batches_to_delete(log, committed_offset=9, older_than=CUTOFF)) == [0]


def test_the_newest_batch_is_never_deleted() -> None:
    log = [batch(0), batch(5)]
    assert offsets(batches_to_delete(log, committed_offset=1_000, older_than=CUTOFF)) == [0]
    assert batches_to_delete([batch(0)], committed_offset=1_000, older_than=CUTOFF) == []


def test_young_batches_stay_and_deletion_stops_at_the_first_one() -> None:
    young = NOW - timedelta(hours=1)
    log = [batch(0), batch(5, young), batch(10), batch(15)]
    # Batch 10 is old and consumed, but deleting it would leave a hole after batch 5.
    assert offsets(batches_to_delete(log, committed_offset=15, older_than=CUTOFF)) == [0]


def test_offset_gaps_left_by_a_kill_stay_conservative() -> None:
    # tansu advances its counter before the write: a killed produce leaves a gap (7-9).
    log = [batch(0), batch(5), batch(10)]
    assert offsets(batches_to_delete(log, committed_offset=7, older_than=CUTOFF)) == [0]


def test_parse_batch_reads_the_base_offset_and_ignores_other_objects() -> None:
    key = "clusters/sgpipe/topics/t/partitions/0000000001/records/00000000000000000042.batch"
    parsed = parse_batch(S3Object(key, 170, OLD))
    assert parsed is not None
    assert parsed.base_offset == 42
    assert parse_batch(S3Object("clusters/sgpipe/topics/t/watermark.json", 40, OLD)) is None


def test_sigv4_matches_the_aws_documentation_example() -> None:
    # "Example: GET Object" of AWS's Signature Version 4 documentation for S3.
    headers = sign_v4(
        method="GET",
        host="examplebucket.s3.amazonaws.com",
        path="/test.txt",
        query=[],
        payload_sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        credentials=S3Credentials(
            "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1"
        ),
        now=datetime(2013, 5, 24, tzinfo=UTC),
        extra_headers={"Range": "bytes=0-9"},
    )
    assert headers["authorization"] == (
        "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request, "
        "SignedHeaders=host;range;x-amz-content-sha256;x-amz-date, "
        "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
    )


def test_sigv4_of_a_listing_matches_the_aws_documentation_example() -> None:
    # "Example: GET Bucket (List Objects)" of the same documentation.
    headers = sign_v4(
        method="GET",
        host="examplebucket.s3.amazonaws.com",
        path="/",
        query=[("max-keys", "2"), ("prefix", "J")],
        payload_sha256="e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        credentials=S3Credentials(
            "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "us-east-1"
        ),
        now=datetime(2013, 5, 24, tzinfo=UTC),
    )
    assert headers["authorization"].endswith(
        "Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7"
    )


def test_listing_parse_keeps_order_prefixes_and_the_continuation_token() -> None:
    body = b"""<?xml version="1.0" encoding="UTF-8"?>
<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">
  <Name>tansu</Name><IsTruncated>true</IsTruncated>
  <Contents><Key>a/00000000000000000000.batch</Key><LastModified>2026-11-23T20:22:01.278Z</LastModified><Size>170</Size></Contents>
  <Contents><Key>a/00000000000000000001.batch</Key><LastModified>2026-11-23T20:22:02Z</LastModified><Size>171</Size></Contents>
  <CommonPrefixes><Prefix>a/0000000001/</Prefix></CommonPrefixes>
  <NextContinuationToken>tok+/=</NextContinuationToken>
</ListBucketResult>"""
    listing = parse_listing(body)
    assert [item.key for item in listing.objects] == [
        "a/00000000000000000000.batch",
        "a/00000000000000000001.batch",
    ]
    assert listing.objects[1].size == 171
    assert listing.objects[0].last_modified == datetime(2026, 11, 23, 20, 22, 1, 278000, UTC)
    assert listing.common_prefixes == ("a/0000000001/",)
    assert listing.next_continuation_token == "tok+/="


@pytest.mark.parametrize("key", ["plain.batch", "with <xml> & 'quotes'.batch"])
def test_delete_request_escapes_keys(key: str) -> None:
    body = build_delete_request([key])
    assert body.startswith(b"<?xml")
    assert b"<Quiet>true</Quiet>" in body
    assert ElementTree.fromstring(body).findtext("Object/Key") == key
