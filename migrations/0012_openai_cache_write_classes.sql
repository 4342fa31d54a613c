-- Conflicting deliveries keep the first payload field in which they differ from the event that
-- won their identity (what their CONFLICT result named); NULL for those recorded before.
ALTER TABLE usage_event_conflicts ADD COLUMN first_differing_field text;
ALTER TABLE transaction_event_conflicts ADD COLUMN first_differing_field text;

-- Token classes 11 (cache_write_30m) and 12 (cache_write_12h): OpenAI's prompt-cache writes,
-- priced by retention as Anthropic's 5-minute and 1-hour writes are (proto TokenClass).
--
-- Existing data stays valid as it is: the new token columns start at 0 (a constant default, so
-- Postgres adds them without rewriting a row, finalized invoices included), and class checks
-- only widen. The attribution rollup functions of migrations 0007 and 0010 are redefined to
-- carry the new columns; nothing is recomputed.

ALTER TABLE usage_events
    ADD COLUMN cache_write_30m bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_12h bigint NOT NULL DEFAULT 0;

ALTER TABLE usage_state_rollups
    ADD COLUMN cache_write_30m bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_12h bigint NOT NULL DEFAULT 0;

ALTER TABLE usage_state_daily_rollups
    ADD COLUMN cache_write_30m bigint NOT NULL DEFAULT 0,
    ADD COLUMN cache_write_12h bigint NOT NULL DEFAULT 0;

-- The wider checks are added NOT VALID: every existing row passed the narrower one (1–10), so
-- scanning the tables (under the lock ADD CONSTRAINT takes) would prove nothing; new and
-- updated rows are checked all the same.
ALTER TABLE price_book_rates DROP CONSTRAINT price_book_rates_token_class_check,
    ADD CONSTRAINT price_book_rates_token_class_check CHECK (token_class BETWEEN 1 AND 12)
    NOT VALID;
ALTER TABLE tenant_price_overrides DROP CONSTRAINT tenant_price_overrides_token_class_check,
    ADD CONSTRAINT tenant_price_overrides_token_class_check CHECK (token_class BETWEEN 0 AND 12)
    NOT VALID;
ALTER TABLE usage_rollups DROP CONSTRAINT usage_rollups_token_class_check,
    ADD CONSTRAINT usage_rollups_token_class_check CHECK (token_class BETWEEN 1 AND 12)
    NOT VALID;
ALTER TABLE invoice_lines DROP CONSTRAINT invoice_lines_token_class_check,
    ADD CONSTRAINT invoice_lines_token_class_check CHECK (token_class BETWEEN 0 AND 12)
    NOT VALID;
ALTER TABLE invoice_billed_usage DROP CONSTRAINT invoice_billed_usage_token_class_check,
    ADD CONSTRAINT invoice_billed_usage_token_class_check CHECK (token_class BETWEEN 1 AND 12)
    NOT VALID;

-- As in 0007, with the two classes as the last columns, in the table's column order (the
-- backfill inserts `f.*`). Its result type changes, so it is dropped and created again.
DROP FUNCTION usage_state_rollups_of(text, timestamptz, text);
CREATE FUNCTION usage_state_rollups_of(p_tenant text, p_hour timestamptz, p_agent text)
RETURNS TABLE (
    tenant_id text, hour timestamptz, agent_id text, service text, provider text, model text,
    currency text, state smallint, input bigint, cache_read bigint, cache_write_5m bigint,
    cache_write_1h bigint, output bigint, reasoning bigint, input_audio bigint,
    output_audio bigint, input_image bigint, output_image bigint, billed_amount numeric,
    cost_amount numeric, events bigint, unpriced_events bigint, cache_write_30m bigint,
    cache_write_12h bigint)
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
           sum(r.unpriced_events)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 11), 0)::int8,
           coalesce(sum(r.tokens) FILTER (WHERE r.token_class = 12), 0)::int8
    FROM usage_rollups r
    LEFT JOIN transaction_states s
      ON s.tenant_id = r.tenant_id AND s.transaction_id = r.transaction_id
    WHERE r.tenant_id = p_tenant AND r.hour = p_hour AND r.agent_id = p_agent
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8
$$;

-- As in 0010, for the daily table's new row type.
CREATE OR REPLACE FUNCTION usage_state_daily_rollups_of(
    p_tenant text, p_day timestamptz, p_day_end timestamptz, p_agent text)
RETURNS SETOF usage_state_daily_rollups
LANGUAGE sql STABLE AS $$
    SELECT r.tenant_id, p_day, r.agent_id, r.service, r.provider, r.model, r.currency, r.state,
           sum(r.input)::int8, sum(r.cache_read)::int8, sum(r.cache_write_5m)::int8,
           sum(r.cache_write_1h)::int8, sum(r.output)::int8, sum(r.reasoning)::int8,
           sum(r.input_audio)::int8, sum(r.output_audio)::int8, sum(r.input_image)::int8,
           sum(r.output_image)::int8, sum(r.billed_amount), sum(r.cost_amount),
           sum(r.events)::int8, sum(r.unpriced_events)::int8, sum(r.cache_write_30m)::int8,
           sum(r.cache_write_12h)::int8
    FROM usage_state_rollups r
    WHERE r.tenant_id = p_tenant AND r.agent_id = p_agent
      AND r.hour >= p_day AND r.hour < p_day_end
    GROUP BY r.tenant_id, r.agent_id, r.service, r.provider, r.model, r.currency, r.state
$$;
