-- Usage ingest: price books, raw events (partitioned by month), the dedup key table, conflicts
-- kept for audit, and hourly rollups.

-- ---------------------------------------------------------------------------------------------
-- Price books: immutable versions of rates; the version in force at t is the one with the
-- greatest effective_from <= t.

CREATE TABLE price_book_versions (
    version_id     text PRIMARY KEY,
    price_book_id  text NOT NULL CHECK (price_book_id ~ '^[a-z0-9._-]{1,64}$'),
    currency       char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    effective_from timestamptz NOT NULL,
    description    text NOT NULL DEFAULT '',
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (price_book_id, effective_from)
);

CREATE TABLE price_book_rates (
    version_id        text NOT NULL REFERENCES price_book_versions (version_id) ON DELETE CASCADE,
    provider          text NOT NULL,
    model             text NOT NULL,
    -- TokenClass proto number (1 = input … 10 = output_image).
    token_class       smallint NOT NULL CHECK (token_class BETWEEN 1 AND 10),
    -- Per 1M tokens. What the tenant pays / what the provider charges the platform.
    price_per_million numeric NOT NULL CHECK (price_per_million >= 0),
    cost_per_million  numeric NOT NULL CHECK (cost_per_million >= 0),
    PRIMARY KEY (version_id, provider, model, token_class)
);

-- A tenant's own rate or discount. Empty selectors mean "any" (discounts only).
CREATE TABLE tenant_price_overrides (
    override_id       text PRIMARY KEY,
    tenant_id         text NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    provider          text NOT NULL DEFAULT '',
    model             text NOT NULL DEFAULT '',
    token_class       smallint NOT NULL DEFAULT 0 CHECK (token_class BETWEEN 0 AND 10),
    price_per_million numeric CHECK (price_per_million >= 0),
    discount_percent  numeric CHECK (discount_percent > 0 AND discount_percent <= 100),
    effective_from    timestamptz NOT NULL,
    effective_to      timestamptz,
    description       text NOT NULL DEFAULT '',
    created_at        timestamptz NOT NULL DEFAULT now(),
    CHECK ((price_per_million IS NULL) <> (discount_percent IS NULL)),
    CHECK (price_per_million IS NULL OR (provider <> '' AND model <> '' AND token_class <> 0)),
    CHECK (effective_to IS NULL OR effective_to > effective_from)
);
CREATE INDEX tenant_price_overrides_by_tenant ON tenant_price_overrides (tenant_id, effective_from);

-- Every replica caches pricing in memory and re-reads it when this number moves, so a change
-- made through any replica (or by hand in SQL) is seen by all of them at their next batch.
CREATE TABLE pricing_generation (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    generation bigint NOT NULL
);
INSERT INTO pricing_generation VALUES (true, 0);

CREATE FUNCTION bump_pricing_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE pricing_generation SET generation = generation + 1;
    RETURN NULL;
END $$;

CREATE TRIGGER price_book_versions_bump AFTER INSERT OR UPDATE OR DELETE ON price_book_versions
    FOR EACH STATEMENT EXECUTE FUNCTION bump_pricing_generation();
CREATE TRIGGER price_book_rates_bump AFTER INSERT OR UPDATE OR DELETE ON price_book_rates
    FOR EACH STATEMENT EXECUTE FUNCTION bump_pricing_generation();
CREATE TRIGGER tenant_price_overrides_bump AFTER INSERT OR UPDATE OR DELETE ON tenant_price_overrides
    FOR EACH STATEMENT EXECUTE FUNCTION bump_pricing_generation();
CREATE TRIGGER tenants_bump AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION bump_pricing_generation();

-- ---------------------------------------------------------------------------------------------
-- Exactly-once: the identity (tenant_id, source, event_id) — never the timestamp — is unique
-- here. This table is deliberately not partitioned by time: Postgres has no unique index
-- across partitions, and a retry carrying another occurred_at (another month) must still hit
-- the same key. It is narrow; retention trims it by occurred_at in step with the raw partitions.
CREATE TABLE usage_event_keys (
    tenant_id    text COLLATE "C" NOT NULL,
    source       text COLLATE "C" NOT NULL,
    event_id     text COLLATE "C" NOT NULL,
    occurred_at  timestamptz NOT NULL,
    -- SHA-256 of the normalized payload: equal → DUPLICATE, different → CONFLICT.
    payload_hash bytea NOT NULL,
    PRIMARY KEY (tenant_id, source, event_id)
);
CREATE INDEX usage_event_keys_by_time ON usage_event_keys (occurred_at);

-- Raw accepted events, for audit and re-rating. Partitioned by month of occurred_at so
-- retention drops whole partitions (see ensure_usage_events_partition).
CREATE TABLE usage_events (
    tenant_id             text COLLATE "C" NOT NULL,
    source                text NOT NULL,
    event_id              text NOT NULL,
    occurred_at           timestamptz NOT NULL,
    ingested_at           timestamptz NOT NULL DEFAULT now(),
    agent_id              text NOT NULL,
    transaction_id        text,
    service               text,
    session_id            text,
    request_id            text,
    reservation_id        text,
    provider              text NOT NULL,
    model                 text NOT NULL,
    input                 bigint NOT NULL,
    cache_read            bigint NOT NULL,
    cache_write_5m        bigint NOT NULL,
    cache_write_1h        bigint NOT NULL,
    output                bigint NOT NULL,
    reasoning             bigint NOT NULL,
    input_audio           bigint NOT NULL,
    output_audio          bigint NOT NULL,
    input_image           bigint NOT NULL,
    output_image          bigint NOT NULL,
    -- UsageSource / UsageStatus proto numbers, defaults applied.
    usage_source          smallint NOT NULL,
    status                smallint NOT NULL,
    attributes            jsonb NOT NULL,
    currency              char(3) NOT NULL,
    -- Exact, unrounded; the priced classes only.
    billed_amount         numeric NOT NULL,
    cost_amount           numeric NOT NULL,
    -- Tokens of classes no rate covered (never priced as zero).
    unpriced_tokens       bigint NOT NULL,
    price_book_version_id text,
    -- 'grpc' or 'kafka'.
    channel               text NOT NULL
) PARTITION BY RANGE (occurred_at);
CREATE INDEX usage_events_by_tenant_time ON usage_events (tenant_id, occurred_at);

-- Creates the month partition holding `at` if it is missing. Replicas may race to create the
-- same month: the advisory lock serializes them and the loser's duplicate_table is ignored.
CREATE FUNCTION ensure_usage_events_partition(at timestamptz) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz := date_trunc('month', at, 'UTC');
    name text := format('usage_events_y%sm%s', to_char(month_start AT TIME ZONE 'UTC', 'YYYY'),
                        to_char(month_start AT TIME ZONE 'UTC', 'MM'));
BEGIN
    IF to_regclass(name) IS NOT NULL THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('usage_events_partitions'));
    BEGIN
        EXECUTE format('CREATE TABLE %I PARTITION OF usage_events FOR VALUES FROM (%L) TO (%L)',
                       name, month_start, month_start + interval '1 month');
    EXCEPTION WHEN duplicate_table THEN
        NULL;
    END;
END $$;

-- Same identity, different payload: not counted, kept here for audit.
CREATE TABLE usage_event_conflicts (
    tenant_id     text NOT NULL,
    source        text NOT NULL,
    event_id      text NOT NULL,
    received_at   timestamptz NOT NULL DEFAULT now(),
    payload_hash  bytea NOT NULL,
    -- The rejected event, normalized, as JSON.
    payload       jsonb NOT NULL,
    channel       text NOT NULL
);
CREATE INDEX usage_event_conflicts_by_identity ON usage_event_conflicts (tenant_id, source, event_id);

-- ---------------------------------------------------------------------------------------------
-- Hourly rollups: tenant × agent × transaction × service × provider × model × class × hour,
-- updated in the same transaction as the raw events. Absent dimensions are '' so they take
-- part in the key. Identifier columns here and in the key tables use the "C" collation: they
-- are opaque ids, and byte comparison is several times cheaper than a locale's on the
-- hottest indexes of the ingest path.
CREATE TABLE usage_rollups (
    tenant_id             text COLLATE "C" NOT NULL,
    hour                  timestamptz NOT NULL,
    agent_id              text COLLATE "C" NOT NULL,
    transaction_id        text COLLATE "C" NOT NULL,
    service               text COLLATE "C" NOT NULL,
    provider              text COLLATE "C" NOT NULL,
    model                 text COLLATE "C" NOT NULL,
    token_class           smallint NOT NULL CHECK (token_class BETWEEN 1 AND 10),
    currency              text COLLATE "C" NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    tokens                bigint NOT NULL,
    billed_amount         numeric NOT NULL,
    cost_amount           numeric NOT NULL,
    unpriced_tokens       bigint NOT NULL,
    -- Events with tokens of this class, and those of them whose class was unpriced.
    class_events          bigint NOT NULL,
    class_unpriced_events bigint NOT NULL,
    -- Distinct events: each event counts on exactly one of its rows (its first class with
    -- tokens, or input when it has none), so summing across classes never double-counts.
    events                bigint NOT NULL,
    unpriced_events       bigint NOT NULL,
    PRIMARY KEY (tenant_id, hour, agent_id, transaction_id, service, provider, model, token_class,
                 currency)
);
