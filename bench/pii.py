"""What the PII policy costs the processor: CPU time per event of ``process_raw_record`` on a
simulated stream, without a policy and with each field hashed or dropped, in the same run.

With a policy, every event that carries a field whose mode is not ``keep`` is walked for copies
of its values and its ``raw`` is re-serialized; events without such a field keep their bytes.

Run: ``.venv/bin/python -m bench.pii``. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from processors.pii import PiiPolicy
from processors.pipeline import process_raw_record
from schemas.email_event import EmailEventCodec
from schemas.raw_batch import RawBatch, raw_batch_headers
from sgpipe.runtime.messages import Message
from sgpipe.simulator.dataset import simulated_posts

EVENTS = 50_000
KEY = b"a key for the benchmark only"


def cpu_seconds(function: Callable[[], object], repeat: int = 3) -> float:
    timings = []
    for _ in range(repeat):
        started = time.thread_time()
        function()
        timings.append(time.thread_time() - started)
    return min(timings)


def main() -> None:
    messages = []
    for post in simulated_posts(EVENTS, seed=5):
        raw = RawBatch("main", post.body, 1_735_689_600_000, f"req-{post.index}", None, "sig")
        messages.append(Message("raw", 0, post.index, 0, None, post.body, raw_batch_headers(raw)))
    codec = EmailEventCodec()
    policies: dict[str, PiiPolicy | None] = {
        "no policy (keep)": None,
        "email: hash": PiiPolicy(email="hash", key=KEY),
        "email, ip, useragent: hash": PiiPolicy("hash", "hash", "hash", KEY),
        "email, ip, useragent: drop": PiiPolicy("drop", "drop", "drop"),
    }
    baseline = 0.0
    print(f"{EVENTS:,} simulated events through process_raw_record (CPU time per event)")
    for name, policy in policies.items():

        def run(policy: PiiPolicy | None = policy) -> object:
            return [process_raw_record(m, codec, pii=policy) for m in messages]

        seconds = cpu_seconds(run)
        per_event = seconds / EVENTS * 1e6
        baseline = baseline or per_event
        print(f"{name:<30} {per_event:6.1f} µs  ×{per_event / baseline:4.2f}")


if __name__ == "__main__":
    main()
