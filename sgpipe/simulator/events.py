"""Realistic SendGrid event streams: message lifecycles turned into event objects.

Pure and seeded: the same ``(seed, start_time, messages_per_second)`` gives the same events, as
the same bytes, in the same order. Nothing here reads the clock.

A message is sent at a point of simulated time and lives through a SendGrid lifecycle
(processed -> delivered -> open/click; processed -> deferred ... -> delivered; bounce or
blocked; dropped; spam reports, unsubscribes, group (re)subscribes). Each event is placed at its
own simulated time plus a posting delay (SendGrid posts from many servers), so events arrive
out of order across messages and sometimes within one (an ``open`` before its ``delivered``).

The fields and their quirks follow docs/sendgrid-event-webhook.md; docs/simulator.md lists what
is generated and how often.
"""

from __future__ import annotations

import base64
import heapq
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

# A fixed "SendGrid account": part of every sg_event_id, like the real ones
# (``drop-10994919-<message key>-0`` base64url-encoded).
_ACCOUNT_ID = 10994919

# Message lifecycles, as cumulative thresholds of one uniform draw per message.
_P_ACCOUNT_STATUS = 0.0005
_P_DROPPED = _P_ACCOUNT_STATUS + 0.03
_P_BOUNCE = _P_DROPPED + 0.04
_P_ASYNC_BOUNCE = _P_BOUNCE + 0.01
_P_DEFERRED = _P_ASYNC_BOUNCE + 0.07
# ... the rest is delivered at once.

# Engagement after delivery.
_P_OPEN = 0.40
_P_MACHINE_OPEN = 0.30
_P_CLICK_AFTER_OPEN = 0.30
_P_UNSUBSCRIBE = 0.005
_P_SPAMREPORT = 0.002
_P_GROUP_UNSUBSCRIBE = 0.01
_P_GROUP_RESUBSCRIBE = 0.25  # of group unsubscribes

# Type quirks, per event.
_P_TIMESTAMP_STRING = 0.01
_P_TLS_STRING = 0.15
_P_LEADING_SPACE_MESSAGE_ID = 0.01
_P_EMPTY_SMTP_ID = 0.01
_P_LONG_EVENT_ID = 0.005
_P_LATE_POST = 0.02  # an event posted minutes late (a slow SendGrid server)

# Seconds of simulated time.
_MAX_POSTING_DELAY = 20.0
_LATE_POST_DELAY = 300.0

_TAGS = {
    "processed": "proc",
    "dropped": "drop",
    "deferred": "dfrd",
    "delivered": "dlvr",
    "bounce": "bnce",
    "open": "open",
    "click": "clck",
    "spamreport": "spam",
    "unsubscribe": "unsb",
    "group_unsubscribe": "gusb",
    "group_resubscribe": "grsb",
    "account_status_change": "acct",
}

_FIRST_NAMES = (
    "alex", "sam", "maria", "jo", "li", "noor", "kofi", "ana", "yuki", "lena", "omar", "eva",
    "raj", "tom", "zoe", "ivan", "mia", "leo", "ada", "finn", "nina", "hugo", "sara", "ben",
)  # fmt: skip
_DOMAINS = (
    "gmail.com", "yahoo.com", "outlook.com", "hotmail.com", "icloud.com", "example.com",
    "example.org", "mail.example.net", "gmx.de", "web.de", "orange.fr", "qq.com",
)  # fmt: skip
_INVALID_ADDRESSES = ("invalid-address", "bob@@example.com", "no spaces@example.com", "@x")
_SENDERS = ("news@shop.example", "no-reply@app.example", "team@saas.example")
_FILTER_HOSTS = tuple(
    f"filterdrecv-{pod}-{replicaset}-{suffix}-{n}"
    for pod, replicaset, suffix, n in (
        ("p3mdw1", "756b745b58", "kmzbl", 18),
        ("p3las1", "5bf99c48d5", "2nmvr", 20),
        ("p3iad2", "8c5d4c6f9b", "x7qlp", 3),
        ("p1mdw1", "6d9f7b8c44", "tzk2w", 11),
    )
)
_SMTP_HOSTS = ("ismtpd0039p1iad1", "ismtpd0102p1mdw1", "ismtpd0007p1las1", "ismtpd-555")
_SENDING_IPS = ("168.245.12.3", "149.72.134.11", "167.89.101.7", "50.31.36.205")
_RECIPIENT_IP_PREFIXES = ("203.0.113.", "198.51.100.", "192.0.2.", "66.249.84.", "17.58.63.")
_PROXY_IPS = ("66.102.8.21", "66.249.84.196", "17.58.63.4", "40.94.3.25")
_USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like "
    "Gecko) Mobile/15E148",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko)",
    "Mozilla/4.0 (compatible; MSIE 6.1; Windows XP; .NET CLR 1.1.4322; .NET CLR 2.0.50727)",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/124.0.0.0 Mobile Safari/537.36",
)
# Privacy proxies (Gmail image proxy, Apple Mail Privacy Protection) fetch on the user's behalf.
_PROXY_USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 5.1; rv:11.0) Gecko Firefox/11.0 (via ggpht.com GoogleImageProxy)",
    "Mozilla/5.0",
)
_URLS = (
    "https://shop.example/sale?utm_source=sendgrid",
    "https://app.example/login",
    "https://saas.example/docs/getting-started",
    "http://www.sendgrid.com/",
    "https://shop.example/p/1234?ref=mail&lang=de",
)
_CATEGORIES = (
    "newsletter", "welcome", "receipt", "password_reset", "weekly digest", "promo", "cat facts",
    "onboarding", "Zürich", "trial-ending",
)  # fmt: skip
_TEMPLATES = (
    ("d-8a1b2c3d4e5f40718293a4b5c6d7e8f9", "Welcome"),
    ("d-0f1e2d3c4b5a49687766554433221100", "Receipt"),
    ("d-1234567890abcdef1234567890abcdef", "Password reset"),
)
# asm_group_id is an integer that can exceed 32767 (an Int16 column would overflow).
_ASM_GROUPS = (10, 42, 12345, 40000, 123456)
_POOLS = ({"name": "transactional", "id": 210}, {"name": "marketing", "id": 4711})
_DROP_REASONS = (
    "Bounced Address",
    "Unsubscribed Address",
    "Spam Reporting Address",
    "Invalid",
    "Recipient List over Package Quota",
    "Invalid SMTPAPI header",
    "Spam Content (if spam checker app enabled)",
)
# (type, bounce_classification, reason, status): `type` is bounce (hard) or blocked (soft);
# status is usually an enhanced code "5.x.y" but a bare "550" occurs.
_BOUNCES = (
    (
        "bounce",
        "Invalid Address",
        "550 5.1.1 The email account that you tried to reach does not exist.",
        "5.1.1",
    ),
    (
        "bounce",
        "Mailbox Unavailable",
        "550 5.2.1 The email account that you tried to reach is disabled.",
        "5.2.1",
    ),
    ("bounce", "Unclassified", "500 unknown recipient", "5.0.0"),
    ("blocked", "Reputation", "550 5.7.1 Message rejected due to local policy", "550"),
    (
        "blocked",
        "Content",
        "552 5.7.0 This message was blocked because its content presents a potential security "
        "issue.",
        "5.7.0",
    ),
    (
        "blocked",
        "Frequency/Volume",
        "550 5.7.28 Our system has detected an unusual rate of unsolicited mail.",
        "5.7.28",
    ),
    ("blocked", "Technical", "554 5.4.7 Delivery expired (message too old) 'timeout'", "5.4.7"),
)
_DEFERRALS = (
    "400 try again later",
    "421 4.7.0 [TSS04] Messages temporarily deferred due to unexpected volume",
    "451 4.3.0 Mail server temporarily rejected message.",
)
_DELIVERY_RESPONSES = ("250 OK", "250 2.0.0 OK  1700000000 a1si123456qkb.0 - gsmtp", "250 Ok")
_CATEGORY_ARRAYS = tuple(
    [_CATEGORIES[(start + step * k) % len(_CATEGORIES)] for k in range(size)]
    for start in range(len(_CATEGORIES))
    for step, size in ((1, 1), (3, 2), (7, 3))
)
_ACCOUNT_STATUSES = (
    "compliance_suspend",
    "compliance_deactivate",
    "compliance_ban",
    "reactivate",
)


_T = TypeVar("_T")


@dataclass(slots=True)
class _Message:
    """What every event of one message shares."""

    key: str  # the 22-character id in sg_message_id and smtp-id
    email: str
    domain: str
    sg_message_id: str
    smtp_id: str
    millisecond_timestamps: bool  # Single Send examples use milliseconds
    asm_group_id: int | None
    pool: dict[str, Any] | None
    fields: dict[str, Any]  # category, template, marketing fields, custom args


class EventStream:
    """An endless, seeded stream of SendGrid event objects as compact JSON bytes.

    ``messages_per_second`` sets how fast simulated time passes per message: event timestamps
    are ``start_time`` plus simulated seconds. Iterating yields each event once; event ids are
    unique within a stream by construction (they embed the message's serial number).
    """

    def __init__(self, seed: int, start_time: int, messages_per_second: float) -> None:
        if messages_per_second <= 0:
            raise ValueError("messages_per_second must be positive")
        self._random = random.Random(seed)
        # random() is the cheapest draw; every pick below is built on it (choice() and
        # randrange() cost several times more, and generation is the load generator's limit).
        self._draw = self._random.random
        self._start_time = start_time
        self._seconds_per_message = 1.0 / messages_per_second
        self._encode = msgspec.json.Encoder().encode
        # (posting time, tie-breaker, encoded event): a tie-breaker keeps the heap from ever
        # comparing bytes and makes the order total, hence deterministic.
        self._pending: list[tuple[float, int, bytes]] = []
        self._sequence = 0
        self._messages = 0
        # A bijection of the message serial onto 40 bits: ids look random, never repeat.
        self._key_multiplier = (self._random.getrandbits(39) << 1) | 1
        self._key_offset = self._random.getrandbits(40)

    def __iter__(self) -> Iterator[bytes]:
        pending = self._pending
        while True:
            now = self._messages * self._seconds_per_message
            # Events are only posted once no message still to come can post earlier.
            while pending and pending[0][0] <= now:
                yield heapq.heappop(pending)[2]
            self._add_message(now)

    # -- draws ------------------------------------------------------------------------------

    def _pick(self, choices: Sequence[_T]) -> _T:
        return choices[int(self._draw() * len(choices))]

    def _below(self, stop: int) -> int:
        return int(self._draw() * stop)

    def _randint(self, low: int, high: int) -> int:
        return low + int(self._draw() * (high - low + 1))

    def _uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self._draw()

    # -- messages -------------------------------------------------------------------------

    def _add_message(self, sent_at: float) -> None:
        self._messages += 1
        draw = self._draw()
        if draw < _P_ACCOUNT_STATUS:
            self._account_status_change(sent_at)
            return
        message = self._new_message()
        t = sent_at
        if draw < _P_DROPPED:
            reason = self._pick(_DROP_REASONS)
            if reason == "Invalid":
                message.email = self._pick(_INVALID_ADDRESSES)
            self._emit(message, "processed", t, self._processed_fields(message))
            t += self._uniform(0.1, 2.0)
            self._emit(message, "dropped", t, {"reason": reason, "status": "5.0.0"})
            return
        if draw < _P_BOUNCE:
            bounce = self._pick(_BOUNCES)
            if bounce[1] == "Invalid Address" and self._draw() < 0.2:
                message.email = self._pick(_INVALID_ADDRESSES)
            self._emit(message, "processed", t, self._processed_fields(message))
            t += self._uniform(0.5, 5.0)
            if bounce[0] == "blocked" and self._draw() < 0.5:
                t = self._deferrals(message, t, self._randint(1, 2))
            self._emit(message, "bounce", t, self._bounce_fields(bounce, asynchronous=False))
            return
        self._emit(message, "processed", t, self._processed_fields(message))
        t += self._uniform(0.5, 5.0)
        if _P_ASYNC_BOUNCE <= draw < _P_DEFERRED:
            t = self._deferrals(message, t, self._randint(1, 3))
        self._emit(message, "delivered", t, self._delivered_fields(message))
        if draw < _P_ASYNC_BOUNCE:
            # An asynchronous bounce: the receiving server accepted the message, then bounced
            # it. It carries no sg_message_id and no smtp-id.
            later = t + self._uniform(60.0, 600.0)
            fields = self._bounce_fields(self._pick(_BOUNCES), asynchronous=True)
            self._emit(message, "bounce", later, fields, async_bounce=True)
            return
        self._engagement(message, t)

    def _new_message(self) -> _Message:
        serial = self._messages
        scrambled = (serial * self._key_multiplier + self._key_offset) & 0xFF_FFFF_FFFF
        raw_key = scrambled.to_bytes(5, "big") + self._random.getrandbits(88).to_bytes(11, "big")
        key = base64.urlsafe_b64encode(raw_key).decode("ascii").rstrip("=")
        domain = self._pick(_DOMAINS)
        email = f"{self._pick(_FIRST_NAMES)}{self._below(100_000)}@{domain}"
        sg_message_id = f"{key}.{self._pick(_FILTER_HOSTS)}-{self._below(1 << 32):08X}-0.0"
        smtp_id = f"<{key}@{self._pick(_SMTP_HOSTS)}.sendgrid.net>"
        fields: dict[str, Any] = {}
        category_draw = self._draw()
        if category_draw < 0.4:
            fields["category"] = self._pick(_CATEGORIES)  # a string ...
        elif category_draw < 0.8:
            fields["category"] = self._pick(_CATEGORY_ARRAYS)  # ... or an array
        millisecond_timestamps = False
        kind = self._draw()
        if kind < 0.10:
            # A Marketing Campaigns Single Send.
            millisecond_timestamps = self._draw() < 0.5
            number = self._randint(1, 500)
            fields.update(
                singlesend_id=f"{self._random.getrandbits(128):032x}",
                singlesend_name=f"Newsletter {number}",
                marketing_campaign_id=number,
                marketing_campaign_name=f"Newsletter {number}",
                mc_stats="singlesend",
                phase_id="send",
                post_type="event",
                sg_user_id=1234567,
                sg_content_type=self._pick(("html", "plain")),
                send_at=self._start_time,
            )
        elif kind < 0.15:
            # A legacy marketing campaign with an A/B split.
            fields.update(
                marketing_campaign_id=self._randint(1000, 9999),
                marketing_campaign_name="Spring sale",
                marketing_campaign_version=self._pick(("A", "B")),
                marketing_campaign_split_id=self._randint(100, 999),
            )
        elif kind < 0.55:
            template_id, template_name = self._pick(_TEMPLATES)
            fields.update(sg_template_id=template_id, sg_template_name=template_name)
        custom = self._draw()
        if custom < 0.5:
            # Custom arguments: any other top-level key. Mostly strings; legacy unique_args
            # also carry numbers, booleans and nested values.
            fields["userid"] = str(self._randint(1, 100_000))
            if custom < 0.2:
                fields["plan_id"] = self._randint(1, 50)
            if custom < 0.1:
                fields["campaign_code"] = "SPRING24"
                fields["vip"] = self._draw() < 0.5
            if custom < 0.03:
                fields["tags"] = ["spring", "sale"]
        return _Message(
            key=key,
            email=email,
            domain=domain,
            sg_message_id=sg_message_id,
            smtp_id=smtp_id,
            millisecond_timestamps=millisecond_timestamps,
            asm_group_id=self._pick(_ASM_GROUPS) if self._draw() < 0.5 else None,
            pool=self._pick(_POOLS) if self._draw() < 0.3 else None,
            fields=fields,
        )

    def _deferrals(self, message: _Message, t: float, count: int) -> float:
        for attempt in range(1, count + 1):
            fields = {
                "domain": message.domain,
                "from": self._pick(_SENDERS),
                "response": self._pick(_DEFERRALS),
                "attempt": str(attempt),  # a string, as SendGrid sends it
                "ip": self._pick(_SENDING_IPS),
                "tls": self._tls(),
            }
            self._emit(message, "deferred", t, fields)
            t += self._uniform(30.0, 300.0)
        return t

    def _engagement(self, message: _Message, delivered_at: float) -> None:
        if self._draw() < _P_OPEN:
            t = delivered_at
            for _ in range(self._randint(1, 3)):
                t += self._uniform(2.0, 300.0)
                self._emit(message, "open", t, self._open_fields())
            if self._draw() < _P_CLICK_AFTER_OPEN:
                for _ in range(self._randint(1, 2)):
                    t += self._uniform(1.0, 60.0)
                    self._emit(message, "click", t, self._click_fields())
        t = delivered_at + self._uniform(30.0, 600.0)
        draw = self._draw()
        if draw < _P_SPAMREPORT:
            self._emit(message, "spamreport", t, {})
        elif draw < _P_SPAMREPORT + _P_UNSUBSCRIBE:
            self._emit(message, "unsubscribe", t, {})
        elif draw < _P_SPAMREPORT + _P_UNSUBSCRIBE + _P_GROUP_UNSUBSCRIBE:
            group = message.asm_group_id if message.asm_group_id is not None else 40000
            self._emit(message, "group_unsubscribe", t, self._group_fields(group))
            if self._draw() < _P_GROUP_RESUBSCRIBE:
                t += self._uniform(10.0, 300.0)
                self._emit(message, "group_resubscribe", t, self._group_fields(group))

    def _account_status_change(self, t: float) -> None:
        # Compliance actions on the account: no email, no message ids.
        serial = self._messages
        raw_id = f"acct-{_ACCOUNT_ID}-{serial}-{self._random.getrandbits(32)}".encode()
        event = {
            "event": "account_status_change",
            "sg_event_id": base64.urlsafe_b64encode(raw_id).decode("ascii").rstrip("="),
            "timestamp": self._start_time + int(t),
            "type": self._pick(_ACCOUNT_STATUSES),
        }
        self._push(t, event)

    # -- per-event fields -----------------------------------------------------------------

    def _tls(self) -> int | str:
        # Documented as a boolean; arrives as 1/0 and sometimes "1"/"0".
        value = 1 if self._draw() < 0.9 else 0
        return str(value) if self._draw() < _P_TLS_STRING else value

    def _processed_fields(self, message: _Message) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if message.pool is not None:
            fields["pool"] = message.pool
        if message.asm_group_id is not None:
            fields["asm_group_id"] = message.asm_group_id
        return fields

    def _delivered_fields(self, message: _Message) -> dict[str, Any]:
        fields: dict[str, Any] = {
            "response": self._pick(_DELIVERY_RESPONSES),
            "ip": self._pick(_SENDING_IPS),
            "tls": self._tls(),
        }
        if self._draw() < 0.3:
            fields["cert_err"] = "0"
        if message.pool is not None:
            fields["pool"] = message.pool
        return fields

    def _bounce_fields(
        self, bounce: tuple[str, str, str, str], *, asynchronous: bool
    ) -> dict[str, Any]:
        bounce_type, classification, reason, status = bounce
        return {
            "reason": reason,
            "status": "550" if asynchronous else status,
            "type": bounce_type,
            "bounce_classification": classification,
            "ip": "unknown" if asynchronous or self._draw() < 0.2 else self._pick(_SENDING_IPS),
            "tls": self._tls(),
        }

    def _open_fields(self) -> dict[str, Any]:
        if self._draw() < _P_MACHINE_OPEN:
            return {
                "sg_machine_open": True,
                "useragent": self._pick(_PROXY_USER_AGENTS),
                "ip": self._pick(_PROXY_IPS),
            }
        return {
            "sg_machine_open": False,
            "useragent": self._pick(_USER_AGENTS),
            "ip": f"{self._pick(_RECIPIENT_IP_PREFIXES)}{self._randint(1, 254)}",
        }

    def _click_fields(self) -> dict[str, Any]:
        return {
            "useragent": self._pick(_USER_AGENTS),
            "ip": f"{self._pick(_RECIPIENT_IP_PREFIXES)}{self._randint(1, 254)}",
            "url": self._pick(_URLS),
            "url_offset": {"index": self._below(6), "type": self._pick(("html", "text"))},
        }

    def _group_fields(self, group: int) -> dict[str, Any]:
        return {
            "useragent": self._pick(_USER_AGENTS),
            "ip": f"{self._pick(_RECIPIENT_IP_PREFIXES)}{self._randint(1, 254)}",
            "url": "https://u1234.ct.sendgrid.net/asm/unsubscribe/?user_id=1234567",
            "asm_group_id": group,
        }

    # -- assembling an event ----------------------------------------------------------------

    def _emit(
        self,
        message: _Message,
        event: str,
        t: float,
        fields: dict[str, Any],
        *,
        async_bounce: bool = False,
    ) -> None:
        index = self._sequence
        raw_id = f"{_TAGS[event]}-{_ACCOUNT_ID}-{message.key}-{index}"
        if self._draw() < _P_LONG_EVENT_ID:
            # Documented as "up to 100 characters"; longer ones are seen. Opaque strings.
            raw_id = f"{raw_id}-{message.sg_message_id}-{message.smtp_id}"
        sg_event_id = base64.urlsafe_b64encode(raw_id.encode()).decode("ascii").rstrip("=")
        seconds = self._start_time + t
        timestamp: int | str = (
            int(seconds * 1000) if message.millisecond_timestamps else int(seconds)
        )
        if self._draw() < _P_TIMESTAMP_STRING:
            timestamp = str(timestamp)
        document: dict[str, Any] = {"email": message.email, "timestamp": timestamp}
        if not async_bounce and event not in ("open", "click"):
            draw = self._draw()
            document["smtp-id"] = "" if draw < _P_EMPTY_SMTP_ID else message.smtp_id
        document["event"] = event
        document.update(message.fields)
        document["sg_event_id"] = sg_event_id
        if not async_bounce:
            leading_space = self._draw() < _P_LEADING_SPACE_MESSAGE_ID
            document["sg_message_id"] = (
                f" {message.sg_message_id}" if leading_space else message.sg_message_id
            )
        document.update(fields)
        self._push(t, document)

    def _push(self, t: float, document: dict[str, Any]) -> None:
        delay = self._uniform(0.0, _MAX_POSTING_DELAY)
        if self._draw() < _P_LATE_POST:
            delay += _LATE_POST_DELAY
        self._sequence += 1
        heapq.heappush(self._pending, (t + delay, self._sequence, self._encode(document)))
