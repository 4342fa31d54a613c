-- A tenant's billing zone must be one Postgres knows. Since migration 0010 ingest cuts a
-- tenant's usage into local days of that zone in the same transaction as its raw events, so a
-- zone Postgres refuses (written by hand: the API refuses zones chrono-tz does not know) would
-- fail every batch of the tenant — over Kafka, the same batch again and again.
CREATE FUNCTION is_time_zone(p_zone text) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
BEGIN
    PERFORM now() AT TIME ZONE p_zone;
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$$;

ALTER TABLE tenants
    ADD CONSTRAINT tenants_billing_timezone_known CHECK (is_time_zone(billing_timezone));
