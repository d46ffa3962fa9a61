"""Secrets never reach a log line or a file sgpipe writes: the one place that blanks them.

``redact_url`` is what every caller uses before a URL is logged, raised in an error message or
written to the state file. ``redact_text`` finds URLs with credentials inside free text (an
exception's message, a library's log line); the logging set-up runs it over every event of
the one log stream (the standard library's records included), as the net under the callers
that should have used ``redact_url`` in the first place.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED: Final = "***"

# Query parameters that carry a secret in the URLs sgpipe handles: ClickHouse's `password`
# (and its HTTP interface's `key`-style names), S3/SAS-style tokens and signatures.
_SECRET_PARAMETERS: Final = frozenset(
    {
        "password",
        "passwd",
        "pass",
        "pwd",
        "secret",
        "token",
        "key",
        "api_key",
        "apikey",
        "access_key",
        "secret_key",
        "sig",
        "signature",
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
    }
)

# `scheme://user:password@` anywhere in a text. Only ASCII blanks end it (a mistyped URL may
# hold anything else), and the password runs to the last `@` before them: a password with an
# unencoded `/` or `@` is still hidden whole, at the price of hiding a little more.
_BLANK = r" \t\r\n\f\v"
_USERINFO_PASSWORD = re.compile(rf"(?i)\b([a-z][a-z0-9+.\-]*://[^/@:{_BLANK}]*:)([^{_BLANK}]*)@")
# `password=...` (and the other secret names) in a query string or form text.
_SECRET_ASSIGNMENT = re.compile(
    r"(?i)(?<![a-z0-9_\-])("
    + "|".join(re.escape(name) for name in sorted(_SECRET_PARAMETERS, key=len, reverse=True))
    + r")=([^&\s'\"]*)"
)


# SendGrid API keys (`SG.<id>.<secret>`) and bearer tokens, wherever they appear: the net
# under `sgpipe webhooks`, which never logs its key in the first place.
_SENDGRID_API_KEY = re.compile(r"\bSG\.[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}")
_BEARER_TOKEN = re.compile(r"(?i)(\bBearer\s+)[A-Za-z0-9._~+/\-]+=*")


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo and the values of secret query parameters
    replaced by ``***``; the user name, host, port and path stay, so the line is still useful.

    Never raises: text that does not parse as a URL is redacted as free text instead.
    """
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{REDACTED}@{hostport}" if has_password else f"{user}@{hostport}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            if any(name.lower() in _SECRET_PARAMETERS for name, _ in pairs):
                query = urlencode(
                    [
                        (name, REDACTED if name.lower() in _SECRET_PARAMETERS else value)
                        for name, value in pairs
                    ],
                    safe="*",
                )
        redacted = urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        redacted = url
    # Also as free text: a password with an unencoded `/` or `#` ends the parsed authority
    # early, leaving its tail in the path.
    return redact_text(redacted)


def redact_text(text: str) -> str:
    """``text`` with every ``scheme://user:password@`` password, every ``password=...``
    (and similar) value, SendGrid API key and bearer token replaced by ``***``."""
    if "SG." in text or "earer" in text:
        text = _SENDGRID_API_KEY.sub(REDACTED, text)
        text = _BEARER_TOKEN.sub(rf"\1{REDACTED}", text)
    if "@" not in text and "=" not in text:
        return text  # the common case, checked cheaply: nothing that could hold a secret
    text = _USERINFO_PASSWORD.sub(rf"\1{REDACTED}@", text)
    return _SECRET_ASSIGNMENT.sub(rf"\1={REDACTED}", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact_text(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, Mapping):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(item) for item in value]
    # Any other object (an exception, a settings model) would be rendered by its repr: take
    # the repr here, where it can still be redacted.
    return redact_text(repr(value))


def redact_log_event(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: redacts every string in the event, nested ones included (a
    structured traceback's frames and exception text). Runs after exceptions are rendered."""
    for key, value in event_dict.items():
        event_dict[key] = _redact_value(value)
    return event_dict
