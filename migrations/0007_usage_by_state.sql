-- Attribution reads usage per transaction *state*, not per transaction: a second rollup keyed by
-- the state the usage's transaction is in now, so a tenant-month report reads hundreds of
-- thousands of rows instead of joining millions of per-transaction rollups to every
-- transaction's state derived from its lifecycle events on each call.
--
-- Both write paths keep it exact under concurrency (see src/store/usage_by_state.rs):
--   * ingest adds a batch's usage at the state of each transaction, read from transaction_states
--     under that row's lock;
--   * a lifecycle event that changes a transaction's state takes the same lock, and recomputes
--     the rows the transaction's usage leaves and enters from usage_rollups (the truth), after
--     locking them — a recomputation rather than a subtraction, so every amount keeps the
--     decimal scale a sum of the remaining usage has (reports print amounts as stored).
-- Locks are taken transactions first, then state rollup rows, each set in key order, on both
-- paths: a batch of many transactions cannot deadlock with another.

-- Every transaction ever named by usage or by a lifecycle event, with its state now
-- (transaction_state() of its events; 1 = not started when it has none yet). The row is also
-- the per-transaction lock that serializes usage spent on the transaction with changes of its
-- state.
CREATE TABLE transaction_states (
    tenant_id      text COLLATE "C" NOT NULL,
    transaction_id text COLLATE "C" NOT NULL,
    state          smallint NOT NULL CHECK (state BETWEEN 1 AND 6),
    PRIMARY KEY (tenant_id, transaction_id)
);

-- usage_rollups added up without the transaction, with its state instead (0 = usage on no
-- transaction), tokens one column per class. Kept like usage_rollups: retention removes neither.
CREATE TABLE usage_state_rollups (
    tenant_id       text COLLATE "C" NOT NULL,
    hour            timestamptz NOT NULL,
    agent_id        text COLLATE "C" NOT NULL,
    service         text COLLATE "C" NOT NULL,
    provider        text COLLATE "C" NOT NULL,
    model           text COLLATE "C" NOT NULL,
    currency        text COLLATE "C" NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    state           smallint NOT NULL CHECK (state BETWEEN 0 AND 6),
    input           bigint NOT NULL,
    cache_read      bigint NOT NULL,
    cache_write_5m  bigint NOT NULL,
    cache_write_1h  bigint NOT NULL,
    output          bigint NOT NULL,
    reasoning       bigint NOT NULL,
    input_audio     bigint NOT NULL,
    output_audio    bigint NOT NULL,
    input_image     bigint NOT NULL,
    output_image    bigint NOT NULL,
    billed_amount   numeric NOT NULL,
    cost_amount     numeric NOT NULL,
    -- Distinct events (usage_rollups.events summed over classes); 0 only while a recomputation
    -- that empties the row is under way.
    events          bigint NOT NULL,
    unpriced_events bigint NOT NULL,
    PRIMARY KEY (tenant_id, hour, agent_id, service, provider, model, currency, state)
);

-- A state change finds the rollups of its transaction.
CREATE INDEX usage_rollups_by_transaction ON usage_rollups (tenant_id, transaction_id)
    WHERE transaction_id <> '';

-- The state rollup rows of one tenant, hour and agent, from the truth: the one definition the
-- backfill below and every recomputation after a state change use. A SQL function of one
-- SELECT, so Postgres inlines it and its arguments become index conditions.
CREATE FUNCTION usage_state_rollups_of(p_tenant text, p_hour timestamptz, p_agent text)
RETURNS TABLE (
    tenant_id text, hour timestamptz, agent_id text, service text, provider text, model text,
    currency text, state smallint, input bigint, cache_read bigint, cache_write_5m bigint,
    cache_write_1h bigint, output bigint, reasoning bigint, input_audio bigint,
    output_audio bigint, input_image bigint, output_image bigint, billed_amount numeric,
    cost_amount numeric, events bigint, unpriced_events bigint)
LANGUAGE sql STABLE AS $$
    SELECT r.tenant_id, r.hour, r.agent_id, r.service, r.provider, r.model, r.currency,
           (CASE WHEN r.transaction_id = '' THEN 0 ELSE coalesce(s.state, 1) END)::smallint,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 1), 0)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 2), 0)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 3), 0)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 4), 0)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 5), 0)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 6), 0)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 7), 0)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 8), 0)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 9), 0)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 10), 0)::int8,
           sum(r.billed_amount), sum(r.cost_amount), sum(r.events)::int8,
           sum(r.unpriced_events)::int8
    FROM usage_rollups r
    LEFT JOIN transaction_states s
      ON s.tenant_id = r.tenant_id AND s.transaction_id = r.transaction_id
    WHERE r.tenant_id = p_tenant AND r.hour = p_hour AND r.agent_id = p_agent
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
$$;

-- Fills both tables from usage_rollups and transaction_events: run once here, so an upgraded
-- database reports what it reported before, and by benches/attribution.sh after it seeds.
CREATE FUNCTION backfill_usage_state_rollups() RETURNS void LANGUAGE sql AS $$
    INSERT INTO transaction_states (tenant_id, transaction_id, state)
    SELECT tenant_id, transaction_id, transaction_state(array_agg(kind))
    FROM transaction_events GROUP BY tenant_id, transaction_id
    ON CONFLICT (tenant_id, transaction_id) DO UPDATE SET state = excluded.state;
    INSERT INTO transaction_states (tenant_id, transaction_id, state)
    SELECT DISTINCT tenant_id, transaction_id, 1::smallint
    FROM usage_rollups WHERE transaction_id <> ''
    ON CONFLICT (tenant_id, transaction_id) DO NOTHING;
    DELETE FROM usage_state_rollups;
    INSERT INTO usage_state_rollups
    SELECT f.*
    FROM (SELECT DISTINCT tenant_id, hour, agent_id FROM usage_rollups) g
    CROSS JOIN LATERAL usage_state_rollups_of(g.tenant_id, g.hour, g.agent_id) f;
$$;

SELECT backfill_usage_state_rollups();
