-- Quotas: policies, one counter row per (policy, window), reservations with their holds, and
-- the outbox of threshold alerts.
--
-- Why a hard limit holds across replicas: every decision locks the counter rows of all the
-- policies it touches (in policy_id order, so concurrent decisions cannot deadlock), reads
-- used + reserved under those locks, and writes its hold before committing. Two decisions on
-- the same policy are therefore serialized by Postgres whichever replica makes them.

CREATE TABLE quota_policies (
    tenant_id            text COLLATE "C" NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    policy_id            text COLLATE "C" NOT NULL,
    name                 text NOT NULL DEFAULT '',
    -- The subject: the whole tenant (both NULL), one agent, or one service.
    agent_id             text COLLATE "C",
    service              text COLLATE "C",
    window_kind          text NOT NULL CHECK (window_kind IN ('day', 'week', 'month', 'billing_period')),
    -- Token limits: token_limit and the classes summed (empty = all). Money limits:
    -- money_limit in currency (the tenant's).
    token_limit          bigint CHECK (token_limit > 0),
    token_classes        smallint[] NOT NULL DEFAULT '{}',
    money_limit          numeric CHECK (money_limit > 0),
    currency             char(3),
    enforcement          text NOT NULL CHECK (enforcement IN ('hard', 'soft')),
    alert_thresholds_bps integer[] NOT NULL DEFAULT '{}',
    disabled             boolean NOT NULL DEFAULT false,
    revision             bigint NOT NULL DEFAULT 1,
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, policy_id),
    CHECK (agent_id IS NULL OR service IS NULL),
    CHECK ((token_limit IS NULL) <> (money_limit IS NULL)),
    CHECK ((money_limit IS NULL) = (currency IS NULL))
);

-- Per policy and window: `used` (usage counted by occurred_at) and `reserved` (holds of active
-- reservations), in the unit of the policy's limit (integral for token policies). Rows appear
-- on first use and go with their policy.
CREATE TABLE quota_counters (
    tenant_id    text COLLATE "C" NOT NULL,
    policy_id    text COLLATE "C" NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    used         numeric NOT NULL DEFAULT 0,
    reserved     numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, policy_id, window_start),
    FOREIGN KEY (tenant_id, policy_id) REFERENCES quota_policies (tenant_id, policy_id)
        ON DELETE CASCADE
);

CREATE TABLE quota_reservations (
    tenant_id       text COLLATE "C" NOT NULL,
    reservation_id  text COLLATE "C" NOT NULL,
    agent_id        text NOT NULL,
    service         text,
    provider        text NOT NULL,
    model           text NOT NULL,
    -- The hold as disjoint buckets, TokenClass order.
    held_tokens     bigint[] NOT NULL,
    decision        text NOT NULL CHECK (decision IN ('allow', 'allow_soft_limit')),
    state           text NOT NULL CHECK (state IN ('active', 'settled', 'released', 'expired')),
    idempotency_key text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    expires_at      timestamptz NOT NULL,
    -- The actual tokens counted for it, and whether a usage event (rather than Settle with
    -- counts alone) supplied them: an event replaces a counts-only settlement.
    settled_tokens  bigint[],
    settled_by_event boolean NOT NULL DEFAULT false,
    PRIMARY KEY (tenant_id, reservation_id)
);
CREATE UNIQUE INDEX quota_reservations_idempotency
    ON quota_reservations (tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
-- The expiry sweep's read.
CREATE INDEX quota_reservations_active_expiry
    ON quota_reservations (expires_at) WHERE state = 'active';

-- What one reservation holds on one policy's window counter, and what a counts-only
-- settlement added to its `used` (taken back if a usage event later replaces it).
CREATE TABLE quota_holds (
    tenant_id      text COLLATE "C" NOT NULL,
    reservation_id text COLLATE "C" NOT NULL,
    policy_id      text COLLATE "C" NOT NULL,
    window_start   timestamptz NOT NULL,
    window_end     timestamptz NOT NULL,
    amount         numeric NOT NULL CHECK (amount >= 0),
    settled_amount numeric NOT NULL DEFAULT 0,
    PRIMARY KEY (tenant_id, reservation_id, policy_id),
    FOREIGN KEY (tenant_id, reservation_id) REFERENCES quota_reservations (tenant_id, reservation_id)
        ON DELETE CASCADE,
    FOREIGN KEY (tenant_id, policy_id) REFERENCES quota_policies (tenant_id, policy_id)
        ON DELETE CASCADE
);
CREATE INDEX quota_holds_by_policy ON quota_holds (tenant_id, policy_id);

-- Outbox of threshold crossings. The primary key makes a crossing exactly-once per (policy,
-- window, threshold) however many transactions race across it; the publisher sends unpublished
-- rows to Kafka and stamps published_at. Rows are self-contained (no foreign key): an alert
-- outlives a deleted policy.
CREATE TABLE quota_alerts (
    tenant_id     text COLLATE "C" NOT NULL,
    policy_id     text COLLATE "C" NOT NULL,
    window_start  timestamptz NOT NULL,
    threshold_bps integer NOT NULL,
    window_end    timestamptz NOT NULL,
    policy_name   text NOT NULL,
    agent_id      text,
    service       text,
    window_kind   text NOT NULL,
    enforcement   text NOT NULL,
    limit_value   numeric NOT NULL,
    -- NULL for token policies.
    currency      char(3),
    used          numeric NOT NULL,
    crossed_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz,
    PRIMARY KEY (tenant_id, policy_id, window_start, threshold_bps)
);
CREATE INDEX quota_alerts_unpublished ON quota_alerts (crossed_at) WHERE published_at IS NULL;
