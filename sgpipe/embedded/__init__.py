"""Embedded single-machine stand-ins for Kafka and ClickHouse used by `sgpipe up`."""
