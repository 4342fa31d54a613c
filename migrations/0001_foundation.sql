-- Foundation: tenants, API keys, and the Kafka offsets the consumers store beside the data.

-- The billing account. Every table that grows carries tenant_id, so a deployment can later
-- distribute by it (Citus) without a rewrite.
CREATE TABLE tenants (
    tenant_id          text PRIMARY KEY CHECK (tenant_id ~ '^[A-Za-z0-9._-]{1,64}$'),
    name               text NOT NULL,
    -- ISO 4217 code; invoices and money quotas are in this currency.
    currency           char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    -- IANA zone name; days, weeks, months and billing periods are cut in this zone.
    billing_timezone   text NOT NULL DEFAULT 'UTC',
    -- Day of month a billing period starts on (1 = calendar month; 29-31 clamp to the last
    -- day of shorter months).
    billing_anchor_day smallint NOT NULL DEFAULT 1 CHECK (billing_anchor_day BETWEEN 1 AND 31),
    -- Percent, e.g. 19 or 8.875; NULL means no tax line.
    tax_rate_percent   numeric(9, 6) CHECK (tax_rate_percent >= 0 AND tax_rate_percent <= 100),
    rounding_mode      text NOT NULL DEFAULT 'half_even'
                       CHECK (rounding_mode IN ('half_even', 'half_up', 'half_down', 'up', 'down',
                                                'ceiling', 'floor')),
    -- The price book that prices this tenant's usage; NULL means the configured default.
    price_book_id      text,
    -- A suspended tenant is denied at Reserve, but its usage is still ingested and billed.
    status             text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    labels             jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(labels) = 'object'),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- API keys are stored hashed: `prefix` is the public handle shown in listings, the secret is
-- kept only as SHA-256 (the secret is 256 random bits, so a slow password hash adds nothing).
CREATE TABLE api_keys (
    key_id      uuid PRIMARY KEY,
    prefix      text NOT NULL UNIQUE,
    secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
    name        text NOT NULL DEFAULT '',
    scopes      text[] NOT NULL
                CHECK (cardinality(scopes) > 0
                       AND scopes <@ ARRAY['ingest', 'quota', 'read', 'admin']::text[]),
    -- A platform key may act for every tenant, but only when said explicitly.
    all_tenants boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz,
    -- Approximate: refreshed at most once a minute, so authentication stays a read.
    last_used_at timestamptz
);

-- The tenants a key is bound to (ignored when all_tenants is true).
CREATE TABLE api_key_tenants (
    key_id    uuid NOT NULL REFERENCES api_keys (key_id) ON DELETE CASCADE,
    tenant_id text NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    PRIMARY KEY (key_id, tenant_id)
);
CREATE INDEX api_key_tenants_by_tenant ON api_key_tenants (tenant_id);

-- Kafka consumer positions, written in the same transaction as the events they cover; the
-- consumer seeks here on partition assignment, and Kafka's own commit is advisory only.
CREATE TABLE kafka_offsets (
    consumer_group text NOT NULL,
    topic          text NOT NULL,
    partition      integer NOT NULL CHECK (partition >= 0),
    -- The offset of the next message to read, as Kafka commits it.
    next_offset    bigint NOT NULL CHECK (next_offset >= 0),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);
