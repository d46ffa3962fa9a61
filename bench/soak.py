"""A soak of the whole pipeline: `sgpipe up` on its embedded defaults (durable broker, embedded
ClickHouse) fed by the simulator at a fixed rate -- signed, with SendGrid's duplicates -- for
``--minutes`` (2 by default; run it for hours with a larger number).

Reports, all measured in this run:

* throughput: events acknowledged per second and distinct events stored per second, as ratios
  of the offered rate; CPU seconds per process and the pipeline's CPU per event;
* latency, sampled: from the ingress's 2xx to the event's row being visible in ClickHouse
  (one event of every acknowledged POST), p50/p90/p99/max, next to the sampler's own floor
  (a ClickHouse round trip) and the ingress's acknowledgement latency (its histogram);
* memory: the RSS of every process of `sgpipe up`'s tree (the supervisor, each stage, the
  broker and its storage, ClickHouse) over time, with end/warm-up ratios (growth = a leak);
* the promise at the end: acknowledged events not stored, duplicates visible through FINAL;
* the durable broker's produce throughput next to the in-memory one (``bench/broker.py``),
  measured before the soak on the same machine.

Asserts nothing about time. Run: ``.venv/bin/python -m bench.soak [--minutes N] [--rate R]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.broker import Figures, measure
from sgpipe.embedded.broker import free_port
from sgpipe.embedded.credentials import EmbeddedUser, load_credentials
from sgpipe.runtime.settings import EmbeddedSettings
from sgpipe.simulator.batches import SENDGRID_MAX_BATCH_BYTES, PlannedPost
from sgpipe.simulator.keys import generate_private_key, public_key_base64
from sgpipe.simulator.simulation import SimulationOptions, SimulationSummary, simulate

DATABASE = "sgpipe"
START_TIMEOUT = 120.0
DRAIN_TIMEOUT = 300.0
VISIBILITY_POLL_SECONDS = 0.1
SGPIPE_COMMANDS = ("up", "ingest", "process", "sink", "serve-clickhouse")
PERCENTILES = (50, 90, 99)


# --- the process tree ----------------------------------------------------------------------


def process_tree(root: int) -> list[int]:
    """``root`` and every descendant, from /proc (parent pids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: the fields follow the last ")".
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, []))
    return tree


def process_label(pid: int) -> str | None:
    try:
        argv = (Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0"))[:-1]
    except OSError:
        return None
    words = [word.decode(errors="replace") for word in argv]
    if not words:
        return None
    name = Path(words[0]).name
    if name in ("tansu", "weed"):
        return name
    for word in words[1:]:
        if word in SGPIPE_COMMANDS:
            return f"sgpipe {word}"
    return name


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # utime and stime are fields 14 and 15 of stat(5): 12 and 13 after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class TreeSamples:
    """RSS per labelled process over time, and the CPU each process used."""

    times: list[float] = field(default_factory=list)
    rss: list[dict[str, float]] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # label -> seconds, last seen

    def sample(self, root: int, elapsed: float) -> None:
        current: dict[str, float] = {}
        for pid in process_tree(root):
            label = process_label(pid)
            memory = rss_mib(pid)
            if label is None or memory is None:
                continue
            key = label if label not in current else f"{label} ({pid})"
            current[key] = memory
            used = cpu_seconds(pid)
            if used is not None:
                # A restarted child starts again from zero: keep the largest seen per pid.
                self.cpu[f"{label}#{pid}"] = used
        self.times.append(elapsed)
        self.rss.append(current)

    def labels(self) -> list[str]:
        seen: dict[str, None] = {}
        for sample in self.rss:
            seen.update(dict.fromkeys(sample))
        return list(seen)

    def cpu_by_label(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for key, used in self.cpu.items():
            label = key.split("#", 1)[0]
            totals[label] = totals.get(label, 0.0) + used
        return totals


# --- latency: ingress 2xx -> row visible -------------------------------------------------


@dataclass
class VisibilitySampler:
    """One event of each acknowledged POST, timed from its 2xx until a query sees its row."""

    url: str
    user: EmbeddedUser
    pending: dict[str, float] = field(default_factory=dict)  # sg_event_id -> acknowledged at
    latencies: list[float] = field(default_factory=list)
    round_trips: list[float] = field(default_factory=list)
    acknowledged: set[str] = field(default_factory=set)

    def on_acknowledged(self, post: PlannedPost) -> None:
        now = time.monotonic()
        ids = [str(element["sg_event_id"]) for element in json.loads(post.body)]
        fresh = [event_id for event_id in ids if event_id not in self.acknowledged]
        self.acknowledged.update(ids)
        if fresh:  # a copy's row may already be there: time only first acknowledgements
            self.pending[fresh[0]] = now

    async def run(self, stop: asyncio.Event) -> None:
        headers = {"X-ClickHouse-User": self.user.name, "X-ClickHouse-Key": self.user.password}
        async with aiohttp.ClientSession(headers=headers) as session:
            while not (stop.is_set() and not self.pending):
                await asyncio.sleep(VISIBILITY_POLL_SECONDS)
                if not self.pending:
                    continue
                ids = ",".join(f"'{event_id}'" for event_id in self.pending)
                sql = (
                    f"SELECT sg_event_id FROM {DATABASE}.email_events "
                    f"WHERE sg_event_id IN ({ids}) FORMAT TabSeparated"
                )
                began = time.monotonic()
                try:
                    async with session.post(self.url, data=sql) as response:
                        text = await response.text()
                        if response.status != 200:
                            continue
                except aiohttp.ClientError:
                    continue
                seen = time.monotonic()
                self.round_trips.append(seen - began)
                for event_id in set(text.split()):
                    acknowledged_at = self.pending.pop(event_id, None)
                    if acknowledged_at is not None:
                        self.latencies.append(seen - acknowledged_at)


# --- running `sgpipe up` -----------------------------------------------------------------


@dataclass
class RunningUp:
    process: subprocess.Popen[bytes]
    data_dir: Path
    ingest_port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.ingest_port}"


def start_up(
    directory: Path,
    public_key: str,
    *,
    broker_storage: str = "durable",
    partitions: int | None = None,
    flush_when_idle: bool = True,
) -> RunningUp:
    """``partitions``: kafka.topics.partitions (None: the embedded default);
    ``flush_when_idle``: processor's and sink's setting of that name."""
    ingest_port = free_port()
    config: dict[str, Any] = {
        "webhooks": [{"name": "soak", "public_keys": [public_key]}],
        "ingest": {"host": "127.0.0.1", "port": ingest_port},
        "embedded": {
            "kafka_port": 0,
            "clickhouse_http_port": 0,
            "broker_storage": broker_storage,
        },
        "logging": {"format": "json"},
    }
    if partitions is not None:
        config["kafka"] = {"topics": {"partitions": partitions}}
    if not flush_when_idle:
        config["processor"] = {"flush_when_idle": False}
        config["sink"] = {"flush_when_idle": False}
    config_file = directory / "sgpipe.yaml"
    config_file.write_text(yaml.safe_dump(config))
    log = directory / "up.log"
    data_dir = directory / "data"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "sgpipe.cli", "up", "--config", str(config_file)]
            + ["--data-dir", str(data_dir)],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    running = RunningUp(process, data_dir, ingest_port, log)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"sgpipe up exited at start:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{running.base_url}/readyz", timeout=2) as response:
                if response.status == 200 and (data_dir / "sgpipe-up.json").exists():
                    return running
        except (OSError, urllib.error.HTTPError):
            pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"sgpipe up not ready in {START_TIMEOUT} s:\n{log.read_text()[-3000:]}")


def clickhouse_url(data_dir: Path) -> str:
    state = json.loads((data_dir / "sgpipe-up.json").read_text())
    return str(state["clickhouse_url"])


def query(url: str, user: EmbeddedUser, sql: str) -> str:
    request = urllib.request.Request(
        url,
        data=sql.encode(),
        headers={"X-ClickHouse-User": user.name, "X-ClickHouse-Key": user.password},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        return str(response.read().decode())


def ack_latency_quantiles(metrics_text: str) -> dict[str, float]:
    """p50/p99 of the ingress's request duration, read off its histogram's buckets (the upper
    bound of the bucket that reaches the quantile)."""
    from prometheus_client.parser import text_string_to_metric_families

    buckets: list[tuple[float, float]] = []
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "sgpipe_ingest_request_duration_seconds":
            continue
        for sample in family.samples:
            if sample.name.endswith("_bucket") and sample.labels.get("webhook") == "soak":
                buckets.append((float(sample.labels["le"]), float(sample.value)))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return {}
    total = buckets[-1][1]
    result = {}
    for quantile in (0.5, 0.99):
        result[f"p{int(quantile * 100)}"] = next(
            bound for bound, count in buckets if count >= quantile * total
        )
    return result


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def stop_up(running: RunningUp, timeout: float = 180.0) -> tuple[int, float]:
    began = time.monotonic()
    running.process.send_signal(signal.SIGTERM)
    try:
        code = running.process.wait(timeout)
    except subprocess.TimeoutExpired:
        running.process.kill()
        code = running.process.wait()
    return code, time.monotonic() - began


# --- the soak ------------------------------------------------------------------------------


async def sample_tree(
    samples: TreeSamples, root: int, began: float, stop: asyncio.Event, interval: float
) -> None:
    while not stop.is_set():
        await asyncio.to_thread(samples.sample, root, time.monotonic() - began)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def soak(arguments: argparse.Namespace) -> None:
    print(f"sgpipe soak: {arguments.minutes} min at {arguments.rate:g} events/s", flush=True)
    broker_figures: list[Figures] = []
    if arguments.broker_messages:
        for label, settings in (
            ("memory", EmbeddedSettings(kafka_port=0, broker_storage="memory")),
            ("durable", EmbeddedSettings(kafka_port=0)),
        ):
            broker_figures.append(
                await measure(label, settings, arguments.broker_messages, arguments.broker_large)
            )

    key = generate_private_key()
    with tempfile.TemporaryDirectory(prefix="sgpipe-soak-") as directory:
        running = start_up(
            Path(directory),
            public_key_base64(key),
            broker_storage=arguments.broker_storage,
            partitions=arguments.partitions,
            flush_when_idle=not arguments.no_idle_flush,
        )
        try:
            url = clickhouse_url(running.data_dir)
            reader = load_credentials(running.data_dir).reader
            sampler = VisibilitySampler(url, reader)
            samples = TreeSamples()
            began = time.monotonic()
            stop_sampling, stop_tree = asyncio.Event(), asyncio.Event()
            tasks = [
                asyncio.create_task(sampler.run(stop_sampling)),
                asyncio.create_task(
                    sample_tree(samples, running.process.pid, began, stop_tree, arguments.rss_every)
                ),
            ]
            summary = await simulate(
                SimulationOptions(
                    url=f"{running.base_url}/webhooks/soak",
                    private_key=key,
                    events=None,
                    duration_seconds=arguments.minutes * 60,
                    rate=arguments.rate,
                    duplicates=arguments.duplicates,
                    concurrency=8,
                    seed=arguments.seed,
                    flush_interval_seconds=arguments.flush_interval,
                    max_batch_bytes=arguments.max_batch_bytes,
                    retry_for_seconds=600,
                ),
                on_acknowledged=sampler.on_acknowledged,
            )
            streamed = time.monotonic() - began
            stop_sampling.set()
            await asyncio.wait_for(tasks[0], DRAIN_TIMEOUT)
            drained = time.monotonic() - began
            stored, rows = await asyncio.to_thread(stored_events, url, reader)
            with urllib.request.urlopen(f"{running.base_url}/metrics", timeout=10) as response:
                ack = ack_latency_quantiles(response.read().decode())
            stop_tree.set()
            await tasks[1]
        finally:
            code, stop_seconds = stop_up(running)
    report(
        arguments,
        summary,
        sampler,
        samples,
        streamed=streamed,
        drained=drained,
        stored=stored,
        rows=rows,
        ack=ack,
        stop=(code, stop_seconds),
        broker_figures=broker_figures,
    )


def stored_events(url: str, reader: EmbeddedUser) -> tuple[set[str], int]:
    """(the distinct events stored, rows) through FINAL."""
    ids = query(
        url, reader, f"SELECT sg_event_id FROM {DATABASE}.email_events FINAL FORMAT TabSeparated"
    ).split()
    return set(ids), len(ids)


def report(
    arguments: argparse.Namespace,
    summary: SimulationSummary,
    sampler: VisibilitySampler,
    samples: TreeSamples,
    *,
    streamed: float,
    drained: float,
    stored: set[str],
    rows: int,
    ack: dict[str, float],
    stop: tuple[int, float],
    broker_figures: list[Figures],
) -> None:
    offered = arguments.rate
    acked_rate = summary.events_per_second
    print(f"\nstream: {streamed:.0f} s; every acknowledged event visible after {drained:.0f} s")
    print(
        f"throughput: offered {offered:g}/s, acknowledged {acked_rate:,.0f}/s "
        f"({acked_rate / offered:.2f}x offered, copies included), distinct events stored "
        f"{len(stored) / streamed:,.0f}/s over the stream ({summary.events} unique, "
        f"{summary.duplicate_events} copies)"
    )
    refused = {k: v for k, v in summary.responses.items() if not k.startswith("2")}
    print(
        f"the promise: {len(sampler.acknowledged)} unique events acknowledged, "
        f"{len(sampler.acknowledged - stored)} not stored, {rows - len(stored)} duplicates "
        f"through FINAL, {len(stored - sampler.acknowledged)} stored but never acknowledged; "
        f"refused answers: {refused or 'none'}"
    )
    if sampler.latencies:
        floor = statistics.median(sampler.round_trips)
        typical = statistics.median(sampler.latencies)
        cuts = ", ".join(
            f"p{p} {percentile(sampler.latencies, p) * 1000:,.0f} ms" for p in PERCENTILES
        )
        print(
            f"2xx -> visible in ClickHouse ({len(sampler.latencies)} samples): {cuts}, max "
            f"{max(sampler.latencies) * 1000:,.0f} ms; sampler floor (query round trip p50) "
            f"{floor * 1000:.1f} ms; p50 / floor {typical / floor:.0f}x"
        )
    if ack:
        print(
            "ingress acknowledgement (histogram bucket bounds): "
            + ", ".join(f"{name} <= {bound * 1000:g} ms" for name, bound in ack.items())
        )
    cpu = samples.cpu_by_label()
    total_cpu = sum(cpu.values())
    if summary.events_accepted:
        print(
            f"CPU: {total_cpu:.1f} s in the tree, "
            f"{total_cpu / (summary.events + summary.duplicate_events) * 1e6:.0f} µs per event "
            "posted (the simulator not included); "
            + ", ".join(f"{label} {seconds:.1f} s" for label, seconds in sorted(cpu.items()))
        )
    print_rss(samples, warmup_fraction=0.1)
    code, seconds = stop
    print(f"stop: SIGTERM -> exit {code} in {seconds:.1f} s")
    figures = list(broker_figures)
    if len(figures) == 2:
        memory, durable = figures
        print(
            f"broker (bench/broker.py, {arguments.broker_messages} x 1 KB acks=all): durable "
            f"{durable.small_produce_per_second:,.0f} msg/s vs memory "
            f"{memory.small_produce_per_second:,.0f} msg/s "
            f"({durable.small_produce_per_second / memory.small_produce_per_second:.2f}x); "
            f"768 KB {durable.large_produce_per_second:.0f} vs "
            f"{memory.large_produce_per_second:.0f} msg/s "
            f"({durable.large_produce_per_second / memory.large_produce_per_second:.2f}x)"
        )


def print_rss(samples: TreeSamples, warmup_fraction: float) -> None:
    if not samples.rss:
        return
    count = len(samples.rss)
    points = sorted({0, count // 4, count // 2, 3 * count // 4, count - 1})
    warm = min(count - 1, max(0, int(count * warmup_fraction)))
    header = "".join(f"{samples.times[i]:>8.0f}s" for i in points)
    print(f"RSS (MiB) over time{'':14}{header}   end/warm-up")
    for label in samples.labels():
        values = [samples.rss[i].get(label) for i in points]
        cells = "".join(f"{value:>9.0f}" if value is not None else f"{'-':>9}" for value in values)
        first = samples.rss[warm].get(label)
        last = samples.rss[-1].get(label)
        ratio = f"{last / first:.2f}x" if first and last else "-"
        print(f"  {label:31}{cells}   {ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=2.0)
    parser.add_argument("--rate", type=float, default=500.0, help="events per second")
    parser.add_argument("--duplicates", type=float, default=0.05)
    parser.add_argument("--flush-interval", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--rss-every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--broker-messages",
        type=int,
        default=20_000,
        help="1 KB messages for the broker comparison (0: skip it)",
    )
    parser.add_argument("--broker-large", type=int, default=20)
    parser.add_argument(
        "--max-batch-bytes",
        type=int,
        default=SENDGRID_MAX_BATCH_BYTES,
        help="largest POST body (2048: SendGrid's small batches)",
    )
    parser.add_argument("--broker-storage", choices=["durable", "memory"], default="durable")
    parser.add_argument(
        "--partitions", type=int, help="kafka.topics.partitions (default: the embedded default)"
    )
    parser.add_argument(
        "--no-idle-flush",
        action="store_true",
        help="processor and sink flush_when_idle: false (batches wait out batch_max_seconds)",
    )
    asyncio.run(soak(parser.parse_args()))


if __name__ == "__main__":
    main()
