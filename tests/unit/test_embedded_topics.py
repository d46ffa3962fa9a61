"""The embedded broker's topic partitions: 2 unless `kafka.topics.partitions` is configured
(issue 16: small batches spread over 6 partitions cost the durable broker ~3x the storage work)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgpipe.embedded.topics import EMBEDDED_TOPIC_PARTITIONS, embedded_topics
from sgpipe.runtime.settings import load_settings


def test_unconfigured_partitions_are_the_embedded_default(tmp_path: Path) -> None:
    config = tmp_path / "sgpipe.yaml"
    config.write_text("kafka:\n  topics:\n    raw: my.raw\n")
    topics = load_settings(config, {}).kafka.topics
    assert topics.partitions == 6  # an external Kafka's default is unchanged
    embedded = embedded_topics(topics)
    assert embedded.partitions == EMBEDDED_TOPIC_PARTITIONS == 2
    assert embedded.raw == "my.raw"


@pytest.mark.parametrize(
    ("config_text", "environ"),
    [
        ("kafka:\n  topics:\n    partitions: 6\n", {}),
        ("", {"SGPIPE_KAFKA__TOPICS__PARTITIONS": "6"}),
    ],
)
def test_configured_partitions_are_kept(
    tmp_path: Path, config_text: str, environ: dict[str, str]
) -> None:
    config = tmp_path / "sgpipe.yaml"
    config.write_text(config_text)
    assert embedded_topics(load_settings(config, environ).kafka.topics).partitions == 6
