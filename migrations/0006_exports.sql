-- Finance exports: which Postgres transaction made each exported fact visible, so that an
-- export's watermark can be a snapshot (pg_current_snapshot) and "new since a watermark" is
-- decided by commit visibility, never by clocks or serial ids (see src/export/watermark.rs).
--
-- The columns are added without a default first (instant, even on the partitioned usage
-- table), then given one for new rows only. Rows older than this migration keep NULL, which
-- exports read as "visible in every snapshot": they were committed before any watermark could
-- have been taken.

ALTER TABLE usage_events ADD COLUMN ingested_xid xid8;
ALTER TABLE usage_events ALTER COLUMN ingested_xid SET DEFAULT pg_current_xact_id();

ALTER TABLE transaction_events ADD COLUMN recorded_xid xid8;
ALTER TABLE transaction_events ALTER COLUMN recorded_xid SET DEFAULT pg_current_xact_id();

ALTER TABLE invoices ADD COLUMN finalized_xid xid8, ADD COLUMN voided_xid xid8;

-- Stamps the finalizing and the voiding transaction. BEFORE triggers fire in name order, so this
-- one runs after invoices_immutable has checked the row: the guard never sees these columns
-- change (a hand-made change of them on a final invoice is still refused by it), and only the
-- two allowed transitions stamp them.
CREATE FUNCTION invoices_stamp_xids() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state = 'finalized' AND (TG_OP = 'INSERT' OR OLD.state = 'draft') THEN
        NEW.finalized_xid := pg_current_xact_id();
    ELSIF TG_OP = 'UPDATE' AND OLD.state = 'finalized' AND NEW.state = 'void' THEN
        NEW.voided_xid := pg_current_xact_id();
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER invoices_stamp_xids BEFORE INSERT OR UPDATE ON invoices
    FOR EACH ROW EXECUTE FUNCTION invoices_stamp_xids();
