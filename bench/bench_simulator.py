"""How fast the simulator makes load: events generated, batched and signed per CPU second.

The simulator is also the load generator, so it must outrun the pipeline by a wide margin.
Figures are CPU time of this thread (per core), next to two baselines measured in the same run:
- encode floor: msgspec-encoding one fixed, typical event dict (what any generator pays at
  least to produce JSON);
- sign: ECDSA P-256 over a 768 KB body (SendGrid's largest), per event of that body.

Run: ``.venv/bin/python -m bench.bench_simulator``. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from itertools import islice

import msgspec

from sgpipe.simulator.batches import PostPlanner
from sgpipe.simulator.events import EventStream
from sgpipe.simulator.keys import generate_private_key, sign

EVENTS = 200_000
TYPICAL_EVENT = {
    "email": "sara67711@orange.fr",
    "timestamp": 1735689600,
    "smtp-id": "<nzDqXnaXAA7Vmzl5OBsb-g@ismtpd-555.sendgrid.net>",
    "event": "delivered",
    "category": ["cat facts", "newsletter"],
    "userid": "27805",
    "sg_event_id": "cHJvYy0xMDk5NDkxOS1uekRxWG5hWEFBN1Ztemw1T0JzYi1nLTg",
    "sg_message_id": "nzDqXnaXAA7Vmzl5OBsb-g.filterdrecv-p1mdw1-6d9f7b8c44-tzk2w-11-A6048457-0.0",
    "response": "250 OK",
    "ip": "168.245.12.3",
    "tls": 1,
}


def cpu_seconds(function: Callable[[], object], repeat: int = 3) -> float:
    timings = []
    for _ in range(repeat):
        started = time.thread_time()
        function()
        timings.append(time.thread_time() - started)
    return min(timings)


def main() -> None:
    encode = msgspec.json.Encoder().encode
    floor = cpu_seconds(lambda: [encode(TYPICAL_EVENT) for _ in range(EVENTS)])

    stream_seconds = cpu_seconds(
        lambda: list(islice(iter(EventStream(1, 1_735_689_600, 1.0)), EVENTS))
    )

    posts = list(PostPlanner(EventStream(1, 1_735_689_600, 1.0), seed=1, event_limit=EVENTS))
    planned_seconds = cpu_seconds(
        lambda: list(PostPlanner(EventStream(1, 1_735_689_600, 1.0), seed=1, event_limit=EVENTS))
    )
    key = generate_private_key()
    sign_seconds = cpu_seconds(lambda: [sign(key, "1735689600", post.body) for post in posts])
    largest = max(len(post.body) for post in posts)

    total = planned_seconds + sign_seconds
    print(f"{EVENTS:,} events in {len(posts)} bodies of up to {largest / 1024:,.0f} KB")
    print(f"encode floor (one fixed dict)   {EVENTS / floor:>12,.0f} events/s per core")
    print(f"generate (EventStream)          {EVENTS / stream_seconds:>12,.0f} events/s per core")
    print(f"generate + batch (PostPlanner)  {EVENTS / planned_seconds:>12,.0f} events/s per core")
    print(f"sign bodies                     {EVENTS / sign_seconds:>12,.0f} events/s per core")
    print(f"generate + batch + sign         {EVENTS / total:>12,.0f} events/s per core")
    print(f"ratio to the encode floor       {floor / total:>12.2f}")


if __name__ == "__main__":
    main()
