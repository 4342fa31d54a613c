-- Ingest v2: the ingest transaction writes only what exactly-once needs — dedup keys, raw rows
-- (with their ingest batch and amounts per class), one fold_queue row per batch — plus the
-- quota counters and Kafka positions that must be exact before the answer. Every rollup is
-- folded from committed batches afterwards, exactly once, by the folder of any replica
-- (src/fold): it claims queue rows FOR UPDATE SKIP LOCKED, adds their raw rows to the rollups
-- and deletes the queue rows in one transaction.
--
-- Existing data: raw rows ingested before have no batch (NULL) and are counted in the
-- rollups already. The per-transaction hourly rollup they were counted in becomes the frozen
-- usage_rollups_v1, read only for those events' per-transaction figures (a transaction's usage
-- by state, its spend per model, usage reports by transaction); the new usage_rollups is v1
-- added up without the transaction. Nothing is counted twice or lost; ingest must be stopped
-- while this runs (README, "Upgrading").

-- Retention finds a month's keys through the rows of its partition (store::retention), so the
-- key table needs no index by time: 2–3 µs of Postgres CPU per event on the hot path.
DROP INDEX usage_event_keys_by_time;

CREATE SEQUENCE ingest_batches AS bigint;

ALTER TABLE usage_events
    ADD COLUMN ingest_batch bigint,
    -- What each priced class billed and cost (NULL: no tokens, or no rate: unpriced); the
    -- folder adds them into the per-class rollup. Totals stay in billed_amount / cost_amount.
    ADD COLUMN billed_input numeric, ADD COLUMN cost_input numeric,
    ADD COLUMN billed_cache_read numeric, ADD COLUMN cost_cache_read numeric,
    ADD COLUMN billed_cache_write_5m numeric, ADD COLUMN cost_cache_write_5m numeric,
    ADD COLUMN billed_cache_write_1h numeric, ADD COLUMN cost_cache_write_1h numeric,
    ADD COLUMN billed_output numeric, ADD COLUMN cost_output numeric,
    ADD COLUMN billed_reasoning numeric, ADD COLUMN cost_reasoning numeric,
    ADD COLUMN billed_input_audio numeric, ADD COLUMN cost_input_audio numeric,
    ADD COLUMN billed_output_audio numeric, ADD COLUMN cost_output_audio numeric,
    ADD COLUMN billed_input_image numeric, ADD COLUMN cost_input_image numeric,
    ADD COLUMN billed_output_image numeric, ADD COLUMN cost_output_image numeric,
    ADD COLUMN billed_cache_write_30m numeric, ADD COLUMN cost_cache_write_30m numeric,
    ADD COLUMN billed_cache_write_12h numeric, ADD COLUMN cost_cache_write_12h numeric;

-- The folder finds a window's raw rows by batch: batches are numbered in commit-ish order and
-- appended, so a BRIN index is a few pages per partition (the folder summarizes new ranges
-- before each fold; unsummarized ranges would make it scan them all).
CREATE INDEX usage_events_by_ingest_batch ON usage_events USING brin (ingest_batch)
    WITH (pages_per_range = 32);
-- A transaction's raw rows: its usage by state, its spend per model, reports by transaction.
CREATE INDEX usage_events_by_transaction ON usage_events (tenant_id, transaction_id)
    WHERE transaction_id IS NOT NULL;

-- One row per committed ingest batch whose raw rows are not folded yet: queued in the batch's
-- transaction, deleted in the fold's. Its tenants (sorted) are the ones the fold locks; its
-- event-time range tells readers (invoices, retention) which periods it touches.
CREATE TABLE fold_queue (
    ingest_batch      bigint PRIMARY KEY,
    tenants           text[] NOT NULL,
    events            integer NOT NULL CHECK (events > 0),
    first_occurred_at timestamptz NOT NULL,
    last_occurred_at  timestamptz NOT NULL,
    queued_at         timestamptz NOT NULL DEFAULT now()
);

-- The per-transaction rollup, frozen: events ingested from now on are folded into the
-- coarse rollup below, and their per-transaction figures are read from raw rows.
ALTER TABLE usage_rollups RENAME TO usage_rollups_v1;
ALTER INDEX usage_rollups_pkey RENAME TO usage_rollups_v1_pkey;

-- Hourly usage without the transaction: what reports and invoices read. Same columns and
-- meaning as before (each event counts once in `events`, on its first class with tokens).
CREATE TABLE usage_rollups (
    tenant_id             text COLLATE "C" NOT NULL,
    hour                  timestamptz NOT NULL,
    agent_id              text COLLATE "C" NOT NULL,
    service               text COLLATE "C" NOT NULL,
    provider              text COLLATE "C" NOT NULL,
    model                 text COLLATE "C" NOT NULL,
    token_class           smallint NOT NULL CHECK (token_class BETWEEN 1 AND 12),
    currency              text COLLATE "C" NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    tokens                bigint NOT NULL,
    billed_amount         numeric NOT NULL,
    cost_amount           numeric NOT NULL,
    unpriced_tokens       bigint NOT NULL,
    class_events          bigint NOT NULL,
    class_unpriced_events bigint NOT NULL,
    events                bigint NOT NULL,
    unpriced_events       bigint NOT NULL,
    PRIMARY KEY (tenant_id, hour, agent_id, service, provider, model, token_class, currency)
);
INSERT INTO usage_rollups
SELECT tenant_id, hour, agent_id, service, provider, model, token_class, currency,
       sum(tokens)::int8, sum(billed_amount), sum(cost_amount), sum(unpriced_tokens)::int8,
       sum(class_events)::int8, sum(class_unpriced_events)::int8, sum(events)::int8,
       sum(unpriced_events)::int8
FROM usage_rollups_v1
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8;

-- The state rollups are folded now, and moved on state changes from the transaction's usage
-- (src/store/usage_by_state.rs); these recomputed them from the per-transaction rollup.
DROP FUNCTION backfill_daily_attribution_rollups();
DROP FUNCTION backfill_usage_state_rollups();
DROP FUNCTION usage_state_rollups_of(text, timestamptz, text);
DROP FUNCTION usage_state_daily_rollups_of(text, timestamptz, timestamptz, text);

-- The daily lifecycle rollups from the hourly ones (migration 0010's backfill without its usage
-- half, which the folder now keeps): for benches and tests that load lifecycle events directly.
CREATE FUNCTION backfill_daily_lifecycle_rollups() RETURNS void LANGUAGE sql AS $$
    DELETE FROM lifecycle_daily_rollups;
    DELETE FROM lifecycle_daily_rollup_pairs;
    INSERT INTO lifecycle_daily_rollups
    SELECT k.tenant_id, k.day, k.agent_id, k.service, k.kind, k.currency, f.*
    FROM lifecycle_daily_keys() k
    CROSS JOIN LATERAL lifecycle_daily_rollup_of(
        k.tenant_id, k.day, local_day_end(k.day, k.zone), k.agent_id, k.service, k.kind,
        k.currency) f;
    INSERT INTO lifecycle_daily_rollup_pairs
    SELECT k.tenant_id, k.day, k.agent_id, k.service, k.kind, k.currency, f.*
    FROM lifecycle_daily_keys() k
    CROSS JOIN LATERAL lifecycle_daily_rollup_pairs_of(
        k.tenant_id, k.day, local_day_end(k.day, k.zone), k.zone, k.agent_id, k.service,
        k.kind, k.currency) f;
$$;

-- Folds the oldest queued batches, up to about p_max_events events (at least one batch), into
-- every rollup, and deletes their queue rows — all in the caller's transaction, so a batch is
-- folded exactly once however folders race or crash. Returns how many batches and events it
-- folded (0, 0 when none was free).
--
-- Locks: the claimed queue rows (SKIP LOCKED: concurrent folders take other batches), then the
-- batches' tenants' advisory locks, shared and in hashtext order — a state change of one of
-- their transactions (move_transaction_usage) takes them exclusive, so the state each
-- transaction is folded at cannot change under the fold — then rollup rows in key order.
--
-- One pass over the raw rows into a small aggregate with class arrays, then the three rollups
-- from it: the cost per event falls as the window grows (few rollup rows per event), so the
-- folder folds in large windows (src/fold).
CREATE FUNCTION fold_usage(p_max_events bigint)
RETURNS TABLE (folded_batches integer, folded_events bigint) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    claimed record;
    ids bigint[] := '{}';
    tenant_list text[] := '{}';
    total bigint := 0;
    brin regclass;
BEGIN
    FOR claimed IN
        SELECT q.ingest_batch, q.tenants, q.events FROM fold_queue q
        ORDER BY q.ingest_batch FOR UPDATE SKIP LOCKED
    LOOP
        ids := ids || claimed.ingest_batch;
        tenant_list := tenant_list || claimed.tenants;
        total := total + claimed.events;
        EXIT WHEN total >= p_max_events;
    END LOOP;
    IF cardinality(ids) = 0 THEN
        RETURN QUERY SELECT 0, 0::bigint;
        RETURN;
    END IF;

    -- Unsummarized BRIN ranges match every batch: summarize what was appended since.
    FOR brin IN
        SELECT i.inhrelid::regclass FROM pg_inherits i
        WHERE i.inhparent = 'usage_events_by_ingest_batch'::regclass
    LOOP
        PERFORM brin_summarize_new_values(brin);
    END LOOP;

    PERFORM pg_advisory_xact_lock_shared(k)
    FROM (SELECT DISTINCT hashtext(t) AS k FROM unnest(tenant_list) AS t ORDER BY 1) AS l;

    CREATE TEMP TABLE fold_window ON COMMIT DROP AS
    SELECT e.tenant_id, date_trunc('hour', e.occurred_at, 'UTC') AS hour, e.agent_id,
           coalesce(e.service, '') AS service, e.provider, e.model, e.currency::text AS currency,
           (CASE WHEN e.transaction_id IS NULL THEN 0 ELSE coalesce(s.state, 1) END)::int2
               AS state,
           -- Each event counts once, on its first class with tokens (input when none).
           (CASE WHEN e.input > 0 THEN 1 WHEN e.cache_read > 0 THEN 2
                 WHEN e.cache_write_5m > 0 THEN 3 WHEN e.cache_write_1h > 0 THEN 4
                 WHEN e.output > 0 THEN 5 WHEN e.reasoning > 0 THEN 6
                 WHEN e.input_audio > 0 THEN 7 WHEN e.output_audio > 0 THEN 8
                 WHEN e.input_image > 0 THEN 9 WHEN e.output_image > 0 THEN 10
                 WHEN e.cache_write_30m > 0 THEN 11 WHEN e.cache_write_12h > 0 THEN 12
                 ELSE 1 END)::int2 AS first_class,
           count(*) AS events,
           count(*) FILTER (WHERE e.unpriced_tokens > 0) AS unpriced_events,
           sum(e.billed_amount) AS billed, sum(e.cost_amount) AS cost,
           ARRAY[sum(e.input), sum(e.cache_read), sum(e.cache_write_5m), sum(e.cache_write_1h),
                 sum(e.output), sum(e.reasoning), sum(e.input_audio), sum(e.output_audio),
                 sum(e.input_image), sum(e.output_image), sum(e.cache_write_30m),
                 sum(e.cache_write_12h)]::int8[] AS tokens,
           ARRAY[sum(e.billed_input), sum(e.billed_cache_read), sum(e.billed_cache_write_5m),
                 sum(e.billed_cache_write_1h), sum(e.billed_output), sum(e.billed_reasoning),
                 sum(e.billed_input_audio), sum(e.billed_output_audio),
                 sum(e.billed_input_image), sum(e.billed_output_image),
                 sum(e.billed_cache_write_30m), sum(e.billed_cache_write_12h)] AS billed_by_class,
           ARRAY[sum(e.cost_input), sum(e.cost_cache_read), sum(e.cost_cache_write_5m),
                 sum(e.cost_cache_write_1h), sum(e.cost_output), sum(e.cost_reasoning),
                 sum(e.cost_input_audio), sum(e.cost_output_audio),
                 sum(e.cost_input_image), sum(e.cost_output_image),
                 sum(e.cost_cache_write_30m), sum(e.cost_cache_write_12h)] AS cost_by_class,
           ARRAY[count(*) FILTER (WHERE e.input > 0), count(*) FILTER (WHERE e.cache_read > 0),
                 count(*) FILTER (WHERE e.cache_write_5m > 0),
                 count(*) FILTER (WHERE e.cache_write_1h > 0),
                 count(*) FILTER (WHERE e.output > 0), count(*) FILTER (WHERE e.reasoning > 0),
                 count(*) FILTER (WHERE e.input_audio > 0),
                 count(*) FILTER (WHERE e.output_audio > 0),
                 count(*) FILTER (WHERE e.input_image > 0),
                 count(*) FILTER (WHERE e.output_image > 0),
                 count(*) FILTER (WHERE e.cache_write_30m > 0),
                 count(*) FILTER (WHERE e.cache_write_12h > 0)] AS class_events,
           -- Unpriced classes: tokens without an amount. Rare, so one aggregate covers them.
           ARRAY[sum(e.input) FILTER (WHERE e.billed_input IS NULL),
                 sum(e.cache_read) FILTER (WHERE e.billed_cache_read IS NULL),
                 sum(e.cache_write_5m) FILTER (WHERE e.billed_cache_write_5m IS NULL),
                 sum(e.cache_write_1h) FILTER (WHERE e.billed_cache_write_1h IS NULL),
                 sum(e.output) FILTER (WHERE e.billed_output IS NULL),
                 sum(e.reasoning) FILTER (WHERE e.billed_reasoning IS NULL),
                 sum(e.input_audio) FILTER (WHERE e.billed_input_audio IS NULL),
                 sum(e.output_audio) FILTER (WHERE e.billed_output_audio IS NULL),
                 sum(e.input_image) FILTER (WHERE e.billed_input_image IS NULL),
                 sum(e.output_image) FILTER (WHERE e.billed_output_image IS NULL),
                 sum(e.cache_write_30m) FILTER (WHERE e.billed_cache_write_30m IS NULL),
                 sum(e.cache_write_12h) FILTER (WHERE e.billed_cache_write_12h IS NULL)]::int8[]
               AS unpriced_tokens,
           ARRAY[count(*) FILTER (WHERE e.input > 0 AND e.billed_input IS NULL),
                 count(*) FILTER (WHERE e.cache_read > 0 AND e.billed_cache_read IS NULL),
                 count(*) FILTER (WHERE e.cache_write_5m > 0 AND e.billed_cache_write_5m IS NULL),
                 count(*) FILTER (WHERE e.cache_write_1h > 0 AND e.billed_cache_write_1h IS NULL),
                 count(*) FILTER (WHERE e.output > 0 AND e.billed_output IS NULL),
                 count(*) FILTER (WHERE e.reasoning > 0 AND e.billed_reasoning IS NULL),
                 count(*) FILTER (WHERE e.input_audio > 0 AND e.billed_input_audio IS NULL),
                 count(*) FILTER (WHERE e.output_audio > 0 AND e.billed_output_audio IS NULL),
                 count(*) FILTER (WHERE e.input_image > 0 AND e.billed_input_image IS NULL),
                 count(*) FILTER (WHERE e.output_image > 0 AND e.billed_output_image IS NULL),
                 count(*) FILTER (WHERE e.cache_write_30m > 0
                                    AND e.billed_cache_write_30m IS NULL),
                 count(*) FILTER (WHERE e.cache_write_12h > 0
                                    AND e.billed_cache_write_12h IS NULL)] AS class_unpriced_events
    FROM usage_events e
    LEFT JOIN transaction_states s
      ON s.tenant_id = e.tenant_id AND s.transaction_id = e.transaction_id COLLATE "C"
    WHERE e.ingest_batch = ANY(ids)
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9;

    INSERT INTO usage_rollups AS r (tenant_id, hour, agent_id, service, provider, model,
        token_class, currency, tokens, billed_amount, cost_amount, unpriced_tokens, class_events,
        class_unpriced_events, events, unpriced_events)
    SELECT w.tenant_id, w.hour, w.agent_id, w.service, w.provider, w.model, c.k::int2,
           w.currency, sum(w.tokens[c.k])::int8, coalesce(sum(w.billed_by_class[c.k]), 0),
           coalesce(sum(w.cost_by_class[c.k]), 0),
           coalesce(sum(w.unpriced_tokens[c.k]), 0)::int8, sum(w.class_events[c.k])::int8,
           sum(w.class_unpriced_events[c.k])::int8,
           coalesce(sum(w.events) FILTER (WHERE w.first_class = c.k), 0)::int8,
           coalesce(sum(w.unpriced_events) FILTER (WHERE w.first_class = c.k), 0)::int8
    FROM fold_window w CROSS JOIN generate_series(1, 12) AS c(k)
    WHERE w.tokens[c.k] > 0 OR w.first_class = c.k
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT (tenant_id, hour, agent_id, service, provider, model, token_class, currency)
    DO UPDATE SET tokens = r.tokens + excluded.tokens,
                  billed_amount = r.billed_amount + excluded.billed_amount,
                  cost_amount = r.cost_amount + excluded.cost_amount,
                  unpriced_tokens = r.unpriced_tokens + excluded.unpriced_tokens,
                  class_events = r.class_events + excluded.class_events,
                  class_unpriced_events = r.class_unpriced_events + excluded.class_unpriced_events,
                  events = r.events + excluded.events,
                  unpriced_events = r.unpriced_events + excluded.unpriced_events;

    INSERT INTO usage_state_rollups AS u (tenant_id, hour, agent_id, service, provider, model,
        currency, state, input, cache_read, cache_write_5m, cache_write_1h, output, reasoning,
        input_audio, output_audio, input_image, output_image, cache_write_30m, cache_write_12h,
        billed_amount, cost_amount, events, unpriced_events)
    SELECT tenant_id, hour, agent_id, service, provider, model, currency, state,
           sum(tokens[1])::int8, sum(tokens[2])::int8, sum(tokens[3])::int8,
           sum(tokens[4])::int8, sum(tokens[5])::int8, sum(tokens[6])::int8,
           sum(tokens[7])::int8, sum(tokens[8])::int8, sum(tokens[9])::int8,
           sum(tokens[10])::int8, sum(tokens[11])::int8, sum(tokens[12])::int8,
           sum(billed), sum(cost), sum(events)::int8, sum(unpriced_events)::int8
    FROM fold_window
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT (tenant_id, hour, agent_id, service, provider, model, currency, state)
    DO UPDATE SET input = u.input + excluded.input,
                  cache_read = u.cache_read + excluded.cache_read,
                  cache_write_5m = u.cache_write_5m + excluded.cache_write_5m,
                  cache_write_1h = u.cache_write_1h + excluded.cache_write_1h,
                  output = u.output + excluded.output, reasoning = u.reasoning + excluded.reasoning,
                  input_audio = u.input_audio + excluded.input_audio,
                  output_audio = u.output_audio + excluded.output_audio,
                  input_image = u.input_image + excluded.input_image,
                  output_image = u.output_image + excluded.output_image,
                  cache_write_30m = u.cache_write_30m + excluded.cache_write_30m,
                  cache_write_12h = u.cache_write_12h + excluded.cache_write_12h,
                  billed_amount = u.billed_amount + excluded.billed_amount,
                  cost_amount = u.cost_amount + excluded.cost_amount,
                  events = u.events + excluded.events,
                  unpriced_events = u.unpriced_events + excluded.unpriced_events;

    -- Days of the tenant's billing zone (exact where the zone is whole hours from UTC, the only
    -- zones attribution reads daily rows for: store::attribution).
    INSERT INTO usage_state_daily_rollups AS u (tenant_id, day, agent_id, service, provider,
        model, currency, state, input, cache_read, cache_write_5m, cache_write_1h, output,
        reasoning, input_audio, output_audio, input_image, output_image, cache_write_30m,
        cache_write_12h, billed_amount, cost_amount, events, unpriced_events)
    SELECT w.tenant_id, date_trunc('day', w.hour, t.billing_timezone), w.agent_id, w.service,
           w.provider, w.model, w.currency, w.state,
           sum(w.tokens[1])::int8, sum(w.tokens[2])::int8, sum(w.tokens[3])::int8,
           sum(w.tokens[4])::int8, sum(w.tokens[5])::int8, sum(w.tokens[6])::int8,
           sum(w.tokens[7])::int8, sum(w.tokens[8])::int8, sum(w.tokens[9])::int8,
           sum(w.tokens[10])::int8, sum(w.tokens[11])::int8, sum(w.tokens[12])::int8,
           sum(w.billed), sum(w.cost), sum(w.events)::int8, sum(w.unpriced_events)::int8
    FROM fold_window w JOIN tenants t ON t.tenant_id = w.tenant_id
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT (tenant_id, day, agent_id, service, provider, model, currency, state)
    DO UPDATE SET input = u.input + excluded.input,
                  cache_read = u.cache_read + excluded.cache_read,
                  cache_write_5m = u.cache_write_5m + excluded.cache_write_5m,
                  cache_write_1h = u.cache_write_1h + excluded.cache_write_1h,
                  output = u.output + excluded.output, reasoning = u.reasoning + excluded.reasoning,
                  input_audio = u.input_audio + excluded.input_audio,
                  output_audio = u.output_audio + excluded.output_audio,
                  input_image = u.input_image + excluded.input_image,
                  output_image = u.output_image + excluded.output_image,
                  cache_write_30m = u.cache_write_30m + excluded.cache_write_30m,
                  cache_write_12h = u.cache_write_12h + excluded.cache_write_12h,
                  billed_amount = u.billed_amount + excluded.billed_amount,
                  cost_amount = u.cost_amount + excluded.cost_amount,
                  events = u.events + excluded.events,
                  unpriced_events = u.unpriced_events + excluded.unpriced_events;

    DELETE FROM fold_queue WHERE ingest_batch = ANY(ids);
    DROP TABLE fold_window;
    RETURN QUERY SELECT cardinality(ids), total;
END $$;

-- A transaction's folded usage per hourly state-rollup key: from the frozen per-transaction
-- rollup for events ingested before ingest v2, from raw rows for those after (their batches
-- folded: a queued batch is added at the transaction's state when it is folded).
CREATE FUNCTION folded_transaction_usage(p_tenants text[], p_transactions text[])
RETURNS TABLE (
    tenant_id text, transaction_id text, hour timestamptz, agent_id text, service text,
    provider text, model text, currency text, tokens int8[], billed_amount numeric,
    cost_amount numeric, events int8, unpriced_events int8)
LANGUAGE sql STABLE AS $$
    SELECT r.tenant_id, r.transaction_id, r.hour, r.agent_id, r.service, r.provider, r.model,
           r.currency,
           ARRAY[coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 1), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 2), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 3), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 4), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 5), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 6), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 7), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 8), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 9), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 10), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 11), 0),
                 coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 12), 0)]::int8[],
           sum(r.billed_amount), sum(r.cost_amount), sum(r.events)::int8,
           sum(r.unpriced_events)::int8
    FROM usage_rollups_v1 r
    JOIN unnest(p_tenants, p_transactions) AS k (t, x)
      ON r.tenant_id = k.t AND r.transaction_id = k.x
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    UNION ALL
    SELECT e.tenant_id, e.transaction_id, date_trunc('hour', e.occurred_at, 'UTC'), e.agent_id,
           coalesce(e.service, ''), e.provider, e.model, e.currency::text,
           ARRAY[sum(e.input), sum(e.cache_read), sum(e.cache_write_5m), sum(e.cache_write_1h),
                 sum(e.output), sum(e.reasoning), sum(e.input_audio), sum(e.output_audio),
                 sum(e.input_image), sum(e.output_image), sum(e.cache_write_30m),
                 sum(e.cache_write_12h)]::int8[],
           sum(e.billed_amount), sum(e.cost_amount), count(*),
           count(*) FILTER (WHERE e.unpriced_tokens > 0)
    FROM usage_events e
    JOIN unnest(p_tenants, p_transactions) AS k (t, x)
      ON e.tenant_id = k.t AND e.transaction_id = k.x
    WHERE e.ingest_batch IS NOT NULL
      AND NOT EXISTS (SELECT 1 FROM fold_queue q WHERE q.ingest_batch = e.ingest_batch)
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
$$;

-- Moves the folded usage of transactions whose state changed from their old state's rows of
-- the state rollups to their new state's (hourly, then daily), in the caller's transaction,
-- which holds the transactions' tenants' advisory locks exclusive (no fold runs meanwhile:
-- usage still queued is folded at the new state later). Rows left without events go.
CREATE FUNCTION move_transaction_usage(
    p_tenants text[], p_transactions text[], p_from int2[], p_to int2[])
RETURNS void LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    CREATE TEMP TABLE state_moves ON COMMIT DROP AS
    SELECT u.tenant_id, u.hour, u.agent_id, u.service, u.provider, u.model, u.currency,
           s.state, s.sign, u.tokens, u.billed_amount, u.cost_amount, u.events,
           u.unpriced_events
    FROM unnest(p_tenants, p_transactions, p_from, p_to) AS m (t, x, was, now)
    JOIN folded_transaction_usage(p_tenants, p_transactions) u
      ON u.tenant_id = m.t AND u.transaction_id = m.x
    CROSS JOIN LATERAL (VALUES (m.was, -1), (m.now, 1)) AS s (state, sign);

    INSERT INTO usage_state_rollups AS r (tenant_id, hour, agent_id, service, provider, model,
        currency, state, input, cache_read, cache_write_5m, cache_write_1h, output, reasoning,
        input_audio, output_audio, input_image, output_image, cache_write_30m, cache_write_12h,
        billed_amount, cost_amount, events, unpriced_events)
    SELECT tenant_id, hour, agent_id, service, provider, model, currency, state,
           sum(sign * tokens[1])::int8, sum(sign * tokens[2])::int8, sum(sign * tokens[3])::int8,
           sum(sign * tokens[4])::int8, sum(sign * tokens[5])::int8, sum(sign * tokens[6])::int8,
           sum(sign * tokens[7])::int8, sum(sign * tokens[8])::int8, sum(sign * tokens[9])::int8,
           sum(sign * tokens[10])::int8, sum(sign * tokens[11])::int8,
           sum(sign * tokens[12])::int8, sum(sign * billed_amount), sum(sign * cost_amount),
           sum(sign * events)::int8, sum(sign * unpriced_events)::int8
    FROM state_moves
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT (tenant_id, hour, agent_id, service, provider, model, currency, state)
    DO UPDATE SET input = r.input + excluded.input,
                  cache_read = r.cache_read + excluded.cache_read,
                  cache_write_5m = r.cache_write_5m + excluded.cache_write_5m,
                  cache_write_1h = r.cache_write_1h + excluded.cache_write_1h,
                  output = r.output + excluded.output, reasoning = r.reasoning + excluded.reasoning,
                  input_audio = r.input_audio + excluded.input_audio,
                  output_audio = r.output_audio + excluded.output_audio,
                  input_image = r.input_image + excluded.input_image,
                  output_image = r.output_image + excluded.output_image,
                  cache_write_30m = r.cache_write_30m + excluded.cache_write_30m,
                  cache_write_12h = r.cache_write_12h + excluded.cache_write_12h,
                  billed_amount = r.billed_amount + excluded.billed_amount,
                  cost_amount = r.cost_amount + excluded.cost_amount,
                  events = r.events + excluded.events,
                  unpriced_events = r.unpriced_events + excluded.unpriced_events;
    DELETE FROM usage_state_rollups r USING (SELECT DISTINCT tenant_id, hour, agent_id, service,
            provider, model, currency, state FROM state_moves) m
    WHERE r.events = 0 AND r.tenant_id = m.tenant_id AND r.hour = m.hour
      AND r.agent_id = m.agent_id AND r.service = m.service AND r.provider = m.provider
      AND r.model = m.model AND r.currency = m.currency AND r.state = m.state;

    INSERT INTO usage_state_daily_rollups AS r (tenant_id, day, agent_id, service, provider,
        model, currency, state, input, cache_read, cache_write_5m, cache_write_1h, output,
        reasoning, input_audio, output_audio, input_image, output_image, cache_write_30m,
        cache_write_12h, billed_amount, cost_amount, events, unpriced_events)
    SELECT m.tenant_id, date_trunc('day', m.hour, t.billing_timezone), m.agent_id, m.service,
           m.provider, m.model, m.currency, m.state,
           sum(m.sign * m.tokens[1])::int8, sum(m.sign * m.tokens[2])::int8,
           sum(m.sign * m.tokens[3])::int8, sum(m.sign * m.tokens[4])::int8,
           sum(m.sign * m.tokens[5])::int8, sum(m.sign * m.tokens[6])::int8,
           sum(m.sign * m.tokens[7])::int8, sum(m.sign * m.tokens[8])::int8,
           sum(m.sign * m.tokens[9])::int8, sum(m.sign * m.tokens[10])::int8,
           sum(m.sign * m.tokens[11])::int8, sum(m.sign * m.tokens[12])::int8,
           sum(m.sign * m.billed_amount), sum(m.sign * m.cost_amount),
           sum(m.sign * m.events)::int8, sum(m.sign * m.unpriced_events)::int8
    FROM state_moves m JOIN tenants t ON t.tenant_id = m.tenant_id
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8
    ON CONFLICT (tenant_id, day, agent_id, service, provider, model, currency, state)
    DO UPDATE SET input = r.input + excluded.input,
                  cache_read = r.cache_read + excluded.cache_read,
                  cache_write_5m = r.cache_write_5m + excluded.cache_write_5m,
                  cache_write_1h = r.cache_write_1h + excluded.cache_write_1h,
                  output = r.output + excluded.output, reasoning = r.reasoning + excluded.reasoning,
                  input_audio = r.input_audio + excluded.input_audio,
                  output_audio = r.output_audio + excluded.output_audio,
                  input_image = r.input_image + excluded.input_image,
                  output_image = r.output_image + excluded.output_image,
                  cache_write_30m = r.cache_write_30m + excluded.cache_write_30m,
                  cache_write_12h = r.cache_write_12h + excluded.cache_write_12h,
                  billed_amount = r.billed_amount + excluded.billed_amount,
                  cost_amount = r.cost_amount + excluded.cost_amount,
                  events = r.events + excluded.events,
                  unpriced_events = r.unpriced_events + excluded.unpriced_events;
    DELETE FROM usage_state_daily_rollups r USING (
            SELECT DISTINCT m.tenant_id, date_trunc('day', m.hour, t.billing_timezone) AS day,
                   m.agent_id, m.service, m.provider, m.model, m.currency, m.state
            FROM state_moves m JOIN tenants t ON t.tenant_id = m.tenant_id) m
    WHERE r.events = 0 AND r.tenant_id = m.tenant_id AND r.day = m.day
      AND r.agent_id = m.agent_id AND r.service = m.service AND r.provider = m.provider
      AND r.model = m.model AND r.currency = m.currency AND r.state = m.state;
    DROP TABLE state_moves;
END $$;
