-- Service transactions: lifecycle events (started, completed, failed, refunded, reversed) with
-- the same exactly-once identity as usage. A transaction is never edited: its state is derived
-- from its events (transaction_state below, and domain::transaction::summarize in Rust).

-- Lifecycle events. Identity (tenant_id, source, event_id) is unique for as long as the row
-- is kept; far fewer rows than usage, so no partitioning.
CREATE TABLE transaction_events (
    tenant_id      text COLLATE "C" NOT NULL,
    source         text COLLATE "C" NOT NULL,
    event_id       text COLLATE "C" NOT NULL,
    transaction_id text COLLATE "C" NOT NULL,
    -- 1 started, 2 completed, 3 failed, 4 refunded, 5 reversed.
    kind           smallint NOT NULL CHECK (kind BETWEEN 1 AND 5),
    occurred_at    timestamptz NOT NULL,
    agent_id       text COLLATE "C",
    service        text COLLATE "C",
    -- Revenue of a completion, or the refunded amount; exact, never rounded.
    amount         numeric CHECK (amount >= 0),
    currency       text COLLATE "C" CHECK (currency ~ '^[A-Z]{3}$'),
    reason         text NOT NULL DEFAULT '',
    attributes     jsonb NOT NULL,
    payload_hash   bytea NOT NULL,
    channel        text NOT NULL,
    ingested_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, source, event_id),
    CHECK ((kind IN (2, 4)) = (amount IS NOT NULL AND currency IS NOT NULL))
);
CREATE INDEX transaction_events_by_transaction ON transaction_events (tenant_id, transaction_id);
CREATE INDEX transaction_events_by_time ON transaction_events (tenant_id, occurred_at);
-- Retention trims transaction events by time, like usage keys.
CREATE INDEX transaction_events_by_occurred_at ON transaction_events (occurred_at);

-- Same identity, different payload: not applied, kept for audit.
CREATE TABLE transaction_event_conflicts (
    tenant_id    text NOT NULL,
    source       text NOT NULL,
    event_id     text NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    payload_hash bytea NOT NULL,
    payload      jsonb NOT NULL,
    channel      text NOT NULL
);
CREATE INDEX transaction_event_conflicts_by_identity
    ON transaction_event_conflicts (tenant_id, source, event_id);

-- The state precedence of domain::transaction::State::from_kinds, for SQL readers (lists,
-- attribution): reversed > refunded (completed and refunded) > completed > failed > started
-- (a start, or a refund without completion) > not started (proto TransactionState numbers).
CREATE FUNCTION transaction_state(kinds smallint[]) RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
        WHEN 5 = ANY(kinds) THEN 6
        WHEN 2 = ANY(kinds) AND 4 = ANY(kinds) THEN 5
        WHEN 2 = ANY(kinds) THEN 3
        WHEN 3 = ANY(kinds) THEN 4
        WHEN 1 = ANY(kinds) OR 4 = ANY(kinds) THEN 2
        ELSE 1
    END::smallint
$$;
