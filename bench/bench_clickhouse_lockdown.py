"""What the embedded ClickHouse's lockdown costs a request, as ratios measured in one run.

Over HTTP with a keep-alive clickhouse-connect client (the sink's and `sgpipe query`'s path):

- a small query (`SELECT count() FROM t`) as the writer, against the same request with the
  statement check switched off (the client's text runs as it came, no syntax tree); once
  repeated (the parse is cached by statement text) and once with a new text each time;
- a 20,000-row insert (the sink's batch size), checked vs unchecked;
- the reader's small query (its `SET readonly = 2` added) against the writer's.

Run: ``.venv/bin/python -m bench.bench_clickhouse_lockdown``. Prints figures; asserts nothing
about time.
"""

from __future__ import annotations

import pathlib
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from typing import Any

import sgpipe.embedded.clickhouse as embedded
from sgpipe.embedded.clickhouse_policy import Statement, StatementPolicy
from tests.integration.clickhouse_server import Served, serve

QUERIES = 300
ROWS = 20_000


def best_of(function: Callable[[], object], repeat: int = 5) -> float:
    timings = []
    for _ in range(repeat):
        started = time.perf_counter()
        function()
        timings.append(time.perf_counter() - started)
    return min(timings)


@contextmanager
def statement_check_off() -> Iterator[None]:
    """The baseline: the client's text runs as it came, without the engine's parse."""
    checked = embedded._checked_statement
    checked_head = embedded._checked_insert_head

    def unchecked(conn: Any, sql: str, policy: StatementPolicy, **_: Any) -> Statement:
        # The bench's statements are all SELECTs.
        return Statement("SelectWithUnionQuery", sql, {"type": "SelectWithUnionQuery"})

    def unchecked_head(conn: Any, sql: str, fmt: str, policy: StatementPolicy, **_: Any) -> str:
        return sql

    embedded._checked_statement = unchecked
    embedded._checked_insert_head = unchecked_head
    try:
        yield
    finally:
        embedded._checked_statement = checked
        embedded._checked_insert_head = checked_head


def measure(served: Served) -> dict[str, float]:
    rows = [[f"id-{i}", i % 7] for i in range(ROWS)]
    with closing(served.client()) as writer, closing(served.client(served.reader)) as reader:
        writer.command("CREATE TABLE t (id String, n UInt8) ENGINE = MergeTree ORDER BY id")

        def queries(client: Any) -> Callable[[], None]:
            def run() -> None:
                for _ in range(QUERIES):
                    client.command("SELECT count() FROM t")

            return run

        counter = iter(range(10**9))

        def distinct_queries() -> None:
            # A new text each time: the engine's parse is not cached.
            for _ in range(QUERIES):
                writer.command(f"SELECT count() FROM t WHERE n != {next(counter) + 100}")

        def insert() -> None:
            writer.insert("t", rows, column_names=["id", "n"])

        return {
            "query_writer": best_of(queries(writer)) / QUERIES,
            "query_reader": best_of(queries(reader)) / QUERIES,
            "query_distinct": best_of(distinct_queries) / QUERIES,
            "insert": best_of(insert),
        }


def main() -> None:
    # Checked and unchecked rounds alternate, each figure is the best of its rounds: merges
    # and caches warming up must not favour either side.
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as directory, serve(pathlib.Path(directory)) as served:
        for _ in range(3):
            for check in (False, True):
                if check:
                    results[check].append(measure(served))
                else:
                    with statement_check_off():
                        results[check].append(measure(served))
                with closing(served.client()) as client:
                    client.command("DROP TABLE t")
    checked = {key: min(r[key] for r in results[True]) for key in results[True][0]}
    unchecked = {key: min(r[key] for r in results[False]) for key in results[False][0]}
    print(f"{'figure':<44}{'time':>11}{'ratio':>8}  baseline")
    figures = [
        ("small query, writer (checked)", checked["query_writer"], unchecked["query_writer"]),
        ("small query, reader (checked)", checked["query_reader"], unchecked["query_writer"]),
        (
            "new statement text each time (checked)",
            checked["query_distinct"],
            unchecked["query_distinct"],
        ),
        (f"insert {ROWS:,} rows, writer (checked)", checked["insert"], unchecked["insert"]),
    ]
    for name, measured, baseline in figures:
        print(f"{name:<44}{measured * 1e3:>9.2f}ms{measured / baseline:>7.2f}x  unchecked writer")
    added = checked["query_writer"] - unchecked["query_writer"]
    print(f"statement check adds {added * 1e3:.2f} ms per repeated query (parse cached)")
    added = checked["query_distinct"] - unchecked["query_distinct"]
    print(f"statement check adds {added * 1e3:.2f} ms per new statement (engine parse)")


if __name__ == "__main__":
    main()
