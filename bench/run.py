"""`make bench`: the stage benchmarks and bench/e2e.py in one run, one table, one JSON file.

A thin runner: each figure comes from an existing benchmark (bench_hot_paths, processor_stage,
sink, broker, e2e), sized so the whole run stays under 10 minutes on a 2-core machine, each
next to the baseline that benchmark measures in the same run. Prints one table -- figure,
value, baseline, ratio, target (issue 16), met -- and writes the same rows as JSON to
``bench/results/<commit>.json`` (git-ignored; ``--out`` for another path), so that two commits
compare with ``python -m bench.compare A.json B.json``.

Run: ``make bench`` or ``.venv/bin/python -m bench.run [--out PATH] [--only NAME,...]
[--e2e-seconds S]``. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Figure:
    bench: str
    name: str
    value: float
    unit: str
    baseline: float | None  # measured in the same run; None: no baseline (absolute target)
    baseline_label: str
    target: str  # issue 16's target, "" when none
    met: bool | None  # None: no target

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0:
            return None
        return self.value / self.baseline


def hot_paths() -> list[Figure]:
    from bench.bench_hot_paths import measure

    events, rows = measure()
    figures = []
    for name, measured, baseline, label in rows:
        if name.startswith("  "):  # the processor's sub-steps: in the script's own report
            continue
        figures.append(
            Figure("hot_paths", name, measured * 1e3, "ms", baseline * 1e3, label, "", None)
        )
    core = next(r for r in rows if r[0].startswith("processor:"))
    figures.append(
        Figure(
            "hot_paths",
            "processor core, µs CPU/event (768 KB batch)",
            core[1] / events * 1e6,
            "µs",
            None,
            "",
            "",
            None,
        )
    )
    return figures


def processor_stage() -> list[Figure]:
    from bench.processor_stage import measure

    figures = asyncio.run(measure())
    return [
        Figure(
            "processor_stage",
            "processor stage (consume->produce), µs CPU/event",
            figures.stage_us_per_event,
            "µs",
            figures.core_us_per_event,
            "process_raw_record per event",
            "<= 1.5x",
            figures.ratio <= 1.5,
        )
    ]


def sink(events: int = 40_000) -> list[Figure]:
    from bench.sink import embedded_figures

    rows, through_sink, bulk = embedded_figures(events)
    return [
        Figure(
            "sink",
            f"sink into embedded ClickHouse, rows/s ({rows:,} rows)",
            through_sink,
            "rows/s",
            bulk,
            "one clickhouse-connect insert",
            ">= 0.8x",
            through_sink / bulk >= 0.8,
        )
    ]


def broker(small: int = 20_000, large: int = 40) -> list[Figure]:
    from bench.broker import measure_all
    from sgpipe.runtime.settings import EmbeddedSettings

    memory, durable = asyncio.run(
        measure_all(small, large, [EmbeddedSettings().storage_memory_limit_mib])
    )
    return [
        Figure(
            "broker",
            "durable broker, 1 KB produce, records/s",
            durable.small_produce_per_second,
            "rec/s",
            memory.small_produce_per_second,
            "in-memory broker",
            ">= 0.5x (proxy for CPU <= 2x)",
            durable.small_produce_per_second / memory.small_produce_per_second >= 0.5,
        ),
        *broker_small(),
        Figure(
            "broker",
            "durable broker, 768 KB produce, records/s",
            durable.large_produce_per_second,
            "rec/s",
            memory.large_produce_per_second,
            "in-memory broker",
            "",
            None,
        ),
    ]


def broker_small(records: int = 3_000) -> list[Figure]:
    from bench.broker_small import measure
    from sgpipe.embedded.topics import EMBEDDED_TOPIC_PARTITIONS

    runs = asyncio.run(measure(records, [5], [EMBEDDED_TOPIC_PARTITIONS], concurrency=32))
    memory, durable = (next(r for r in runs if r.storage == s) for s in ("memory", "durable"))
    return [
        Figure(
            "broker",
            "durable broker, 2 KB as the ingress writes, µs CPU/record",
            durable.total_us,
            "µs",
            memory.total_us,
            "in-memory broker",
            "<= 2x (issue 16: whole tree)",
            durable.total_us / memory.total_us <= 2,
        )
    ]


def e2e(seconds: float, rate: float) -> list[Figure]:
    command = [sys.executable, "-m", "bench.e2e", "--seconds", f"{seconds:g}"]
    command += ["--rate", f"{rate:g}", "--json"]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    bare = result["bare_events_per_second"]
    phases = {phase["name"]: phase for phase in result["phases"]}
    fixed, flat = phases["fixed rate"], phases["flat out"]
    figures = [
        Figure(
            "e2e",
            "sgpipe up flat out, stored events/s (simulator batches)",
            flat["stored_events_per_second"],
            "ev/s",
            bare,
            "bare aiohttp server, same client",
            ">= 20,000 (768 KB batches)",
            flat["stored_events_per_second"] >= 20_000,
        ),
        Figure(
            "e2e",
            "sgpipe up flat out, acknowledged events/s",
            flat["posted_events_per_second"],
            "ev/s",
            bare,
            "bare aiohttp server, same client",
            "",
            None,
        ),
    ]
    p50 = fixed["latency_p50_ms"]
    figures.append(
        Figure(
            "e2e",
            f"2xx -> row visible p50, ms ({rate:g} ev/s)",
            p50 if p50 is not None else float("nan"),
            "ms",
            fixed["sampler_floor_ms"],
            "the visibility query's own round trip",
            "",
            None,
        )
    )
    for phase, limit_ms, label in ((fixed, 1_000, f"{rate:g} ev/s"), (flat, None, "flat out")):
        p99 = phase["latency_p99_ms"]
        figures.append(
            Figure(
                "e2e",
                f"2xx -> row visible p99, ms ({label})",
                p99 if p99 is not None else float("nan"),
                "ms",
                phase["sampler_floor_ms"],
                "the visibility query's own round trip",
                f"<= {limit_ms:,} ms at 2,000 ev/s" if limit_ms else "",
                (p99 is not None and p99 <= limit_ms and rate >= 2_000) if limit_ms else None,
            )
        )
    lost = fixed["lost"] + flat["lost"]
    figures.append(
        Figure("e2e", "acknowledged, not stored", lost, "events", None, "", "0", lost == 0)
    )
    for process, mib in sorted(flat["peak_rss_mib"].items()):
        figures.append(
            Figure("e2e", f"peak RSS {process}, MiB", mib, "MiB", None, "", "reported", None)
        )
    return figures


def commit_name() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def print_table(figures: list[Figure]) -> None:
    print(
        f"\n{'figure':<58}{'value':>12}  {'baseline':>10}{'ratio':>10}  {'target':<30}"
        "met  baseline is"
    )
    for figure in figures:
        baseline = f"{figure.baseline:,.1f}" if figure.baseline is not None else "-"
        ratio = f"{figure.ratio:.2f}x" if figure.ratio is not None else "-"
        met = {True: "yes", False: "NO", None: ""}[figure.met]
        print(
            f"{figure.name:<58}{figure.value:>12,.1f}  {baseline:>10}{ratio:>10}  "
            f"{figure.target:<30}{met:<5}{figure.baseline_label}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="JSON path (default bench/results/<commit>.json)")
    parser.add_argument("--only", help="comma-separated: hot_paths,processor_stage,sink,broker,e2e")
    parser.add_argument("--e2e-seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--e2e-rate", type=float, default=2_000.0, help="fixed-rate phase")
    arguments = parser.parse_args()
    benches: dict[str, Callable[[], list[Figure]]] = {
        "hot_paths": hot_paths,
        "processor_stage": processor_stage,
        "sink": sink,
        "broker": broker,
        "e2e": lambda: e2e(arguments.e2e_seconds, arguments.e2e_rate),
    }
    chosen = arguments.only.split(",") if arguments.only else list(benches)
    figures: list[Figure] = []
    seconds: dict[str, float] = {}
    began = time.monotonic()
    for name in chosen:
        print(f"--- {name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        figures.extend(benches[name]())
        seconds[name] = round(time.monotonic() - started, 1)
    total = time.monotonic() - began
    print_table(figures)
    print(f"\n{total:.0f} s in all ({', '.join(f'{k} {v:g} s' for k, v in seconds.items())})")
    out = arguments.out or RESULTS / f"{commit_name()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "commit": commit_name(),
        "machine": {"cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "seconds": seconds,
        "figures": [{**asdict(f), "ratio": f.ratio} for f in figures],
    }
    out.write_text(json.dumps(document, indent=1) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
