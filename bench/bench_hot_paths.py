"""Hot paths of the foundation, as ratios against a baseline measured in the same run.

- Ingress: ``verify_signature`` on a 768 KB body against cryptography's bare ECDSA verify of the
  same bytes (the floor: our wrapper should add almost nothing).
- Raw-record HMAC: ``verify_raw_record`` (what the processor checks before reading a raw
  record) of the same batch, against the same baseline as the processor.
- Processor: ``process_raw_record`` (split + parse + normalize + Avro encode) of a 768 KB
  SendGrid batch against ``json.loads`` of the same body (what any processor must pay at
  least), and each of its steps against the same baseline; fastavro's generic writer is shown
  beside the compiled one the codec uses.
- Sink: decoding the batch's events (compiled reader, and fastavro's) against the same
  baseline.

Timings are CPU time of this process (``time.process_time``: other processes competing for the
cores do not inflate it), the best of several runs, the baseline and the measured code taking
turns.

Run: ``.venv/bin/python -m bench.bench_hot_paths``. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import base64
import io
import json
import random
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastavro import schemaless_reader, schemaless_writer

from ingest.signature import load_public_key, verify_signature
from processors.normalize import BatchContext, normalize_event
from processors.pipeline import process_raw_record
from processors.split import parse_element, split_elements
from schemas.email_event import EmailEventCodec
from schemas.raw_auth import RawAuthKey, sign_raw_record, verify_raw_record
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
        started = time.process_time()
        function()
        timings.append(time.process_time() - started)
    return min(timings)


def best_of_pair(
    measured: Callable[[], object], baseline: Callable[[], object], rounds: int = 9
) -> tuple[float, float]:
    """Best times of ``measured`` and ``baseline``, run in turns."""
    times_measured, times_baseline = [], []
    for _ in range(rounds):
        times_baseline.append(best_of(baseline, repeat=3))
        times_measured.append(best_of(measured, repeat=2))
    return min(times_measured), min(times_baseline)


Row = tuple[str, float, float, str]  # figure, measured seconds, baseline seconds, baseline


def measure() -> tuple[int, list[Row]]:
    """The batch's event count and every row (figure, measured s, baseline s, baseline)."""
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

    def parse_only() -> object:
        return json.loads(body)

    elements = split_elements(body)
    parsed = [parse_element(element) for element in elements]
    context = BatchContext("bench", 1_700_000_000_000, "bench")
    records = [normalize_event(item, raw, context).record for item, raw in parsed]
    schema = codec.current.schema

    def fastavro_encode() -> None:
        for record in records:
            schemaless_writer(io.BytesIO(), schema, record)

    values = [event.value for event in result.events]

    def fastavro_decode() -> None:
        for value in values:
            schemaless_reader(io.BytesIO(value[10:]), schema, None)

    raw_key = RawAuthKey("bench", b"b" * 43)
    signed = sign_raw_record(raw_key, body, headers)
    steps = [
        ("raw HMAC: verify_raw_record", lambda: verify_raw_record([raw_key], body, signed)),
        (
            "processor: split+parse+normalize+encode",
            lambda: process_raw_record(message, codec),
        ),
        ("  split (msgspec Raw spans)", lambda: split_elements(body)),
        ("  parse each element", lambda: [parse_element(e) for e in elements]),
        ("  normalize (typing)", lambda: [normalize_event(i, r, context) for i, r in parsed]),
        ("  encode (compiled writer)", lambda: [codec.encode(record) for record in records]),
        ("  encode (fastavro writer)", fastavro_encode),
        ("sink: decode (compiled reader)", lambda: [codec.decode(value) for value in values]),
        ("sink: decode (fastavro reader)", fastavro_decode),
    ]
    rows = [("ingress: verify_signature, 768 KB", our_verify, bare_verify, "bare ECDSA verify")]
    for name, step in steps:
        measured, baseline = best_of_pair(step, parse_only)
        rows.append((name, measured, baseline, "json.loads of the body"))
    return event_count, rows


def main() -> None:
    event_count, rows = measure()
    body_kb = SENDGRID_MAX_BATCH_BYTES / 1024
    print(f"batch: {body_kb:.0f} KB, {event_count} events")
    print(f"{'figure':<42}{'time':>10}{'ratio':>9}  baseline")
    for name, measured, baseline, label in rows:
        print(f"{name:<42}{measured * 1e3:>8.2f}ms{measured / baseline:>8.1f}x  {label}")
    per_event = rows[2][1] / event_count
    print(f"processor: {1 / per_event:,.0f} events/s on one core ({per_event * 1e6:.1f} µs/event)")


if __name__ == "__main__":
    main()
