"""The closing words of `make test` (issue 7, "Done means"): what this run did to break
sgpipe's promise and what it found.

Tests record here as they run, in a module-level record of their pytest process. Under
pytest-xdist each worker holds its own record: ``tests/conftest.py`` ships it to the controller
(``to_json`` in the worker's ``workeroutput``) when the worker ends, and the controller merges
it (``merge_json``) before printing, so the closing words count every worker's tests:

* fault tests: each fault injected, with the events acknowledged, lost and duplicated;
* hostile corpora: every passed test item marked ``@pytest.mark.hostile("<corpus>")``
  counts as one hostile input tried (counted by ``tests/conftest.py``);
* the ingress corpus test: the worst ``/healthz`` latency seen while it ran;
* the broker test: durable vs in-memory produce throughput, measured in the same run.

``summary_lines`` renders it; ``tests/conftest.py`` prints it in pytest's terminal summary,
just before the final counts. Timings are printed, never asserted.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class FaultOutcome:
    test: str  # what was broken, for people
    faults: int  # faults injected in that test
    acknowledged: int
    lost: int
    duplicates: int
    refusals: dict[str, int]  # answers other than 2xx, by kind
    memory_losses_by_design: int = 0  # memory broker restarted empty: documented, not a bug


@dataclass(frozen=True)
class BrokerThroughput:
    messages: int
    memory_per_second: float
    durable_per_second: float


@dataclass
class PromiseReport:
    faults: list[FaultOutcome] = field(default_factory=list)
    hostile_inputs: Counter[str] = field(default_factory=Counter)
    healthz_worst_seconds: float | None = None
    healthz_probes: int = 0
    broker: BrokerThroughput | None = None

    def record_fault(self, outcome: FaultOutcome) -> None:
        self.faults.append(outcome)

    def record_hostile(self, corpus: str) -> None:
        self.hostile_inputs[corpus] += 1

    def record_healthz(self, worst_seconds: float, probes: int) -> None:
        self.healthz_worst_seconds = worst_seconds
        self.healthz_probes = probes

    def record_broker(self, throughput: BrokerThroughput) -> None:
        self.broker = throughput

    def to_json(self) -> str:
        """This process's record, for the controller of an xdist run."""
        return json.dumps(
            {
                "faults": [asdict(outcome) for outcome in self.faults],
                "hostile_inputs": dict(self.hostile_inputs),
                "healthz_worst_seconds": self.healthz_worst_seconds,
                "healthz_probes": self.healthz_probes,
                "broker": asdict(self.broker) if self.broker is not None else None,
            }
        )

    def merge_json(self, text: str) -> None:
        """Adds a worker's record (``to_json``) to this one."""
        worker = json.loads(text)
        self.faults.extend(FaultOutcome(**outcome) for outcome in worker["faults"])
        self.hostile_inputs.update(worker["hostile_inputs"])
        worst = worker["healthz_worst_seconds"]
        if worst is not None and (
            self.healthz_worst_seconds is None or worst > self.healthz_worst_seconds
        ):
            self.healthz_worst_seconds = worst
            self.healthz_probes = worker["healthz_probes"]
        if worker["broker"] is not None:
            self.broker = BrokerThroughput(**worker["broker"])

    def empty(self) -> bool:
        return not (self.faults or self.hostile_inputs or self.healthz_worst_seconds or self.broker)

    def summary_lines(self) -> list[str]:
        lines = []
        faults = sum(outcome.faults for outcome in self.faults)
        acknowledged = sum(outcome.acknowledged for outcome in self.faults)
        lost = sum(outcome.lost for outcome in self.faults)
        duplicates = sum(outcome.duplicates for outcome in self.faults)
        lines.append(
            f"faults injected: {faults} in {len(self.faults)} tests; "
            f"events acknowledged meanwhile: {acknowledged}"
        )
        for outcome in self.faults:
            refused = ", ".join(f"{k} x{v}" for k, v in sorted(outcome.refusals.items()))
            by_design = (
                f", {outcome.memory_losses_by_design} lost by design (memory broker)"
                if outcome.memory_losses_by_design
                else ""
            )
            lines.append(
                f"  {outcome.test}: {outcome.faults} fault(s), {outcome.acknowledged} "
                f"acknowledged, {outcome.lost} lost, {outcome.duplicates} duplicates"
                f"{by_design}; refused: {refused or 'none'}"
            )
        corpora = ", ".join(
            f"{name} {count}" for name, count in sorted(self.hostile_inputs.items())
        )
        lines.append(
            f"hostile inputs tried: {sum(self.hostile_inputs.values())}"
            + (f" ({corpora})" if corpora else "")
        )
        lines.append(f"acknowledged events lost: {lost}")
        lines.append(f"duplicates visible: {duplicates}")
        if self.healthz_worst_seconds is not None:
            lines.append(
                f"worst /healthz latency under the hostile corpus: "
                f"{self.healthz_worst_seconds * 1000:.1f} ms ({self.healthz_probes} probes)"
            )
        else:
            lines.append("worst /healthz latency under the hostile corpus: not run")
        if self.broker is not None:
            ratio = self.broker.durable_per_second / self.broker.memory_per_second
            lines.append(
                f"broker throughput, 1 KB acks=all, {self.broker.messages} messages: durable "
                f"{self.broker.durable_per_second:,.0f} msg/s, in-memory "
                f"{self.broker.memory_per_second:,.0f} msg/s ({ratio:.2f}x), same run"
            )
        else:
            lines.append("broker throughput (durable vs in-memory): not run")
        return lines


REPORT = PromiseReport()
