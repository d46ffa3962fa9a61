-- dead_letters (0003) joins the BI schema's guarantees:
-- - the dead-letter sink's inserts carry the same deduplication token as the event sink's
--   (the Kafka offsets of its batch), so a retried insert is stored once;
-- - clickhouse.retention_days applies to it too (its payload holds the original bytes,
--   personal data included): sgpipe sets its TTL on dead_lettered_at.
ALTER TABLE {database}.dead_letters{local} {on_cluster}
    MODIFY SETTING non_replicated_deduplication_window = 1000;
