"""bench/e2e.py's arithmetic: the figures it prints are only as good as these."""

from __future__ import annotations

from bench.e2e import millis, peak_rss, ratio
from bench.soak import TreeSamples


def test_peak_rss_is_each_process_largest_sample() -> None:
    samples = TreeSamples(
        times=[0.0, 1.0, 2.0],
        rss=[{"ingest": 50.0, "sink": 80.0}, {"ingest": 70.0}, {"ingest": 60.0, "sink": 90.0}],
    )
    assert peak_rss(samples) == {"ingest": 70.0, "sink": 90.0}


def test_latency_percentiles_are_in_milliseconds() -> None:
    latencies = [0.010, 0.020, 0.030, 0.040, 1.000]
    assert millis(latencies, 50) == 30.0
    assert millis(latencies, 100) == 1000.0
    assert millis([], 99) is None


def test_ratios_are_against_the_baseline() -> None:
    assert ratio(250.0, 1000.0) == "0.250x"
    assert ratio(5.0, 0.0) == "n/a"
