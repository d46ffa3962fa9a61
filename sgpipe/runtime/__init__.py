"""The stage runtime: everything below the stages and above the schemas.

Settings and logging set-up, Kafka and ClickHouse client plumbing, the consume -> steps ->
write -> commit loop, error classification, dead letters and their limits, metrics and the
health server. Nothing here imports a stage (``ingest``, ``processors``, ``sinks``) or the
shell (``sgpipe.cli``, ``sgpipe.up``, ``sgpipe.embedded``).
"""
