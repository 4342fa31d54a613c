#!/usr/bin/env bash
# The write floor (issues 3 and 4): how fast can Postgres on this machine take usage at all, with
# no tokenmeter, no client and no Kafka in the way? Every variant runs inside Postgres on rows it
# generated itself (loadgen-shaped: 100 tenants, 60 % of events on one of events/8 transactions,
# two token classes, 5 % exact resends in later batches), in batches of BATCH events, one
# transaction per batch, two sessions in parallel, each owning half of the tenants (as the
# ingest writers and Kafka lanes do). Against them: a binary COPY of the same rows into the
# same empty table of a fresh database, in the same run (copy_baseline of benches/lib.sh).
#
#   as shipped     dedup-key insert + raw rows of the keys it inserted + the hourly rollup upsert,
#                  with the indexes the migrations create
#   primary keys   the same without the secondary indexes of the key and rollup tables
#                  (usage_event_keys_by_time, usage_rollups_by_transaction)
#   rollup deltas  the rollups appended per batch to an unindexed table instead of upserted, and
#                  summed into usage_rollups once at the end (timed with the rest)
#   exactly-once   dedup-key insert + raw rows only: no rollups at all
#
# Everything the service does besides — decoding, validation, hashing, pricing, conflicts, the
# attribution rollups, quota counters, Kafka offsets, the network — is left out, so each figure is
# an upper bound on what the service can reach here with these guarantees.
#
#   benches/write_floor.sh
#
# Environment (all optional): EVENTS=1000000 BATCH=5000 SKIP_BUILD=1 KEEP_DATABASES=1
# Figures are kept under target/bench/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  cargo build --locked --release --bin tokenmeter
fi
# shellcheck source=benches/lib.sh
source benches/lib.sh

events="${EVENTS:-1000000}"
batch="${BATCH:-5000}"
db="tm_bench_floor_$(date +%s)_$$"
create_db "$db"
url="$(url_for "$db")"
TOKENMETER_DATABASE__URL="$url" tm migrate >/dev/null

log "generating $events events and 5 % resends inside Postgres"
psql_q "$url" -v events="$events" -v batch="$batch" <<'SQL'
CREATE UNLOGGED TABLE floor_unique AS
SELECT i AS seq, t AS tenant, 'tenant-' || lpad(t::text, 3, '0') AS tenant_id, 'bench' AS source,
       gen_random_uuid()::text AS event_id,
       date_trunc('second', now()) - (random() * interval '1 hour') AS occurred_at,
       x AS transaction, random() < 0.6 AS with_transaction, m AS model_index,
       100 + (random() * 4900)::bigint AS input, 10 + (random() * 1990)::bigint AS output
FROM generate_series(1, :events) i,
     LATERAL (SELECT (random() * 99)::int AS t, (random() * (:events / 800))::int AS x,
                     (random() * 2)::int AS m, i AS dependency) r;

-- Each shard (tenant parity) is cut into batches of its own; resends land in a later batch of
-- the same shard, as a producer's retry does.
CREATE UNLOGGED TABLE floor_events AS
WITH ranked AS (
    SELECT u.*, tenant % 2 AS shard,
           row_number() OVER (PARTITION BY tenant % 2 ORDER BY random()) - 1 AS position
    FROM floor_unique u
), placed AS (
    SELECT *, shard + 2 * (position / :batch) AS batch FROM ranked
), last_batches AS (
    SELECT shard, max(batch) AS last_batch FROM placed GROUP BY shard
), resends AS (
    SELECT p.*, l.last_batch FROM placed p JOIN last_batches l USING (shard)
    WHERE random() < 0.05
)
SELECT tenant_id, source, event_id, occurred_at, transaction, with_transaction, model_index,
       input, output, batch
FROM placed
UNION ALL
SELECT tenant_id, source, event_id, occurred_at, transaction, with_transaction, model_index,
       input, output,
       batch + 2 * (random() * ((last_batch - batch) / 2))::bigint
FROM resends;
DROP TABLE floor_unique;
CREATE INDEX ON floor_events (batch);
ANALYZE floor_events;

-- The rows as usage_events holds them (unpriced, as loadgen's events are without a price book).
CREATE VIEW floor_rows AS
SELECT tenant_id, source, event_id, occurred_at,
       'agent-' || (transaction % 10) AS agent_id,
       CASE WHEN with_transaction THEN 'tx-t' || tenant_id || '-' || transaction END AS transaction_id,
       CASE WHEN with_transaction THEN 'svc-' || (transaction % 5) END AS service,
       NULL::text AS session_id, 'chatcmpl-' || left(md5(event_id), 16) AS request_id,
       NULL::text AS reservation_id,
       (ARRAY['openai', 'anthropic', 'google'])[model_index + 1] AS provider,
       (ARRAY['gpt-4o', 'claude-sonnet-4', 'gemini-2.5-pro'])[model_index + 1] AS model,
       input, 0::bigint AS cache_read, 0::bigint AS cache_write_5m, 0::bigint AS cache_write_1h,
       output, 0::bigint AS reasoning, 0::bigint AS input_audio, 0::bigint AS output_audio,
       0::bigint AS input_image, 0::bigint AS output_image, 1::smallint AS usage_source,
       1::smallint AS status, '{}'::jsonb AS attributes, 'USD'::char(3) AS currency,
       0::numeric AS billed_amount, 0::numeric AS cost_amount,
       input + output AS unpriced_tokens, NULL::text AS price_book_version_id, 'kafka' AS channel,
       sha256(convert_to(event_id, 'UTF8')) AS payload_hash, batch
FROM floor_events;

-- Rollups appended as per-batch deltas, summed into usage_rollups later (the compaction).
CREATE TABLE usage_rollup_deltas (LIKE usage_rollups);

-- rollups: 'upsert' (as shipped), 'append' (deltas) or 'none'.
CREATE PROCEDURE floor_write(first_batch bigint, rollups text) LANGUAGE plpgsql AS $$
DECLARE
    b bigint;
    last_batch bigint := (SELECT max(batch) FROM floor_events);
BEGIN
    FOR b IN SELECT generate_series(first_batch, last_batch, 2) LOOP
        WITH keys AS (
            INSERT INTO usage_event_keys (tenant_id, source, event_id, occurred_at, payload_hash)
            SELECT DISTINCT ON (tenant_id, source, event_id)
                   tenant_id, source, event_id, occurred_at, payload_hash
            FROM floor_rows WHERE batch = b ORDER BY tenant_id, source, event_id
            ON CONFLICT DO NOTHING
            RETURNING tenant_id, source, event_id
        ), raw AS (
            INSERT INTO usage_events (tenant_id, source, event_id, occurred_at, agent_id,
                transaction_id, service, session_id, request_id, reservation_id, provider, model,
                input, cache_read, cache_write_5m, cache_write_1h, output, reasoning, input_audio,
                output_audio, input_image, output_image, usage_source, status, attributes,
                currency, billed_amount, cost_amount, unpriced_tokens, price_book_version_id,
                channel)
            SELECT DISTINCT ON (r.tenant_id, r.source, r.event_id)
                   r.tenant_id, r.source, r.event_id, r.occurred_at, r.agent_id,
                   r.transaction_id, r.service, r.session_id, r.request_id, r.reservation_id,
                   r.provider, r.model, r.input, r.cache_read, r.cache_write_5m,
                   r.cache_write_1h, r.output, r.reasoning, r.input_audio, r.output_audio,
                   r.input_image, r.output_image, r.usage_source, r.status, r.attributes,
                   r.currency, r.billed_amount, r.cost_amount, r.unpriced_tokens,
                   r.price_book_version_id, r.channel
            FROM floor_rows r JOIN keys USING (tenant_id, source, event_id)
            WHERE r.batch = b
            RETURNING tenant_id, occurred_at, agent_id, transaction_id, service, provider, model,
                      currency, input, output
        ), by_key AS (
            SELECT a.tenant_id, date_trunc('hour', a.occurred_at, 'UTC') AS hour, a.agent_id,
                   coalesce(a.transaction_id, '') AS transaction_id,
                   coalesce(a.service, '') AS service, a.provider, a.model,
                   c.class AS token_class, a.currency, sum(c.tokens) AS tokens, 0 AS billed_amount,
                   0 AS cost_amount, sum(c.tokens) AS unpriced_tokens, count(*) AS class_events,
                   count(*) AS class_unpriced_events,
                   count(*) FILTER (WHERE c.class = 1) AS events,
                   count(*) FILTER (WHERE c.class = 1) AS unpriced_events
            FROM raw a CROSS JOIN LATERAL (VALUES (1::smallint, a.input),
                                                  (5::smallint, a.output)) c (class, tokens)
            GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
        ), appended AS (
            INSERT INTO usage_rollup_deltas SELECT * FROM by_key WHERE rollups = 'append'
        )
        -- A data-modifying CTE runs in full whether or not its rows are read: without rollups
        -- this statement still writes the keys and the raw rows.
        INSERT INTO usage_rollups AS r (tenant_id, hour, agent_id, transaction_id, service,
            provider, model, token_class, currency, tokens, billed_amount, cost_amount,
            unpriced_tokens, class_events, class_unpriced_events, events, unpriced_events)
        SELECT * FROM by_key WHERE rollups = 'upsert' ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9
        ON CONFLICT (tenant_id, hour, agent_id, transaction_id, service, provider, model,
                     token_class, currency)
        DO UPDATE SET tokens = r.tokens + excluded.tokens,
                      unpriced_tokens = r.unpriced_tokens + excluded.unpriced_tokens,
                      class_events = r.class_events + excluded.class_events,
                      class_unpriced_events = r.class_unpriced_events + excluded.class_unpriced_events,
                      events = r.events + excluded.events,
                      unpriced_events = r.unpriced_events + excluded.unpriced_events;
        COMMIT;
    END LOOP;
END $$;
SQL

messages="$(psql_q "$url" -c 'SELECT count(*) FROM floor_events')"
unique="$(psql_q "$url" -c 'SELECT count(DISTINCT event_id) FROM floor_events')"
months="$(psql_q "$url" -c "SELECT DISTINCT date_trunc('month', occurred_at, 'UTC') FROM floor_events")"
while read -r month; do
  psql_q "$url" -c "SELECT ensure_usage_events_partition('$month')" >/dev/null
done <<<"$months"

# Every variant starts from empty tables and, where the role may, a checkpoint (so each pays the
# same full-page writes after it).
reset_tables() {
  psql_q "$url" -c 'TRUNCATE usage_event_keys, usage_events, usage_rollups, usage_rollup_deltas' \
    -c 'VACUUM ANALYZE usage_event_keys, usage_events, usage_rollups, usage_rollup_deltas'
  psql_q "$url" -c 'CHECKPOINT' >/dev/null 2>&1 || true
}
seconds_since() { awk -v s="$1" -v e="$(date +%s.%N)" 'BEGIN {printf "%.2f", e - s}'; }

# run_variant NAME ROLLUPS: both sessions in parallel, then (ROLLUPS = append) the compaction of
# the deltas into usage_rollups, timed with them; checks what they stored.
results=()
run_variant() {
  local name="$1" rollups="$2" start elapsed eps stored rolled first second
  reset_tables
  start="$(date +%s.%N)"
  psql_q "$url" -c "CALL floor_write(0, '$rollups')" &
  first=$!
  psql_q "$url" -c "CALL floor_write(1, '$rollups')" &
  second=$!
  wait "$first" && wait "$second" || die "variant $name failed"
  if [[ "$rollups" == append ]]; then
    psql_q "$url" -c "INSERT INTO usage_rollups
        SELECT tenant_id, hour, agent_id, transaction_id, service, provider, model, token_class,
               currency, sum(tokens), sum(billed_amount), sum(cost_amount), sum(unpriced_tokens),
               sum(class_events), sum(class_unpriced_events), sum(events), sum(unpriced_events)
        FROM usage_rollup_deltas GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9 ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9" \
      -c 'TRUNCATE usage_rollup_deltas'
  fi
  elapsed="$(seconds_since "$start")"
  stored="$(psql_q "$url" -c 'SELECT count(*) FROM usage_events')"
  [[ "$stored" == "$unique" ]] || die "variant $name stored $stored rows, not $unique"
  if [[ "$rollups" != none ]]; then
    rolled="$(psql_q "$url" -c "SELECT (SELECT sum(tokens) FROM usage_rollups) = (SELECT sum(input + output) FROM usage_events)")"
    [[ "$rolled" == t ]] || die "variant $name: rollup tokens differ from the raw rows"
  fi
  eps="$(awk -v n="$messages" -v s="$elapsed" 'BEGIN {printf "%.0f", n / s}')"
  results+=("$name|$elapsed|$eps")
}

run_variant "as shipped: keys + raw + rollup upsert" upsert
psql_q "$url" -c 'DROP INDEX usage_event_keys_by_time' -c 'DROP INDEX usage_rollups_by_transaction'
run_variant "keys + raw + rollup upsert (primary keys only)" upsert
run_variant "keys + raw + rollup deltas, compacted at end" append
run_variant "exactly-once: keys + raw (primary key)" none

# The COPY baseline, as the end-to-end benchmarks take it: the unique rows the last variant
# stored, copied into usage_events of a freshly migrated database.
copy_baseline "$url" "${db}_copy"
[[ "$copied_rows" == "$unique" ]] || die "the COPY baseline copied $copied_rows rows, not $unique"

report="$out_dir/write_floor-$stamp.txt"
{
  echo "==== tokenmeter write floor: Postgres alone, rows generated inside it ===="
  echo "date      $stamp"
  echo "commit    $commit"
  echo "machine   $machine"
  echo "postgres  $pg_version (deploy/local/postgres.sh settings)"
  echo "events    $messages messages ($unique unique + $((messages - unique)) resends), batches of $batch, 2 sessions"
  echo "COPY      $copied_rows rows in $copy_s s = $copy_rps rows/s (binary, same table, empty)"
  for result in "${results[@]}"; do
    IFS='|' read -r name elapsed eps <<<"$result"
    printf '%-46s %8s s  %9s events/s  ratio to COPY %s\n' "$name" "$elapsed" "$eps" \
      "$(awk -v e="$eps" -v c="$copy_rps" 'BEGIN {printf "%.3f", e / c}')"
  done
  echo "load avg  $(cut -d' ' -f1-3 /proc/loadavg) (after)"
} | tee "$report"
log "kept $report"
