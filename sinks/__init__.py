"""Normalized events -> ClickHouse, in batches, committing offsets only after the insert."""
