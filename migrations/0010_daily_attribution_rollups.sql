-- The attribution rollups of migrations 0007 and 0008 once more, per local day of the tenant's
-- billing zone instead of per hour, so that a tenant-month report reads about 31 rows per group
-- instead of 744 (see store::attribution for when a report may read them).
--
-- Each daily table is exactly its hourly table added up by local day, and is kept so on the
-- same write paths, in the same database transactions, after the hourly rows:
--   * ingest adds a batch's usage to the daily rows as it adds it to the hourly ones (addition
--     keeps the decimal scale a plain sum has);
--   * a state change, after recomputing the hourly rows it touched, recomputes the daily rows
--     those hours fall in from the hourly rows (not by subtraction, for the same scale reason);
--   * a lifecycle rollup change likewise recomputes its daily rows and pairs from the hourly
--     ones.
-- Locks follow the hourly order and come after it: transactions, hourly usage rows, daily usage
-- rows, hourly lifecycle rows, daily lifecycle rows, each set in key order.
--
-- A day is cut in the tenant's billing_timezone, which cannot change once the tenant has usage
-- or transactions (store::tenants::has_history). Days are sums of whole hours, so they are only
-- exact where the zone is a whole number of hours from UTC; reports in other zones keep reading
-- the hourly rows.

-- The start of the next local day after `p_day` (a local midnight) in `p_zone`: 23, 24 or 25
-- hours later.
CREATE FUNCTION local_day_end(p_day timestamptz, p_zone text) RETURNS timestamptz
LANGUAGE sql STABLE STRICT AS $$
    SELECT ((p_day AT TIME ZONE p_zone) + interval '1 day') AT TIME ZONE p_zone
$$;

-- usage_state_rollups by local day: `day` is the local midnight (in the tenant's billing zone)
-- the day starts at.
CREATE TABLE usage_state_daily_rollups (LIKE usage_state_rollups INCLUDING CONSTRAINTS);
ALTER TABLE usage_state_daily_rollups RENAME COLUMN hour TO day;
ALTER TABLE usage_state_daily_rollups
    ADD PRIMARY KEY (tenant_id, day, agent_id, service, provider, model, currency, state);

-- A day's recomputation reads one agent's hourly rows of that day.
CREATE INDEX usage_state_rollups_by_agent ON usage_state_rollups (tenant_id, agent_id, hour);

-- The daily usage rows of one tenant, local day and agent, from the hourly rows: the one
-- definition the backfill below and every recomputation use.
CREATE FUNCTION usage_state_daily_rollups_of(
    p_tenant text, p_day timestamptz, p_day_end timestamptz, p_agent text)
RETURNS SETOF usage_state_daily_rollups
LANGUAGE sql STABLE AS $$
    SELECT r.tenant_id, p_day, r.agent_id, r.service, r.provider, r.model, r.currency, r.state,
           sum(r.input)::int8, sum(r.cache_read)::int8, sum(r.cache_write_5m)::int8,
           sum(r.cache_write_1h)::int8, sum(r.output)::int8, sum(r.reasoning)::int8,
           sum(r.input_audio)::int8, sum(r.output_audio)::int8, sum(r.input_image)::int8,
           sum(r.output_image)::int8, sum(r.billed_amount), sum(r.cost_amount),
           sum(r.events)::int8, sum(r.unpriced_events)::int8
    FROM usage_state_rollups r
    WHERE r.tenant_id = p_tenant AND r.agent_id = p_agent
      AND r.hour >= p_day AND r.hour < p_day_end
    GROUP BY r.tenant_id, r.agent_id, r.service, r.provider, r.model, r.currency, r.state
$$;

-- lifecycle_rollups by local day: distinct transactions with such events in the day, and
-- their amounts.
CREATE TABLE lifecycle_daily_rollups (LIKE lifecycle_rollups INCLUDING CONSTRAINTS);
ALTER TABLE lifecycle_daily_rollups RENAME COLUMN hour TO day;
ALTER TABLE lifecycle_daily_rollups
    ADD PRIMARY KEY (tenant_id, day, agent_id, service, kind, currency);

-- Per transaction, its day with such events and its next one (migration 0008's pairs, by day).
CREATE TABLE lifecycle_daily_rollup_pairs (LIKE lifecycle_rollup_pairs INCLUDING CONSTRAINTS);
ALTER TABLE lifecycle_daily_rollup_pairs RENAME COLUMN hour TO day;
ALTER TABLE lifecycle_daily_rollup_pairs RENAME COLUMN next_hour TO next_day;
ALTER TABLE lifecycle_daily_rollup_pairs
    ADD PRIMARY KEY (tenant_id, day, agent_id, service, kind, currency, next_day);

-- A day's recomputation reads one group's hourly rows and pairs of that day.
CREATE INDEX lifecycle_rollups_by_group
    ON lifecycle_rollups (tenant_id, agent_id, service, kind, currency, hour);
CREATE INDEX lifecycle_rollup_pairs_by_group
    ON lifecycle_rollup_pairs (tenant_id, agent_id, service, kind, currency, hour);

-- A daily lifecycle row from the hourly rows of its day: distinct transactions are the hours'
-- counts less the pairs of hours of one transaction that both fall in the day (each
-- transaction with events in the day has one pair fewer there than hours).
CREATE FUNCTION lifecycle_daily_rollup_of(
    p_tenant text, p_day timestamptz, p_day_end timestamptz, p_agent text, p_service text,
    p_kind smallint, p_currency text)
RETURNS TABLE (transactions bigint, amount numeric)
LANGUAGE sql STABLE AS $$
    SELECT (sum(l.transactions) - coalesce((
                SELECT sum(p.transactions) FROM lifecycle_rollup_pairs p
                WHERE p.tenant_id = p_tenant AND p.agent_id = p_agent
                  AND p.service = p_service AND p.kind = p_kind AND p.currency = p_currency
                  AND p.hour >= p_day AND p.next_hour < p_day_end), 0))::int8,
           sum(l.amount)
    FROM lifecycle_rollups l
    WHERE l.tenant_id = p_tenant AND l.agent_id = p_agent AND l.service = p_service
      AND l.kind = p_kind AND l.currency = p_currency
      AND l.hour >= p_day AND l.hour < p_day_end
    HAVING count(*) > 0
$$;

-- A day's pairs: a transaction with events in the day and later ones has exactly one hourly
-- pair leaving the day, from its last hour there to its first hour after it.
CREATE FUNCTION lifecycle_daily_rollup_pairs_of(
    p_tenant text, p_day timestamptz, p_day_end timestamptz, p_zone text, p_agent text,
    p_service text, p_kind smallint, p_currency text)
RETURNS TABLE (next_day timestamptz, transactions bigint)
LANGUAGE sql STABLE AS $$
    SELECT date_trunc('day', p.next_hour, p_zone), sum(p.transactions)::int8
    FROM lifecycle_rollup_pairs p
    WHERE p.tenant_id = p_tenant AND p.agent_id = p_agent AND p.service = p_service
      AND p.kind = p_kind AND p.currency = p_currency
      AND p.hour >= p_day AND p.hour < p_day_end AND p.next_hour >= p_day_end
    GROUP BY 1
$$;

-- Every daily lifecycle key the hourly rows call for, with the tenant's zone.
CREATE FUNCTION lifecycle_daily_keys()
RETURNS TABLE (tenant_id text, day timestamptz, zone text, agent_id text, service text,
               kind smallint, currency text)
LANGUAGE sql STABLE AS $$
    SELECT DISTINCT l.tenant_id, date_trunc('day', l.hour, t.billing_timezone),
           t.billing_timezone, l.agent_id, l.service, l.kind, l.currency
    FROM lifecycle_rollups l JOIN tenants t ON t.tenant_id = l.tenant_id
$$;

-- Fills the three tables from the hourly ones: run once here, so an upgraded database reports
-- what it reported before, and by benches/attribution.sh after it seeds.
CREATE FUNCTION backfill_daily_attribution_rollups() RETURNS void LANGUAGE sql AS $$
    DELETE FROM usage_state_daily_rollups;
    DELETE FROM lifecycle_daily_rollups;
    DELETE FROM lifecycle_daily_rollup_pairs;
    INSERT INTO usage_state_daily_rollups
    SELECT f.*
    FROM (SELECT DISTINCT r.tenant_id, date_trunc('day', r.hour, t.billing_timezone) AS day,
                 t.billing_timezone AS zone, r.agent_id
          FROM usage_state_rollups r JOIN tenants t ON t.tenant_id = r.tenant_id) g
    CROSS JOIN LATERAL usage_state_daily_rollups_of(
        g.tenant_id, g.day, local_day_end(g.day, g.zone), g.agent_id) f;
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

SELECT backfill_daily_attribution_rollups();
