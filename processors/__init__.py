"""Raw batch -> normalized, deduplicated Avro email events (pure steps + a small worker loop)."""
