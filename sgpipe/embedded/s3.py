"""The few S3 calls sgpipe makes to its embedded SeaweedFS, signed with AWS Signature V4.

Only what retention and readiness need (head bucket, put, get, list objects v2, delete
objects), over
aiohttp, which sgpipe already depends on: boto3 would add ~80 MB and a thread pool for three
requests. SeaweedFS refuses unsigned requests once credentials are set, so every call is signed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import xml.etree.ElementTree as ElementTree
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

import aiohttp
from yarl import URL

S3_NAMESPACE = "{http://s3.amazonaws.com/doc/2006-03-01/}"
EMPTY_PAYLOAD_SHA256 = hashlib.sha256(b"").hexdigest()
# S3 lists and deletes at most 1000 keys per request.
MAX_KEYS_PER_REQUEST = 1000


class S3Error(RuntimeError):
    """An S3 request failed (status and the server's error code in the message)."""


@dataclass(frozen=True)
class S3Credentials:
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"


@dataclass(frozen=True)
class S3Object:
    key: str
    size: int
    last_modified: datetime


@dataclass(frozen=True)
class S3Listing:
    objects: tuple[S3Object, ...]
    common_prefixes: tuple[str, ...]
    next_continuation_token: str | None


def sign_v4(
    *,
    method: str,
    host: str,
    path: str,
    query: Sequence[tuple[str, str]],
    payload_sha256: str,
    credentials: S3Credentials,
    now: datetime,
    extra_headers: dict[str, str] | None = None,
) -> dict[str, str]:
    """The headers (Authorization included) that sign one request; ``path`` is not encoded yet.

    Follows the AWS SigV4 specification for S3: every path segment and query element
    URI-encoded with only ``A-Za-z0-9-_.~`` left as is, query sorted, headers lower-cased.
    """
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    headers = {
        "host": host,
        "x-amz-content-sha256": payload_sha256,
        "x-amz-date": amz_date,
        **{name.lower(): value.strip() for name, value in (extra_headers or {}).items()},
    }
    signed_names = sorted(headers)
    canonical_request = "\n".join(
        [
            method,
            encode_path(path),
            canonical_query(query),
            "".join(f"{name}:{headers[name]}\n" for name in signed_names),
            ";".join(signed_names),
            payload_sha256,
        ]
    )
    scope = f"{day}/{credentials.region}/s3/aws4_request"
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{credentials.secret_access_key}".encode()
    for part in (day, credentials.region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={';'.join(signed_names)}, Signature={signature}"
    )
    del headers["host"]  # the HTTP client sends it
    return headers


def encode_path(path: str) -> str:
    return quote(path, safe="/-_.~")


def canonical_query(query: Sequence[tuple[str, str]]) -> str:
    return "&".join(
        f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}" for name, value in sorted(query)
    )


class S3Client:
    """Signed requests to one S3 endpoint (``http://host:port``), path-style addressing."""

    def __init__(
        self, endpoint: str, credentials: S3Credentials, session: aiohttp.ClientSession
    ) -> None:
        self._endpoint = URL(endpoint)
        self._credentials = credentials
        self._session = session

    async def bucket_exists(self, bucket: str) -> bool:
        """True on 200; False on 404 or 403 (not ready yet, or not ours)."""
        status, _ = await self._request("HEAD", f"/{bucket}")
        return status == 200

    async def put_object(self, bucket: str, key: str, body: bytes) -> None:
        status, answer = await self._request("PUT", f"/{bucket}/{key}", body=body)
        if status != 200:
            raise S3Error(f"put {bucket}/{key}: {_describe_error(status, answer)}")

    async def get_object(self, bucket: str, key: str) -> bytes:
        status, answer = await self._request("GET", f"/{bucket}/{key}")
        if status != 200:
            raise S3Error(f"get {bucket}/{key}: {_describe_error(status, answer)}")
        return answer

    async def list_objects(
        self,
        bucket: str,
        prefix: str,
        *,
        delimiter: str | None = None,
        continuation_token: str | None = None,
        max_keys: int = MAX_KEYS_PER_REQUEST,
    ) -> S3Listing:
        """One page of ListObjectsV2, keys in lexicographic order."""
        query = [("list-type", "2"), ("prefix", prefix), ("max-keys", str(max_keys))]
        if delimiter:
            query.append(("delimiter", delimiter))
        if continuation_token:
            query.append(("continuation-token", continuation_token))
        status, body = await self._request("GET", f"/{bucket}", query)
        if status != 200:
            raise S3Error(f"list {bucket}/{prefix}: {_describe_error(status, body)}")
        return parse_listing(body)

    async def iterate_objects(self, bucket: str, prefix: str) -> AsyncIterator[S3Object]:
        """Every object under ``prefix`` in key order, page by page (stop early by breaking)."""
        token: str | None = None
        while True:
            page = await self.list_objects(bucket, prefix, continuation_token=token)
            for item in page.objects:
                yield item
            token = page.next_continuation_token
            if token is None:
                return

    async def delete_objects(self, bucket: str, keys: Sequence[str]) -> None:
        """DeleteObjects in requests of at most 1000 keys; S3Error if any key failed."""
        for start in range(0, len(keys), MAX_KEYS_PER_REQUEST):
            chunk = keys[start : start + MAX_KEYS_PER_REQUEST]
            body = build_delete_request(chunk)
            md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324 (S3 API)
            status, answer = await self._request(
                "POST",
                f"/{bucket}",
                [("delete", "")],
                body=body,
                headers={"Content-MD5": md5, "Content-Type": "application/xml"},
            )
            if status != 200:
                raise S3Error(f"delete in {bucket}: {_describe_error(status, answer)}")
            failed = parse_delete_errors(answer)
            if failed:
                raise S3Error(f"delete in {bucket}: {len(failed)} keys failed, first {failed[0]}")

    async def _request(
        self,
        method: str,
        path: str,
        query: Sequence[tuple[str, str]] = (),
        *,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        host = f"{self._endpoint.host}:{self._endpoint.port}"
        signed = sign_v4(
            method=method,
            host=host,
            path=path,
            query=query,
            payload_sha256=hashlib.sha256(body).hexdigest() if body else EMPTY_PAYLOAD_SHA256,
            credentials=self._credentials,
            now=datetime.now(UTC),
            extra_headers=headers,
        )
        query_string = canonical_query(query)
        url = URL(
            f"{self._endpoint}{encode_path(path)}" + (f"?{query_string}" if query_string else ""),
            encoded=True,  # exactly the bytes that were signed
        )
        async with self._session.request(method, url, data=body or None, headers=signed) as reply:
            payload = bytes(await reply.read())
            return reply.status, payload


def build_delete_request(keys: Sequence[str]) -> bytes:
    root = ElementTree.Element("Delete")
    ElementTree.SubElement(root, "Quiet").text = "true"
    for key in keys:
        item = ElementTree.SubElement(root, "Object")
        ElementTree.SubElement(item, "Key").text = key
    document: bytes = ElementTree.tostring(root, encoding="utf-8", xml_declaration=True)
    return document


def parse_listing(body: bytes) -> S3Listing:
    root = ElementTree.fromstring(body)
    objects = tuple(
        S3Object(
            key=_text(item, "Key"),
            size=int(_text(item, "Size") or 0),
            last_modified=datetime.fromisoformat(_text(item, "LastModified")),
        )
        for item in root.iter(f"{S3_NAMESPACE}Contents")
    )
    prefixes = tuple(_text(item, "Prefix") for item in root.iter(f"{S3_NAMESPACE}CommonPrefixes"))
    truncated = _text(root, "IsTruncated") == "true"
    token = _text(root, "NextContinuationToken") if truncated else ""
    return S3Listing(objects, prefixes, token or None)


def parse_delete_errors(body: bytes) -> list[str]:
    if not body:
        return []
    root = ElementTree.fromstring(body)
    return [
        f"{_text(error, 'Key')}: {_text(error, 'Code')}"
        for error in root.iter(f"{S3_NAMESPACE}Error")
    ]


def _text(element: ElementTree.Element, name: str) -> str:
    child = element.find(f"{S3_NAMESPACE}{name}")
    return child.text or "" if child is not None else ""


def _describe_error(status: int, body: bytes) -> str:
    code = ""
    with contextlib.suppress(ElementTree.ParseError):
        code = ElementTree.fromstring(body).findtext("Code") or ""
    return f"HTTP {status} {code}".strip()
