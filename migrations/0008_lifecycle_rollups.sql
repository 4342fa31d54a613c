-- Attribution reads lifecycle counts and money per hour and group instead of every lifecycle
-- event of the range (see src/store/lifecycle_rollups.rs for how they are kept).
--
-- What an event adds to a report depends on other events of its transaction: its agent and
-- service default to the transaction's first, only the first completion counts, a reversal
-- takes back the revenue net of the refunds before it. So each transaction's contribution is
-- derived from all its events (lifecycle_contributions_of) and kept per hour, kind and
-- currency in lifecycle_contributions, replaced whenever an event of it is stored, under the
-- transaction's transaction_states lock. The report rows add those up per hour and group
-- (lifecycle_rollups). Counts are of distinct transactions per report row, and hours do not
-- add up to a day: a transaction refunded twice on one day is one refunded transaction that
-- day. So each contribution also names the next hour in which the same transaction has an
-- event of the same kind and currency, and lifecycle_rollup_pairs counts those pairs: over any
-- run of whole hours, a transaction's hours with such events minus its pairs of consecutive
-- ones inside the run is 1 if it has any there, else 0.
--
-- That needs every event of a transaction in one group. A transaction whose events name
-- different agents or services (an anomaly) is `mixed`: it contributes nothing here, and the
-- report reads its events one by one.

ALTER TABLE transaction_states ADD COLUMN mixed boolean NOT NULL DEFAULT false;
CREATE INDEX transaction_states_mixed ON transaction_states (tenant_id) WHERE mixed;

CREATE TABLE lifecycle_contributions (
    tenant_id      text COLLATE "C" NOT NULL,
    transaction_id text COLLATE "C" NOT NULL,
    hour           timestamptz NOT NULL,
    kind           smallint NOT NULL CHECK (kind BETWEEN 1 AND 5),
    currency       text COLLATE "C" NOT NULL,
    agent_id       text COLLATE "C" NOT NULL,
    service        text COLLATE "C" NOT NULL,
    amount         numeric NOT NULL,
    -- The transaction's next hour with an event of this kind and currency.
    next_hour      timestamptz,
    PRIMARY KEY (tenant_id, transaction_id, hour, kind, currency)
);
CREATE INDEX lifecycle_contributions_by_row
    ON lifecycle_contributions (tenant_id, hour, agent_id, service, kind, currency);

CREATE TABLE lifecycle_rollups (
    tenant_id    text COLLATE "C" NOT NULL,
    hour         timestamptz NOT NULL,
    agent_id     text COLLATE "C" NOT NULL,
    service      text COLLATE "C" NOT NULL,
    kind         smallint NOT NULL,
    currency     text COLLATE "C" NOT NULL,
    -- Distinct transactions with such events in the hour, and their amounts.
    transactions bigint NOT NULL,
    amount       numeric NOT NULL,
    PRIMARY KEY (tenant_id, hour, agent_id, service, kind, currency)
);

CREATE TABLE lifecycle_rollup_pairs (
    tenant_id    text COLLATE "C" NOT NULL,
    hour         timestamptz NOT NULL,
    agent_id     text COLLATE "C" NOT NULL,
    service      text COLLATE "C" NOT NULL,
    kind         smallint NOT NULL,
    currency     text COLLATE "C" NOT NULL,
    next_hour    timestamptz NOT NULL,
    transactions bigint NOT NULL,
    PRIMARY KEY (tenant_id, hour, agent_id, service, kind, currency, next_hour)
);

-- Whether the transaction's events name more than one agent or service.
CREATE FUNCTION transaction_is_mixed(p_tenant text, p_transaction text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT count(DISTINCT agent_id) > 1 OR count(DISTINCT service) > 1
    FROM transaction_events WHERE tenant_id = p_tenant AND transaction_id = p_transaction
$$;

-- What a transaction's events add to attribution, per hour, kind and currency: the rules of
-- the per-event report query (store::attribution::lifecycle), for one transaction.
CREATE FUNCTION lifecycle_contributions_of(p_tenant text, p_transaction text)
RETURNS TABLE (
    tenant_id text, transaction_id text, hour timestamptz, kind smallint, currency text,
    agent_id text, service text, amount numeric, next_hour timestamptz)
LANGUAGE sql STABLE AS $$
    WITH events AS (
        SELECT * FROM transaction_events
        WHERE tenant_id = p_tenant AND transaction_id = p_transaction),
    first_completion AS (
        SELECT event_id, amount, currency FROM events WHERE kind = 2
        ORDER BY occurred_at, event_id LIMIT 1),
    facts AS (
        SELECT date_trunc('hour', e.occurred_at, 'UTC') AS hour, e.kind,
               CASE WHEN e.kind IN (2, 4) THEN e.currency
                    WHEN e.kind = 5 THEN coalesce(c.currency, t.currency)
                    ELSE t.currency END::text AS currency,
               CASE WHEN e.kind IN (2, 4) THEN e.amount
                    WHEN e.kind = 5 THEN coalesce(c.amount - coalesce((
                        SELECT sum(f.amount) FROM events f
                        WHERE f.kind = 4 AND f.currency = c.currency
                          AND (f.occurred_at, f.event_id) < (e.occurred_at, e.event_id)), 0), 0)
                    ELSE 0 END AS amount
        FROM events e
        JOIN tenants t ON t.tenant_id = e.tenant_id
        LEFT JOIN first_completion c ON true
        WHERE e.kind <> 2 OR e.event_id = c.event_id),
    hours AS (
        SELECT hour, kind, currency, sum(amount) AS amount FROM facts
        GROUP BY hour, kind, currency)
    SELECT p_tenant, p_transaction, h.hour, h.kind, h.currency,
           coalesce((SELECT agent_id FROM events WHERE agent_id IS NOT NULL
                     ORDER BY occurred_at, event_id LIMIT 1), '')::text,
           coalesce((SELECT service FROM events WHERE service IS NOT NULL
                     ORDER BY occurred_at, event_id LIMIT 1), '')::text,
           h.amount,
           lead(h.hour) OVER (PARTITION BY h.kind, h.currency ORDER BY h.hour)
    FROM hours h
$$;

-- A lifecycle rollup row, and its pairs, from the contributions: the one definition the
-- backfill below and every recomputation use (recomputed rather than subtracted from, so
-- amounts keep the scale a plain sum has). Inlined by Postgres, arguments become index
-- conditions.
CREATE FUNCTION lifecycle_rollup_of(
    p_tenant text, p_hour timestamptz, p_agent text, p_service text, p_kind smallint,
    p_currency text)
RETURNS TABLE (transactions bigint, amount numeric)
LANGUAGE sql STABLE AS $$
    SELECT count(*), sum(amount) FROM lifecycle_contributions
    WHERE tenant_id = p_tenant AND hour = p_hour AND agent_id = p_agent AND service = p_service
      AND kind = p_kind AND currency = p_currency
    HAVING count(*) > 0
$$;

CREATE FUNCTION lifecycle_rollup_pairs_of(
    p_tenant text, p_hour timestamptz, p_agent text, p_service text, p_kind smallint,
    p_currency text)
RETURNS TABLE (next_hour timestamptz, transactions bigint)
LANGUAGE sql STABLE AS $$
    SELECT next_hour, count(*) FROM lifecycle_contributions
    WHERE tenant_id = p_tenant AND hour = p_hour AND agent_id = p_agent AND service = p_service
      AND kind = p_kind AND currency = p_currency AND next_hour IS NOT NULL
    GROUP BY next_hour
$$;

-- Fills the contributions and both rollups from transaction_events: run once here, so an
-- upgraded database reports what it reported before, and by benches/attribution.sh after it
-- seeds. Needs transaction_states (migration 0007).
CREATE FUNCTION backfill_lifecycle_rollups() RETURNS void LANGUAGE sql AS $$
    UPDATE transaction_states s SET mixed = transaction_is_mixed(s.tenant_id, s.transaction_id);
    DELETE FROM lifecycle_contributions;
    DELETE FROM lifecycle_rollups;
    DELETE FROM lifecycle_rollup_pairs;
    INSERT INTO lifecycle_contributions
    SELECT f.* FROM transaction_states s
    CROSS JOIN LATERAL lifecycle_contributions_of(s.tenant_id, s.transaction_id) f
    WHERE NOT s.mixed;
    INSERT INTO lifecycle_rollups
    SELECT k.*, f.*
    FROM (SELECT DISTINCT tenant_id, hour, agent_id, service, kind, currency
          FROM lifecycle_contributions) k
    CROSS JOIN LATERAL lifecycle_rollup_of(k.tenant_id, k.hour, k.agent_id, k.service, k.kind,
                                           k.currency) f;
    INSERT INTO lifecycle_rollup_pairs
    SELECT k.*, f.*
    FROM (SELECT DISTINCT tenant_id, hour, agent_id, service, kind, currency
          FROM lifecycle_contributions) k
    CROSS JOIN LATERAL lifecycle_rollup_pairs_of(k.tenant_id, k.hour, k.agent_id, k.service,
                                                 k.kind, k.currency) f;
$$;

SELECT backfill_lifecycle_rollups();
