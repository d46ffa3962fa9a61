"""Map: personal data in one parsed event object, kept, replaced by a keyed hash, or dropped.

Applied to the parsed object *before* it is normalized, so the typed fields, ``custom_args``
(derived from the same object) and ``raw`` (re-serialized from it) can never disagree: what
the events topic carries, and ClickHouse stores, holds no value the policy removed.

Per field (``pii.email``, ``pii.ip``, ``pii.useragent``):

- ``keep``: untouched;
- ``hash``: the value becomes ``hmac:`` + the first 32 hex digits of HMAC-SHA256(key, value)
  -- for an address, of the lower-cased address, followed by ``@`` and its lower-cased domain,
  so per-domain deliverability still works and the same recipient always gets the same
  pseudonym (joins, distinct counts, and `sgpipe forget` find it from the address);
- ``drop``: the key is removed (the typed field is null/empty).

The same value elsewhere in the object is treated alike: an address anywhere inside a string
(case-insensitively, also URL-encoded, as in ``?email=a%40b.com`` of a click URL), an IP or a
user agent as a whole string value (custom args, nested objects; keys are left alone).
``ip`` is the recipient's only on engagement events; on deliverability events
(``DELIVERABILITY_EVENTS``) it is SendGrid's sending IP and is kept.

``raw`` is re-serialized (compact JSON, key order kept) only for an event that holds a field
whose mode is not ``keep``; every other event keeps its exact bytes. Re-serializing loses what
exact bytes keep: whitespace and escapes as sent, duplicate keys (the last one stays).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

PiiMode = Literal["keep", "hash", "drop"]
PSEUDONYM_PREFIX: Final = "hmac:"
_DIGEST_HEX_CHARS: Final = 32  # 128 bits: collisions are not a concern at any volume
# Events whose `ip` is SendGrid's sending IP, not the recipient's.
DELIVERABILITY_EVENTS: Final = frozenset(
    {"processed", "dropped", "delivered", "deferred", "bounce"}
)

_encode_json = msgspec.json.encode


@dataclass(frozen=True, slots=True)
class _Substitution:
    """Every occurrence of ``needle`` (lower-cased), in any letter case, becomes
    ``replacement``."""

    needle: str
    replacement: str

    def apply(self, text: str) -> str:
        folded = text.lower()
        if self.needle not in folded:
            return text
        if len(folded) != len(text):  # a character whose lower case is longer: offsets move
            pattern = re.compile(re.escape(self.needle), re.IGNORECASE)
            return pattern.sub(lambda _match: self.replacement, text)
        parts: list[str] = []
        start = 0
        while (found := folded.find(self.needle, start)) >= 0:
            parts += (text[start:found], self.replacement)
            start = found + len(self.needle)
        parts.append(text[start:])
        return "".join(parts)


@dataclass(frozen=True, slots=True)
class PiiPolicy:
    """What to do with each personal field; ``key`` is the HMAC key (required for hash)."""

    email: PiiMode = "keep"
    ip: PiiMode = "keep"
    useragent: PiiMode = "keep"
    key: bytes = field(default=b"", repr=False)
    # HMAC with the key already absorbed: each hash copies it (half the cost of hmac.new).
    _keyed: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if "hash" in (self.email, self.ip, self.useragent) and not self.key:
            raise ValueError("hashing personal data needs a key")
        object.__setattr__(self, "_keyed", hmac.new(self.key, digestmod=hashlib.sha256))

    @property
    def active(self) -> bool:
        return (self.email, self.ip, self.useragent) != ("keep", "keep", "keep")

    def pseudonym(self, value: str) -> str:
        """The keyed hash of an IP or a user agent, as stored."""
        mac = self._keyed.copy()
        mac.update(value.encode("utf-8"))
        return PSEUDONYM_PREFIX + str(mac.hexdigest())[:_DIGEST_HEX_CHARS]

    def email_pseudonym(self, address: str) -> str:
        """The keyed hash of an address, as stored: ``hmac:<hex>@<domain>`` (lower-cased, so
        every spelling of one address gets the same one)."""
        address = address.strip().lower()
        _, at, domain = address.rpartition("@")
        return self.pseudonym(address) + (f"@{domain}" if at else "")

    def apply(self, item: dict[str, Any], raw: str) -> tuple[dict[str, Any], str, tuple[str, ...]]:
        """The object and its ``raw`` text with the policy applied, and the fields it changed.
        Returns ``item`` and ``raw`` themselves when nothing had to change."""
        if not self.active:
            return item, raw, ()
        substrings: list[_Substitution] = []
        whole: dict[str, str] = {}
        changed: list[str] = []
        if self.email != "keep" and "email" in item:
            self._mask_email(item, substrings)
            changed.append("email")
        recipient_ip = item.get("event") not in DELIVERABILITY_EVENTS
        for name, mode in (("ip", self.ip), ("useragent", self.useragent)):
            if mode == "keep" or name not in item or (name == "ip" and not recipient_ip):
                continue
            self._mask_value(item, name, mode, whole)
            changed.append(name)
        if not changed:
            return item, raw, ()
        if substrings or whole:
            for key, value in item.items():
                if key not in changed:
                    item[key] = _replace_in(value, substrings, whole)
        return item, _encode_json(item).decode("utf-8"), tuple(changed)

    # --- per field -----------------------------------------------------------------------

    def _mask_email(self, item: dict[str, Any], substrings: list[_Substitution]) -> None:
        value = item["email"]
        hashing = self.email == "hash"
        # Each address once (an event has one): its pseudonym, or "" when dropped.
        replacements = {
            text: self.email_pseudonym(text) if hashing else ""
            for text in _strings(value)
            if text.strip()
        }
        if hashing:
            item["email"] = _map_strings(value, lambda s: replacements.get(s, s))
        else:
            del item["email"]
        for text, replacement in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
            address = text.strip().lower()
            # As written, and URL-encoded (a tracking link's ?email=a%40b.com).
            for form in {address, address.replace("@", "%40")}:
                substrings.append(_Substitution(form, replacement))

    def _mask_value(
        self, item: dict[str, Any], name: str, mode: PiiMode, whole: dict[str, str]
    ) -> None:
        value = item[name]
        for text in _strings(value):
            if text.strip():
                whole[text] = self.pseudonym(text) if mode == "hash" else ""
        if mode == "drop":
            del item[name]
        else:
            item[name] = _map_strings(value, lambda s: self.pseudonym(s) if s.strip() else s)


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [text for element in value for text in _strings(element)]
    if isinstance(value, dict):
        return [text for element in value.values() for text in _strings(element)]
    return []


def _map_strings(value: Any, function: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return function(value)
    if isinstance(value, list):
        return [_map_strings(element, function) for element in value]
    if isinstance(value, dict):
        return {key: _map_strings(element, function) for key, element in value.items()}
    return value


def _replace_in(value: Any, substrings: list[_Substitution], whole: dict[str, str]) -> Any:
    if isinstance(value, str):
        if value in whole:
            return whole[value]
        for substitution in substrings:
            value = substitution.apply(value)
        return value
    if isinstance(value, list):
        return [_replace_in(element, substrings, whole) for element in value]
    if isinstance(value, dict):
        return {key: _replace_in(element, substrings, whole) for key, element in value.items()}
    return value
