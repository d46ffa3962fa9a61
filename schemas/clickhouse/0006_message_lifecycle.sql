-- The lifecycle of each message (sg_message_id): when it was processed, deferred, delivered,
-- bounced, dropped, first opened and clicked; its last state; bounce type and classification;
-- how many distinct deferrals, opens and clicks.
--
-- Correct whatever order the events arrive in, and however often: every column is an
-- aggregate that does not care about order or repetition -- min/max of times, max of
-- (time, stage rank, event) tuples (a total order, so ties of SendGrid's one-second timestamps
-- resolve the same way every time: delivered beats deferred beats processed), and uniqExact
-- sets of sg_event_ids for the counts. A message's events may be spread over many rows (one per
-- insert, and per month); readers merge them with GROUP BY sg_message_id (the view below).
-- Events without sg_message_id (asynchronous bounces, account status changes) have no row.
-- Holds the recipient's address (personal data): `sgpipe forget` deletes from it, and
-- clickhouse.retention_days applies (by the month of a row's last event).
CREATE TABLE IF NOT EXISTS {database}.message_lifecycle_state{local} {on_cluster}
(
    sg_message_id         String,
    webhook               SimpleAggregateFunction(max, LowCardinality(String)),
    email                 SimpleAggregateFunction(max, Nullable(String)),
    sg_template_id        SimpleAggregateFunction(max, LowCardinality(String)),
    marketing_campaign_id SimpleAggregateFunction(max, LowCardinality(String)),
    singlesend_id         SimpleAggregateFunction(max, LowCardinality(String)),
    first_event_at        SimpleAggregateFunction(min, DateTime64(3, 'UTC')),
    last_event_at         SimpleAggregateFunction(max, DateTime64(3, 'UTC')),
    processed_at          SimpleAggregateFunction(min, Nullable(DateTime64(3, 'UTC'))),
    first_deferred_at     SimpleAggregateFunction(min, Nullable(DateTime64(3, 'UTC'))),
    delivered_at          SimpleAggregateFunction(min, Nullable(DateTime64(3, 'UTC'))),
    bounced_at            SimpleAggregateFunction(min, Nullable(DateTime64(3, 'UTC'))),
    dropped_at            SimpleAggregateFunction(min, Nullable(DateTime64(3, 'UTC'))),
    first_open_at         SimpleAggregateFunction(min, Nullable(DateTime64(3, 'UTC'))),
    first_click_at        SimpleAggregateFunction(min, Nullable(DateTime64(3, 'UTC'))),
    -- (event_time, rank, event): the latest event; of the deliverability events; the latest
    -- bounce's (event_time, type, bounce_classification). (1970, 0, '') when there was none.
    last_event            SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), UInt8, String)),
    delivery_event        SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), UInt8, String)),
    bounce                SimpleAggregateFunction(max, Tuple(DateTime64(3, 'UTC'), String, String)),
    deferrals             AggregateFunction(uniqExact, String),
    opens                 AggregateFunction(uniqExact, String),
    machine_opens         AggregateFunction(uniqExact, String),
    clicks                AggregateFunction(uniqExact, String),
    INDEX email_bloom email TYPE bloom_filter(0.01) GRANULARITY 1
)
ENGINE = {replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(last_event_at)
ORDER BY sg_message_id
SETTINGS non_replicated_deduplication_window = 1000, ttl_only_drop_parts = 1;

-- cluster-only: rows of a message live on the shard of its events (email_events shards by
-- message); readers merge across shards anyway.
CREATE TABLE IF NOT EXISTS {database}.message_lifecycle_state {on_cluster}
AS {database}.message_lifecycle_state_local
ENGINE = Distributed({cluster}, {database}, message_lifecycle_state_local, cityHash64(sg_message_id));

-- `sg_message_id != ''` also holds if ClickHouse reads it as the alias (ifNull(...) != '').
CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.message_lifecycle_mv {on_cluster}
TO {database}.message_lifecycle_state{local} AS
SELECT
    ifNull(sg_message_id, '') AS sg_message_id,
    max(webhook) AS webhook,
    max(email) AS email,
    max(sg_template_id) AS sg_template_id,
    max(marketing_campaign_id) AS marketing_campaign_id,
    max(singlesend_id) AS singlesend_id,
    min(event_time) AS first_event_at,
    max(event_time) AS last_event_at,
    minIfOrNull(event_time, event = 'processed') AS processed_at,
    minIfOrNull(event_time, event = 'deferred') AS first_deferred_at,
    minIfOrNull(event_time, event = 'delivered') AS delivered_at,
    minIfOrNull(event_time, event = 'bounce') AS bounced_at,
    minIfOrNull(event_time, event = 'dropped') AS dropped_at,
    minIfOrNull(event_time, event = 'open') AS first_open_at,
    minIfOrNull(event_time, event = 'click') AS first_click_at,
    max((event_time, multiIf(event = 'processed', 1, event = 'deferred', 2, event = 'delivered', 3, event IN ('bounce', 'dropped'), 4, event = 'open', 5, event = 'click', 6, event IN ('spamreport', 'unsubscribe', 'group_unsubscribe'), 7, event = 'group_resubscribe', 8, 0), toString(event))) AS last_event,
    maxIf((event_time, multiIf(event = 'processed', 1, event = 'deferred', 2, event = 'delivered', 3, 4), toString(event)), event IN ('processed', 'deferred', 'delivered', 'bounce', 'dropped')) AS delivery_event,
    maxIf((event_time, toString(type), toString(bounce_classification)), event = 'bounce') AS bounce,
    uniqExactStateIf(sg_event_id, event = 'deferred') AS deferrals,
    uniqExactStateIf(sg_event_id, event = 'open') AS opens,
    uniqExactStateIf(sg_event_id, event = 'open' AND ifNull(sg_machine_open, false)) AS machine_opens,
    uniqExactStateIf(sg_event_id, event = 'click') AS clicks
FROM {database}.email_events{local}
WHERE sg_message_id != ''
GROUP BY sg_message_id;

INSERT INTO {database}.message_lifecycle_state
    (sg_message_id, webhook, email, sg_template_id, marketing_campaign_id, singlesend_id,
     first_event_at, last_event_at, processed_at, first_deferred_at, delivered_at, bounced_at,
     dropped_at, first_open_at, first_click_at, last_event, delivery_event, bounce, deferrals,
     opens, machine_opens, clicks)
SELECT
    ifNull(sg_message_id, '') AS sg_message_id,
    max(webhook) AS webhook,
    max(email) AS email,
    max(sg_template_id) AS sg_template_id,
    max(marketing_campaign_id) AS marketing_campaign_id,
    max(singlesend_id) AS singlesend_id,
    min(event_time) AS first_event_at,
    max(event_time) AS last_event_at,
    minIfOrNull(event_time, event = 'processed') AS processed_at,
    minIfOrNull(event_time, event = 'deferred') AS first_deferred_at,
    minIfOrNull(event_time, event = 'delivered') AS delivered_at,
    minIfOrNull(event_time, event = 'bounce') AS bounced_at,
    minIfOrNull(event_time, event = 'dropped') AS dropped_at,
    minIfOrNull(event_time, event = 'open') AS first_open_at,
    minIfOrNull(event_time, event = 'click') AS first_click_at,
    max((event_time, multiIf(event = 'processed', 1, event = 'deferred', 2, event = 'delivered', 3, event IN ('bounce', 'dropped'), 4, event = 'open', 5, event = 'click', 6, event IN ('spamreport', 'unsubscribe', 'group_unsubscribe'), 7, event = 'group_resubscribe', 8, 0), toString(event))) AS last_event,
    maxIf((event_time, multiIf(event = 'processed', 1, event = 'deferred', 2, event = 'delivered', 3, 4), toString(event)), event IN ('processed', 'deferred', 'delivered', 'bounce', 'dropped')) AS delivery_event,
    maxIf((event_time, toString(type), toString(bounce_classification)), event = 'bounce') AS bounce,
    uniqExactStateIf(sg_event_id, event = 'deferred') AS deferrals,
    uniqExactStateIf(sg_event_id, event = 'open') AS opens,
    uniqExactStateIf(sg_event_id, event = 'open' AND ifNull(sg_machine_open, false)) AS machine_opens,
    uniqExactStateIf(sg_event_id, event = 'click') AS clicks
FROM {database}.email_events
WHERE sg_message_id != ''
GROUP BY sg_message_id;

-- One row per message, in plain values. last_event, delivery_status: the event type;
-- NULL/0 where nothing happened.
CREATE OR REPLACE VIEW {database}.message_lifecycle {on_cluster} AS
SELECT
    sg_message_id,
    max(webhook) AS webhook,
    max(email) AS email,
    max(sg_template_id) AS sg_template_id,
    max(marketing_campaign_id) AS marketing_campaign_id,
    max(singlesend_id) AS singlesend_id,
    min(first_event_at) AS first_event_at,
    max(last_event_at) AS last_event_at,
    min(processed_at) AS processed_at,
    min(first_deferred_at) AS first_deferred_at,
    min(delivered_at) AS delivered_at,
    min(bounced_at) AS bounced_at,
    min(dropped_at) AS dropped_at,
    min(first_open_at) AS first_open_at,
    min(first_click_at) AS first_click_at,
    tupleElement(max(last_event), 3) AS last_event,
    nullIf(tupleElement(max(delivery_event), 3), '') AS delivery_status,
    nullIf(tupleElement(max(bounce), 2), '') AS bounce_type,
    nullIf(tupleElement(max(bounce), 3), '') AS bounce_classification,
    uniqExactMerge(deferrals) AS deferrals,
    uniqExactMerge(opens) AS opens,
    uniqExactMerge(machine_opens) AS machine_opens,
    uniqExactMerge(clicks) AS clicks
FROM {database}.message_lifecycle_state
GROUP BY sg_message_id;
