"""Hot paths of the foundation, as ratios against a baseline measured in the same run.

- Ingress: ``verify_signature`` on a 768 KB body against cryptography's bare ECDSA verify of the
  same bytes (the floor: our wrapper should add almost nothing).
- Processor: ``process_raw_record`` (split + normalize + Avro encode) of a 768 KB SendGrid batch
  against ``json.loads`` of the same body (what any processor must pay at least).

Run: ``.venv/bin/python -m bench.bench_hot_paths``. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import base64
import json
import random
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ingest.signature import load_public_key, verify_signature
from processors.pipeline import process_raw_record
from schemas.email_event import EmailEventCodec
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.messages import Message

SENDGRID_MAX_BATCH_BYTES = 768 * 1024
EVENT_TYPES = ["processed", "delivered", "open", "click", "bounce", "deferred", "dropped"]


def synthetic_batch(target_bytes: int, seed: int = 7) -> bytes:
    """A SendGrid-shaped body: events joined by ``,\\r\\n``, ending in ``\\r\\n``."""
    rng = random.Random(seed)
    events: list[str] = []
    size = 2
    while size < target_bytes:
        event = {
            "email": f"user{rng.randrange(10**6)}@example.com",
            "event": rng.choice(EVENT_TYPES),
            "sg_event_id": base64.urlsafe_b64encode(rng.randbytes(36)).decode(),
            "sg_message_id": f"{rng.randbytes(11).hex()}.filterdrecv-p3mdw1-756b745b58-kmzbl-18",
            "smtp-id": f"<{rng.randbytes(11).hex()}@ismtpd0039p1iad1.sendgrid.net>",
            "timestamp": 1_700_000_000 + rng.randrange(10**6),
            "category": rng.choice(["welcome", ["newsletter", "weekly"]]),
            "useragent": "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36",
            "ip": f"203.0.113.{rng.randrange(256)}",
            "customer_id": str(rng.randrange(10**6)),
        }
        encoded = json.dumps(event, separators=(",", ":"))
        events.append(encoded)
        size += len(encoded) + 3
    return ("[" + ",\r\n".join(events) + "]\r\n").encode()


def best_of(function: Callable[[], object], repeat: int = 15) -> float:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return min(timings)


def main() -> None:
    body = synthetic_batch(SENDGRID_MAX_BATCH_BYTES)
    event_count = len(json.loads(body))

    private_key = ec.generate_private_key(ec.SECP256R1())
    public_der = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    key = load_public_key(base64.b64encode(public_der).decode())
    timestamp = "1700000000"
    signature_der = private_key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    signature = base64.b64encode(signature_der).decode()

    bare_verify = best_of(
        lambda: key.verify(signature_der, timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    )
    our_verify = best_of(
        lambda: verify_signature([key], signature, timestamp, body, now=0, tolerance_seconds=0)
    )

    codec = EmailEventCodec()
    batch = RawBatch("bench", body, 1_700_000_000_000, "bench", 1_700_000_000, "signature")
    headers = raw_batch_headers(batch)
    message = Message("raw", 0, 0, 0, None, body, headers)
    result = process_raw_record(message, codec)
    assert len(result.events) == event_count and not result.rejections
    parse_only = best_of(lambda: json.loads(body))
    processing = best_of(lambda: process_raw_record(message, codec), repeat=5)

    rows = [
        ("ingress: verify_signature, 768 KB", our_verify, bare_verify, "bare ECDSA verify"),
        ("processor: split+normalize+encode", processing, parse_only, "json.loads of the body"),
    ]
    print(f"batch: {len(body) / 1024:.0f} KB, {event_count} events")
    print(f"{'figure':<38}{'time':>12}{'ratio':>9}  baseline")
    for name, measured, baseline, label in rows:
        print(f"{name:<38}{measured * 1e3:>10.2f}ms{measured / baseline:>8.1f}x  {label}")
    per_event = processing / event_count
    print(f"processor: {1 / per_event:,.0f} events/s on one core ({per_event * 1e6:.1f} µs/event)")


if __name__ == "__main__":
    main()
