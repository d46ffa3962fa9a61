"""``raw_auth.*`` into the keys the ingress signs with and the processor verifies with.

``sgpipe ingest`` and ``sgpipe process`` call ``require_raw_auth`` at start: no key and no
``raw_auth.allow_unauthenticated`` is a configuration error (exit 2), because an ingress that
signs nothing or a processor that checks nothing is exactly the open door the HMAC closes; the
escape hatch is logged as a warning at every start (docs/security.md#raw-records). The stages
themselves (``raw_auth_keys``) refuse too, whoever builds them.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from schemas.raw_auth import RawAuthKey
from sgpipe.runtime.settings import ConfigError, RawAuthKeySettings, RawAuthSettings

log = structlog.get_logger(__name__)


def raw_auth_keys(settings: RawAuthSettings) -> tuple[RawAuthKey, ...]:
    """The configured keys, first (the signing key) first. Raises ConfigError when there is
    none and ``allow_unauthenticated`` is off."""
    if not settings.keys and not settings.allow_unauthenticated:
        raise _no_key()
    return hmac_keys(settings.keys)


def hmac_keys(keys: Iterable[RawAuthKeySettings]) -> tuple[RawAuthKey, ...]:
    """The keys as the HMAC takes them (the secret's UTF-8 bytes), in order."""
    return tuple(RawAuthKey(key.id, key.secret.get_secret_value().encode("utf-8")) for key in keys)


def require_raw_auth(settings: RawAuthSettings, *, stage: str) -> None:
    """At a stage's start (the CLI, before anything connects): ConfigError unless there is a
    key or ``allow_unauthenticated`` is on, and a warning when it is on."""
    if settings.allow_unauthenticated:
        log.warning(
            "raw records without a valid HMAC are processed anyway: any producer with write "
            "rights on the raw topic can inject events"
            if settings.keys
            else "raw records are not authenticated: any producer with write rights on the raw "
            "topic can inject events",
            setting="raw_auth.allow_unauthenticated",
            stage=stage,
            keys=[key.id for key in settings.keys],
        )
    elif not settings.keys:
        raise _no_key()


def _no_key() -> ConfigError:
    return ConfigError(
        "raw_auth.keys is empty: the ingress signs raw records and the processor verifies "
        'them with it (set SGPIPE_RAW_AUTH__KEYS=\'[{"id": "k1", "secret": "..."}]\', '
        "the same on both; or raw_auth.allow_unauthenticated: true to run without, "
        "docs/security.md#raw-records)"
    )
