"""sgpipe runtime shared by every stage: settings, logging, Kafka plumbing and the CLI."""
