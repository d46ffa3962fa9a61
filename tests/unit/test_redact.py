"""No secret reaches a log line: the one redaction helper, and the logging set-up using it."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog
from hypothesis import assume, given
from hypothesis import strategies as st

from sgpipe.runtime.logs import configure_logging
from sgpipe.runtime.redact import redact_text, redact_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://user:s3cret@ch:8123", "http://user:***@ch:8123"),
        ("https://user:p%40ss%3Aword@ch.example:8443/db", "https://user:***@ch.example:8443/db"),
        ("http://:s3cret@ch:8123", "http://:***@ch:8123"),
        ("http://user@ch:8123", "http://user@ch:8123"),
        ("http://ch:8123/?password=s3cret&database=x", "http://ch:8123/?password=***&database=x"),
        ("http://ch:8123/?user=u&PASSWORD=s3cret", "http://ch:8123/?user=u&PASSWORD=***"),
        (
            "http://ch/?X-Amz-Signature=abc&X-Amz-Credential=k",
            "http://ch/?X-Amz-Signature=***&X-Amz-Credential=***",
        ),
        ("http://127.0.0.1:8123", "http://127.0.0.1:8123"),
        ("", ""),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_never_raises_on_garbage() -> None:
    assert redact_url("http://u:pw@[::1") == "http://u:***@[::1"


# The characters a URL's userinfo may hold unencoded (RFC 3986), and then some.
_USERINFO = st.characters(whitelist_categories=("L", "N"), whitelist_characters="-._~!$&'()*+,;=")


@given(
    user=st.text(alphabet=_USERINFO, max_size=10),
    password=st.text(alphabet=_USERINFO, min_size=6, max_size=30),
)
def test_no_password_survives_redaction(user: str, password: str) -> None:
    assume(password not in user and password not in "http://clickhouse.internal:8123/")
    url = f"http://{user}:{password}@clickhouse.internal:8123/"
    assert password not in redact_url(url)
    assert password not in redact_text(f"connect to {url} failed: {url!r}")


def test_redact_text_finds_urls_and_assignments() -> None:
    text = (
        "OperationalError('http://a:pw1@h:1 refused'); retry https://b:pw2@h2/x; "
        "POST /?user=x&password=pw3 failed; token=pw4"
    )
    redacted = redact_text(text)
    for secret in ("pw1", "pw2", "pw3", "pw4"):
        assert secret not in redacted
    assert "http://a:***@h:1" in redacted
    assert "user=x" in redacted


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """What `configure_logging` writes, as JSON lines; the standard library's records go to
    the same stream."""
    stream = io.StringIO()
    configure_logging("debug", "json", stream=stream)
    yield stream
    configure_logging("info", "json", stream=sys.stderr)
    structlog.reset_defaults()


def test_log_events_are_redacted_even_inside_exceptions(json_logs: io.StringIO) -> None:
    log = structlog.get_logger("test")
    url = "http://sgpipe:hunter2@127.0.0.1:8123"
    try:
        raise ValueError(f"cannot reach {url}")
    except ValueError as exc:
        log.warning("retrying", url=url, error=exc, nested={"urls": [url]}, exc_info=True)
    output = json_logs.getvalue()
    assert "hunter2" not in output
    event = json.loads(output.strip().splitlines()[-1])
    assert event["url"] == "http://sgpipe:***@127.0.0.1:8123"
    assert event["nested"] == {"urls": ["http://sgpipe:***@127.0.0.1:8123"]}
    assert "cannot reach http://sgpipe:***@127.0.0.1:8123" in json.dumps(event["exception"])


def test_standard_library_records_are_redacted(json_logs: io.StringIO) -> None:
    # aiokafka, aiohttp, clickhouse-connect: their records join the same stream.
    library = logging.getLogger("some.library")
    library.warning("request to %s failed", "http://u:hunter2@h:1/?password=hunter3")
    try:
        raise OSError("http://u:hunter4@h:1")
    except OSError:
        library.exception("boom")
    output = json_logs.getvalue()
    for secret in ("hunter2", "hunter3", "hunter4"):
        assert secret not in output
    assert "request to http://u:***@h:1/?password=*** failed" in output
    assert "http://u:***@h:1" in output
