-- Daily aggregates that never double-count. SendGrid redelivers events (minutes or hours
-- later, in other batches), and a materialized view sees every copy: a count() or a
-- SummingMergeTree would count each copy. So every count here is the set of distinct
-- sg_event_ids (uniqExact states, 128-bit hashes of the ids): adding a copy, or the same rows
-- twice, leaves the set unchanged, however the copies arrive or merge. Merging states across
-- rows (uniqExactMerge over any grouping, across categories or webhooks too) stays exact.
--
-- Each aggregate: a state table (AggregatingMergeTree), a materialized view that feeds it from
-- every insert into email_events, a backfill from the rows already stored (safe to overlap
-- with the view and to re-run: the states are idempotent), and a view with plain numbers for
-- BI tools. Days are UTC (toDate of event_time). No personal data: no address, no IP.

-- Per day, webhook, event type and category (an event with several categories counts once in
-- each; one without any under ''). messages: distinct sg_message_ids (e.g. unique opens).
CREATE TABLE IF NOT EXISTS {database}.daily_event_counts_state{local} {on_cluster}
(
    day      Date,
    webhook  LowCardinality(String),
    event    LowCardinality(String),
    category LowCardinality(String),
    events   AggregateFunction(uniqExact, String),
    messages AggregateFunction(uniqExact, Nullable(String))
)
ENGINE = {replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, webhook, event, category)
SETTINGS non_replicated_deduplication_window = 1000;

-- cluster-only: each shard aggregates its own rows; readers merge the shards' states.
CREATE TABLE IF NOT EXISTS {database}.daily_event_counts_state {on_cluster}
AS {database}.daily_event_counts_state_local
ENGINE = Distributed({cluster}, {database}, daily_event_counts_state_local, rand());

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.daily_event_counts_mv {on_cluster}
TO {database}.daily_event_counts_state{local} AS
SELECT
    toDate(event_time) AS day,
    webhook,
    event,
    arrayJoin(if(empty(category), [''], category)) AS category,
    uniqExactState(sg_event_id) AS events,
    uniqExactState(sg_message_id) AS messages
FROM {database}.email_events{local}
GROUP BY day, webhook, event, category;

INSERT INTO {database}.daily_event_counts_state (day, webhook, event, category, events, messages)
SELECT
    toDate(event_time) AS day,
    webhook,
    event,
    arrayJoin(if(empty(category), [''], category)) AS category,
    uniqExactState(sg_event_id) AS events,
    uniqExactState(sg_message_id) AS messages
FROM {database}.email_events
GROUP BY day, webhook, event, category;

CREATE OR REPLACE VIEW {database}.daily_event_counts {on_cluster} AS
SELECT day, webhook, event, category,
       uniqExactMerge(events) AS events, uniqExactMerge(messages) AS messages
FROM {database}.daily_event_counts_state
GROUP BY day, webhook, event, category;

-- Per day, webhook, event type and recipient domain (lower-cased, from the address; '' when
-- there is none). With pii.email: hash the domain is kept, so this still works.
CREATE TABLE IF NOT EXISTS {database}.daily_domain_counts_state{local} {on_cluster}
(
    day              Date,
    webhook          LowCardinality(String),
    event            LowCardinality(String),
    recipient_domain LowCardinality(String),
    events           AggregateFunction(uniqExact, String)
)
ENGINE = {replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, webhook, event, recipient_domain)
SETTINGS non_replicated_deduplication_window = 1000;

-- cluster-only: see daily_event_counts_state.
CREATE TABLE IF NOT EXISTS {database}.daily_domain_counts_state {on_cluster}
AS {database}.daily_domain_counts_state_local
ENGINE = Distributed({cluster}, {database}, daily_domain_counts_state_local, rand());

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.daily_domain_counts_mv {on_cluster}
TO {database}.daily_domain_counts_state{local} AS
SELECT
    toDate(event_time) AS day,
    webhook,
    event,
    lower(extract(ifNull(email, ''), '@([^@]+)$')) AS recipient_domain,
    uniqExactState(sg_event_id) AS events
FROM {database}.email_events{local}
GROUP BY day, webhook, event, recipient_domain;

INSERT INTO {database}.daily_domain_counts_state (day, webhook, event, recipient_domain, events)
SELECT
    toDate(event_time) AS day,
    webhook,
    event,
    lower(extract(ifNull(email, ''), '@([^@]+)$')) AS recipient_domain,
    uniqExactState(sg_event_id) AS events
FROM {database}.email_events
GROUP BY day, webhook, event, recipient_domain;

CREATE OR REPLACE VIEW {database}.daily_domain_counts {on_cluster} AS
SELECT day, webhook, event, recipient_domain, uniqExactMerge(events) AS events
FROM {database}.daily_domain_counts_state
GROUP BY day, webhook, event, recipient_domain;

-- Per day, webhook, event type and dynamic template (events that name a template).
CREATE TABLE IF NOT EXISTS {database}.daily_template_counts_state{local} {on_cluster}
(
    day              Date,
    webhook          LowCardinality(String),
    event            LowCardinality(String),
    sg_template_id   LowCardinality(String),
    sg_template_name LowCardinality(String),
    events           AggregateFunction(uniqExact, String),
    messages         AggregateFunction(uniqExact, Nullable(String))
)
ENGINE = {replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, webhook, event, sg_template_id, sg_template_name)
SETTINGS non_replicated_deduplication_window = 1000;

-- cluster-only: see daily_event_counts_state.
CREATE TABLE IF NOT EXISTS {database}.daily_template_counts_state {on_cluster}
AS {database}.daily_template_counts_state_local
ENGINE = Distributed({cluster}, {database}, daily_template_counts_state_local, rand());

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.daily_template_counts_mv {on_cluster}
TO {database}.daily_template_counts_state{local} AS
SELECT
    toDate(event_time) AS day,
    webhook,
    event,
    sg_template_id,
    sg_template_name,
    uniqExactState(sg_event_id) AS events,
    uniqExactState(sg_message_id) AS messages
FROM {database}.email_events{local}
WHERE sg_template_id != '' OR sg_template_name != ''
GROUP BY day, webhook, event, sg_template_id, sg_template_name;

INSERT INTO {database}.daily_template_counts_state
    (day, webhook, event, sg_template_id, sg_template_name, events, messages)
SELECT
    toDate(event_time) AS day,
    webhook,
    event,
    sg_template_id,
    sg_template_name,
    uniqExactState(sg_event_id) AS events,
    uniqExactState(sg_message_id) AS messages
FROM {database}.email_events
WHERE sg_template_id != '' OR sg_template_name != ''
GROUP BY day, webhook, event, sg_template_id, sg_template_name;

CREATE OR REPLACE VIEW {database}.daily_template_counts {on_cluster} AS
SELECT day, webhook, event, sg_template_id, sg_template_name,
       uniqExactMerge(events) AS events, uniqExactMerge(messages) AS messages
FROM {database}.daily_template_counts_state
GROUP BY day, webhook, event, sg_template_id, sg_template_name;

-- Per day, webhook, event type and Marketing Campaign / Single Send (events that name one).
CREATE TABLE IF NOT EXISTS {database}.daily_campaign_counts_state{local} {on_cluster}
(
    day                     Date,
    webhook                 LowCardinality(String),
    event                   LowCardinality(String),
    marketing_campaign_id   LowCardinality(String),
    marketing_campaign_name LowCardinality(String),
    singlesend_id           LowCardinality(String),
    singlesend_name         LowCardinality(String),
    events                  AggregateFunction(uniqExact, String),
    messages                AggregateFunction(uniqExact, Nullable(String))
)
ENGINE = {replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, webhook, event, marketing_campaign_id, marketing_campaign_name, singlesend_id, singlesend_name)
SETTINGS non_replicated_deduplication_window = 1000;

-- cluster-only: see daily_event_counts_state.
CREATE TABLE IF NOT EXISTS {database}.daily_campaign_counts_state {on_cluster}
AS {database}.daily_campaign_counts_state_local
ENGINE = Distributed({cluster}, {database}, daily_campaign_counts_state_local, rand());

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.daily_campaign_counts_mv {on_cluster}
TO {database}.daily_campaign_counts_state{local} AS
SELECT
    toDate(event_time) AS day,
    webhook,
    event,
    marketing_campaign_id,
    marketing_campaign_name,
    singlesend_id,
    singlesend_name,
    uniqExactState(sg_event_id) AS events,
    uniqExactState(sg_message_id) AS messages
FROM {database}.email_events{local}
WHERE marketing_campaign_id != '' OR marketing_campaign_name != '' OR singlesend_id != ''
GROUP BY day, webhook, event, marketing_campaign_id, marketing_campaign_name, singlesend_id, singlesend_name;

INSERT INTO {database}.daily_campaign_counts_state
    (day, webhook, event, marketing_campaign_id, marketing_campaign_name, singlesend_id,
     singlesend_name, events, messages)
SELECT
    toDate(event_time) AS day,
    webhook,
    event,
    marketing_campaign_id,
    marketing_campaign_name,
    singlesend_id,
    singlesend_name,
    uniqExactState(sg_event_id) AS events,
    uniqExactState(sg_message_id) AS messages
FROM {database}.email_events
WHERE marketing_campaign_id != '' OR marketing_campaign_name != '' OR singlesend_id != ''
GROUP BY day, webhook, event, marketing_campaign_id, marketing_campaign_name, singlesend_id, singlesend_name;

CREATE OR REPLACE VIEW {database}.daily_campaign_counts {on_cluster} AS
SELECT day, webhook, event, marketing_campaign_id, marketing_campaign_name, singlesend_id,
       singlesend_name, uniqExactMerge(events) AS events, uniqExactMerge(messages) AS messages
FROM {database}.daily_campaign_counts_state
GROUP BY day, webhook, event, marketing_campaign_id, marketing_campaign_name, singlesend_id, singlesend_name;

-- Bounces per day, webhook, type (bounce or blocked), classification and recipient domain.
CREATE TABLE IF NOT EXISTS {database}.daily_bounce_counts_state{local} {on_cluster}
(
    day                   Date,
    webhook               LowCardinality(String),
    type                  LowCardinality(String),
    bounce_classification LowCardinality(String),
    recipient_domain      LowCardinality(String),
    events                AggregateFunction(uniqExact, String)
)
ENGINE = {replicated}AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (day, webhook, type, bounce_classification, recipient_domain)
SETTINGS non_replicated_deduplication_window = 1000;

-- cluster-only: see daily_event_counts_state.
CREATE TABLE IF NOT EXISTS {database}.daily_bounce_counts_state {on_cluster}
AS {database}.daily_bounce_counts_state_local
ENGINE = Distributed({cluster}, {database}, daily_bounce_counts_state_local, rand());

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.daily_bounce_counts_mv {on_cluster}
TO {database}.daily_bounce_counts_state{local} AS
SELECT
    toDate(event_time) AS day,
    webhook,
    type,
    bounce_classification,
    lower(extract(ifNull(email, ''), '@([^@]+)$')) AS recipient_domain,
    uniqExactState(sg_event_id) AS events
FROM {database}.email_events{local}
WHERE event = 'bounce'
GROUP BY day, webhook, type, bounce_classification, recipient_domain;

INSERT INTO {database}.daily_bounce_counts_state
    (day, webhook, type, bounce_classification, recipient_domain, events)
SELECT
    toDate(event_time) AS day,
    webhook,
    type,
    bounce_classification,
    lower(extract(ifNull(email, ''), '@([^@]+)$')) AS recipient_domain,
    uniqExactState(sg_event_id) AS events
FROM {database}.email_events
WHERE event = 'bounce'
GROUP BY day, webhook, type, bounce_classification, recipient_domain;

CREATE OR REPLACE VIEW {database}.daily_bounce_counts {on_cluster} AS
SELECT day, webhook, type, bounce_classification, recipient_domain,
       uniqExactMerge(events) AS events
FROM {database}.daily_bounce_counts_state
GROUP BY day, webhook, type, bounce_classification, recipient_domain;
