-- Billing: tiered rates, invoices (draft → finalized → void) with their lines, what each
-- finalized invoice billed per (period, rate key) for late-usage adjustments, and gap-free
-- invoice numbering.

-- ---------------------------------------------------------------------------------------------
-- Tiers. A tiered rate keeps its first tier's price in price_book_rates.price_per_million (what
-- a single event is rated at in rollups and reports); invoices apply the tiers over the period.

ALTER TABLE price_book_rates
    ADD COLUMN tier_mode text NOT NULL DEFAULT 'flat'
        CHECK (tier_mode IN ('flat', 'graduated', 'volume'));

CREATE TABLE price_book_rate_tiers (
    version_id        text NOT NULL,
    provider          text NOT NULL,
    model             text NOT NULL,
    token_class       smallint NOT NULL,
    -- 0-based position; each tier starts where the previous one ends (the first at 0).
    tier_index        smallint NOT NULL CHECK (tier_index >= 0),
    -- Exclusive upper bound in tokens of the period; NULL on the open-ended last tier.
    up_to_tokens      bigint CHECK (up_to_tokens > 0),
    price_per_million numeric NOT NULL CHECK (price_per_million >= 0),
    PRIMARY KEY (version_id, provider, model, token_class, tier_index),
    FOREIGN KEY (version_id, provider, model, token_class)
        REFERENCES price_book_rates (version_id, provider, model, token_class) ON DELETE CASCADE
);

CREATE TRIGGER price_book_rate_tiers_bump AFTER INSERT OR UPDATE OR DELETE ON price_book_rate_tiers
    FOR EACH STATEMENT EXECUTE FUNCTION bump_pricing_generation();

-- ---------------------------------------------------------------------------------------------
-- Invoices. Void is a state change of the finalized row (the row keeps every figure, gains
-- voided_at, void_reason and the id of its replacement draft), not a second row: the triggers
-- below allow exactly that one transition and nothing else once an invoice is finalized.

CREATE TABLE invoices (
    invoice_id             text PRIMARY KEY,
    tenant_id              text NOT NULL REFERENCES tenants (tenant_id),
    state                  text NOT NULL CHECK (state IN ('draft', 'finalized', 'void')),
    -- Set at finalization, e.g. INV-2026-000042.
    number                 text UNIQUE,
    period_label           text NOT NULL CHECK (period_label ~ '^[0-9]{4}-[0-9]{2}$'),
    period_start           timestamptz NOT NULL,
    period_end             timestamptz NOT NULL CHECK (period_end > period_start),
    currency               char(3) NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    currency_exponent      smallint NOT NULL CHECK (currency_exponent BETWEEN 0 AND 6),
    rounding_mode          text NOT NULL,
    -- Sums of rounded lines; a draft's are as of computed_at.
    subtotal               numeric NOT NULL DEFAULT 0,
    discount               numeric NOT NULL DEFAULT 0,
    tax                    numeric NOT NULL DEFAULT 0,
    credit                 numeric NOT NULL DEFAULT 0,
    total                  numeric NOT NULL DEFAULT 0,
    tax_rate_percent       numeric,
    unpriced_event_count   bigint NOT NULL DEFAULT 0,
    unpriced_tokens        bigint NOT NULL DEFAULT 0,
    line_count             integer NOT NULL DEFAULT 0,
    created_at             timestamptz NOT NULL DEFAULT now(),
    computed_at            timestamptz NOT NULL DEFAULT now(),
    finalized_at           timestamptz,
    voided_at              timestamptz,
    void_reason            text,
    replacement_invoice_id text REFERENCES invoices (invoice_id) DEFERRABLE INITIALLY DEFERRED,
    replaces_invoice_id    text REFERENCES invoices (invoice_id),
    CHECK ((state = 'draft') = (number IS NULL)),
    CHECK ((state = 'draft') = (finalized_at IS NULL)),
    CHECK ((state = 'void') = (voided_at IS NOT NULL AND void_reason IS NOT NULL
                               AND replacement_invoice_id IS NOT NULL))
);
-- One live (draft or finalized) invoice per tenant, period and currency: concurrent finalizers
-- and previews meet on this key.
CREATE UNIQUE INDEX invoices_one_live_per_period
    ON invoices (tenant_id, period_label, currency) WHERE state <> 'void';
CREATE INDEX invoices_by_period ON invoices (period_start DESC, tenant_id);
CREATE INDEX invoices_by_tenant ON invoices (tenant_id, period_start DESC);

CREATE TABLE invoice_lines (
    invoice_id           text NOT NULL REFERENCES invoices (invoice_id),
    tenant_id            text NOT NULL,
    line_no              integer NOT NULL CHECK (line_no >= 1),
    kind                 text NOT NULL
                         CHECK (kind IN ('usage', 'tier', 'adjustment', 'discount', 'tax', 'credit')),
    description          text NOT NULL,
    provider             text NOT NULL DEFAULT '',
    model                text NOT NULL DEFAULT '',
    token_class          smallint NOT NULL DEFAULT 0 CHECK (token_class BETWEEN 0 AND 10),
    quantity             bigint NOT NULL DEFAULT 0,
    unit_price           numeric NOT NULL DEFAULT 0,
    -- Exact, and rounded once to the currency's minor unit (the billed figure).
    precise_amount       numeric NOT NULL,
    amount               numeric NOT NULL,
    tier_from_tokens     bigint,
    tier_up_to_tokens    bigint,
    original_period_label text,
    original_period_start timestamptz,
    original_period_end   timestamptz,
    list_unit_price      numeric,
    discount_percent     numeric,
    tax_rate_percent     numeric,
    base_amount          numeric,
    price_book_version_id text,
    override_id          text,
    PRIMARY KEY (invoice_id, line_no)
);

-- What each finalized invoice billed per (period, rate key): its own period's usage and the
-- differences it billed for earlier periods. Σ over the non-void invoices is what a period has
-- been billed, so late usage is billed as (usage now − that), once.
CREATE TABLE invoice_billed_usage (
    invoice_id   text NOT NULL REFERENCES invoices (invoice_id),
    tenant_id    text NOT NULL,
    currency     char(3) NOT NULL,
    period_label text NOT NULL,
    provider     text NOT NULL,
    model        text NOT NULL,
    token_class  smallint NOT NULL CHECK (token_class BETWEEN 1 AND 10),
    quantity     bigint NOT NULL,
    -- Exact, net of discounts.
    amount       numeric NOT NULL,
    PRIMARY KEY (invoice_id, period_label, provider, model, token_class)
);
CREATE INDEX invoice_billed_usage_by_period ON invoice_billed_usage (tenant_id, period_label);

-- Gap-free numbering: the finalizing transaction increments this row, so concurrent finalizers
-- (any replica) queue on its lock and a rolled-back finalization gives its numbers back.
-- Sequences are not used: they never roll back, so they leave gaps.
CREATE TABLE invoice_number_counters (
    issuer      text NOT NULL,
    year        integer NOT NULL,
    last_number bigint NOT NULL CHECK (last_number >= 0),
    PRIMARY KEY (issuer, year)
);

-- ---------------------------------------------------------------------------------------------
-- Immutability, enforced here and not only in code.

CREATE FUNCTION invoices_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    void_columns text[] := ARRAY['state', 'voided_at', 'void_reason', 'replacement_invoice_id'];
BEGIN
    IF OLD.state = 'draft' THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    IF TG_OP = 'UPDATE' AND OLD.state = 'finalized' AND NEW.state = 'void'
       AND to_jsonb(NEW) - void_columns = to_jsonb(OLD) - void_columns THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'invoice % is %: finalized invoices are immutable (only finalized -> void is allowed)',
        OLD.invoice_id, OLD.state
        USING ERRCODE = 'integrity_constraint_violation';
END $$;

CREATE TRIGGER invoices_immutable BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION invoices_guard();

-- Lines and billed usage may change only while their invoice is a draft.
CREATE FUNCTION invoice_children_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM invoices WHERE invoice_id = OLD.invoice_id AND state <> 'draft') THEN
        RAISE EXCEPTION '% of invoice % cannot change: the invoice is final', TG_TABLE_NAME, OLD.invoice_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END $$;

-- Inserts are checked once per statement (finalization inserts thousands of rows at a time).
CREATE FUNCTION invoice_children_insert_guard() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    final_id text;
BEGIN
    SELECT i.invoice_id INTO final_id
    FROM (SELECT DISTINCT invoice_id FROM new_rows) n JOIN invoices i USING (invoice_id)
    WHERE i.state <> 'draft' LIMIT 1;
    IF final_id IS NOT NULL THEN
        RAISE EXCEPTION '% cannot be added to invoice %: the invoice is final', TG_TABLE_NAME, final_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;

CREATE FUNCTION invoices_no_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% holds finalized invoices and cannot be truncated', TG_TABLE_NAME
        USING ERRCODE = 'integrity_constraint_violation';
END $$;

CREATE TRIGGER invoice_lines_immutable BEFORE UPDATE OR DELETE ON invoice_lines
    FOR EACH ROW EXECUTE FUNCTION invoice_children_guard();
CREATE TRIGGER invoice_lines_insert AFTER INSERT ON invoice_lines
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION invoice_children_insert_guard();
CREATE TRIGGER invoice_billed_usage_immutable BEFORE UPDATE OR DELETE ON invoice_billed_usage
    FOR EACH ROW EXECUTE FUNCTION invoice_children_guard();
CREATE TRIGGER invoice_billed_usage_insert AFTER INSERT ON invoice_billed_usage
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION invoice_children_insert_guard();
CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION invoices_no_truncate();
CREATE TRIGGER invoice_lines_no_truncate BEFORE TRUNCATE ON invoice_lines
    FOR EACH STATEMENT EXECUTE FUNCTION invoices_no_truncate();
CREATE TRIGGER invoice_billed_usage_no_truncate BEFORE TRUNCATE ON invoice_billed_usage
    FOR EACH STATEMENT EXECUTE FUNCTION invoices_no_truncate();
