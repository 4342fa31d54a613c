#!/usr/bin/env bash
# Attribution report benchmark (DESIGN §7, issue 7): one tenant-month of 10M usage events —
# the worst case, every event belongs to the one tenant — with 500k service transactions
# (completed, refunded, reversed, failed, open), seeded with SQL into the real tables of a fresh
# database, then GetAttribution for that tenant-month called CALLS times per report shape over
# gRPC, one call at a time, by a load process (examples/attribution_latency.rs) against a
# release `tokenmeter serve`. Prints p50 / p99 / max per shape and the machine.
#
#   benches/attribution.sh                 # seeding takes several minutes on 2 cores
#
# The seed (SQL, no ingest) writes what the pipeline writes for such traffic: raw rows in
# usage_events (in their month partition) and usage_event_keys, rollups in usage_rollups
# aggregated from the same calls exactly as the ingest rolls them up (one row per tenant × hour
# × agent × transaction × service × provider × model × class × currency; priced per class with
# the seeded price book; `events` on the input row), lifecycle rows in transaction_events, and
# then transaction_states, usage_state_rollups, the lifecycle rollups and their daily
# counterparts by the backfill functions of migrations 0007, 0008 and 0010.
# Shape of the month (the last whole calendar month, UTC):
#   - 500k transactions over 20 agents and 5 services, started uniformly over the month; each
#     has 19 model calls 90 s apart on one or two of four models (OpenAI and Anthropic, one with
#     reasoning), every call with input and output tokens, two in three with cache reads;
#   - outcomes: 65 % completed, 10 % completed then partly refunded, 2 % completed then
#     reversed, 15 % failed, 8 % still open;
#   - 500k more calls on no transaction (half with a service), spread over the month.
#
# Environment (all optional):
#   TRANSACTIONS=500000  CALLS_PER_TRANSACTION=19  STRAY_CALLS=500000  CALLS=50 (per shape)
#   SHAPES="day:agent,service none:"  (see examples/attribution_latency.rs)
#   RAW_EVENTS=1 (0: seed only what the report reads — rollups and lifecycle — saving ~5 GB)
#   KEEP_DATABASES=1 (keep the database)  SKIP_BUILD=1 (use the existing binaries)
#   BENCH_DB=<kept database> (measure again without seeding, e.g. before and after a change)
#   BENCH_DATABASE_URL (a maintenance database of the Postgres to use)
#
# Exit status: non-zero if anything fails or the report disagrees with the seeded totals;
# missing the target is reported, not fatal. Figures are kept under target/bench/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TRANSACTIONS="${TRANSACTIONS:-500000}"
CALLS_PER_TRANSACTION="${CALLS_PER_TRANSACTION:-19}"
STRAY_CALLS="${STRAY_CALLS:-500000}"
CALLS="${CALLS:-50}"
RAW_EVENTS="${RAW_EVENTS:-1}"
SHAPES="${SHAPES:-day:agent,service none:}"
TARGET_P99_MS=100
BENCH_NEEDS_KAFKA=0

# shellcheck source=benches/lib.sh
source benches/lib.sh
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  cargo build --release --locked --example attribution_latency
fi
latency_bin=target/release/examples/attribution_latency
[[ -x "$latency_bin" ]] || die "$latency_bin is missing; build it with cargo build --release --example attribution_latency"

figures_txt="$out_dir/attribution-$stamp.txt"
bench_db="${BENCH_DB:-tm_bench_attr_$(date +%s)_$$}"
bench_url="$(url_for "$bench_db")"
if [[ -n "${BENCH_DB:-}" ]]; then
  # A database a previous run kept (KEEP_DATABASES=1), seeded with the same settings: migrated
  # again (so a new migration is measured too), not re-seeded and not dropped.
  psql_q "$bench_url" -c 'SELECT calls FROM bench_expected' >/dev/null \
    || die "BENCH_DB=$bench_db is not a database this benchmark seeded"
fi
[[ -n "${BENCH_DB:-}" ]] || create_db "$bench_db"
TOKENMETER_DATABASE__URL="$bench_url" TOKENMETER_LOG__FILTER=warn tm migrate

tenant=bench-attr
period_start="$(date -u -d "$(date -u +%Y-%m-01) -1 month" +%Y-%m-01T00:00:00Z)"
period_end="$(date -u +%Y-%m-01T00:00:00Z)"
usage_events=$((TRANSACTIONS * CALLS_PER_TRANSACTION + STRAY_CALLS))
seed_started=$(date +%s.%N)
if [[ -z "${BENCH_DB:-}" ]]; then
log "seeding $usage_events usage events and $TRANSACTIONS transactions of tenant $tenant in [$period_start, $period_end)"
psql_q "$bench_url" <<SQL
SET work_mem = '512MB';
SET maintenance_work_mem = '1GB';
INSERT INTO price_book_versions (version_id, price_book_id, currency, effective_from)
VALUES ('bench-v1', 'default', 'USD', timestamptz '$period_start' - interval '1 year');
-- Four models of two providers; rates per class = base × factor (cost), with 25 % markup (price).
CREATE TEMP TABLE bench_models (m int, provider text, model text, reasoning bool, base numeric);
INSERT INTO bench_models VALUES (0, 'openai', 'gpt-4.1-mini', false, 0.40),
    (1, 'openai', 'o4-mini', true, 1.10), (2, 'anthropic', 'claude-sonnet-4-5', false, 3.00),
    (3, 'anthropic', 'claude-haiku-4-5', false, 1.00);
INSERT INTO price_book_rates (version_id, provider, model, token_class, price_per_million, cost_per_million)
SELECT 'bench-v1', b.provider, b.model, c.class, b.base * c.factor * 1.25, b.base * c.factor
FROM bench_models b
CROSS JOIN (VALUES (1::int2, 1.0), (2::int2, 0.25), (5::int2, 4.0), (6::int2, 4.0)) AS c(class, factor)
WHERE c.class <> 6 OR b.reasoning;
INSERT INTO tenants (tenant_id, name, currency, created_at)
VALUES ('$tenant', 'attribution bench', 'USD', timestamptz '$period_start' - interval '30 days');
SELECT ensure_usage_events_partition(timestamptz '$period_start');

-- Transactions: start, agent, service and outcome by number (outcome = t % 100).
CREATE TEMP TABLE bench_tx AS
SELECT t, format('txn-%s', lpad(t::text, 7, '0')) AS transaction_id,
       format('agent-%s', lpad((t % 20)::text, 2, '0')) AS agent_id,
       (ARRAY['food-delivery', 'travel-booking', 'customer-support', 'grocery', 'rides'])[t % 20 % 5 + 1] AS service,
       timestamptz '$period_start'
         + ((t::bigint * 7919) % $TRANSACTIONS) * (extract(epoch FROM (timestamptz '$period_end' - timestamptz '$period_start')) - 6 * 3600)
           / $TRANSACTIONS * interval '1 second' AS started_at,
       t % 100 AS outcome,
       (500 + (t::bigint * 104729) % 9500) / 100.0 AS revenue
FROM generate_series(0, $TRANSACTIONS - 1) AS t;

-- Raw usage, as the ingest stores it (priced per class with the book above).
CREATE TEMP TABLE bench_calls AS
SELECT format('call-%s-%s', x.transaction_id, k) AS event_id, x.started_at + k * interval '90 seconds' AS occurred_at,
       x.agent_id, x.transaction_id, x.service, (x.t + k / 10) % 4 AS m,
       1000 + (x.t::bigint * 31 + k * 7) % 9000 AS input,
       CASE WHEN (x.t + k) % 3 = 0 THEN 0 ELSE 2000 + (x.t::bigint * 17 + k * 13) % 30000 END AS cache_read,
       150 + (x.t::bigint * 11 + k * 29) % 1500 AS output, (x.t::bigint * 5 + k * 3) % 4000 AS reasoning_raw
FROM bench_tx x CROSS JOIN generate_series(0, $CALLS_PER_TRANSACTION - 1) AS k
UNION ALL
SELECT format('stray-%s', s), timestamptz '$period_start'
         + s * (extract(epoch FROM (timestamptz '$period_end' - timestamptz '$period_start')) - 60) / $STRAY_CALLS * interval '1 second',
       format('agent-%s', lpad((s % 20)::text, 2, '0')), NULL,
       CASE WHEN s % 2 = 0 THEN (ARRAY['food-delivery', 'travel-booking', 'customer-support', 'grocery', 'rides'])[s % 20 % 5 + 1] END,
       s % 4, 800 + s % 5000, 0, 100 + s % 700, s % 2000
FROM generate_series(0, $STRAY_CALLS - 1) AS s;
-- Rollups, as the ingest builds them from these calls (priced per class with the book above).
INSERT INTO usage_rollups (tenant_id, hour, agent_id, transaction_id, service, provider, model,
    token_class, currency, tokens, billed_amount, cost_amount, unpriced_tokens, class_events,
    class_unpriced_events, events, unpriced_events)
SELECT '$tenant', date_trunc('hour', c.occurred_at, 'UTC'), c.agent_id, coalesce(c.transaction_id, ''),
       coalesce(c.service, ''), b.provider, b.model, v.class, 'USD', sum(v.n),
       sum(v.n * r.price_per_million * 0.000001), sum(v.n * r.cost_per_million * 0.000001), 0, count(*), 0,
       count(*) FILTER (WHERE v.class = 1), 0
FROM bench_calls c
JOIN bench_models b ON b.m = c.m
CROSS JOIN LATERAL (VALUES (1::int2, c.input), (2::int2, c.cache_read), (5::int2, c.output),
                           (6::int2, CASE WHEN b.reasoning THEN c.reasoning_raw ELSE 0 END)) AS v(class, n)
JOIN price_book_rates r ON r.version_id = 'bench-v1' AND r.provider = b.provider AND r.model = b.model
                       AND r.token_class = v.class
WHERE v.n > 0
GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9;

-- The raw rows and dedup keys of the same calls (RAW_EVENTS=1), billed per event.
INSERT INTO usage_events (tenant_id, source, event_id, occurred_at, ingested_at, agent_id,
    transaction_id, service, provider, model, input, cache_read, cache_write_5m, cache_write_1h,
    output, reasoning, input_audio, output_audio, input_image, output_image, usage_source, status,
    attributes, currency, billed_amount, cost_amount, unpriced_tokens, price_book_version_id, channel)
SELECT '$tenant', 'bench-gateway', c.event_id, c.occurred_at, c.occurred_at + interval '2 seconds',
       c.agent_id, c.transaction_id, c.service, b.provider, b.model, c.input, c.cache_read, 0, 0,
       c.output, CASE WHEN b.reasoning THEN c.reasoning_raw ELSE 0 END, 0, 0, 0, 0, 1, 1, '{}'::jsonb, 'USD',
       (c.input + c.cache_read * 0.25 + c.output * 4.0 + CASE WHEN b.reasoning THEN c.reasoning_raw * 4.0 ELSE 0 END)
         * b.base * 1.25 * 0.000001,
       (c.input + c.cache_read * 0.25 + c.output * 4.0 + CASE WHEN b.reasoning THEN c.reasoning_raw * 4.0 ELSE 0 END)
         * b.base * 0.000001,
       0, 'bench-v1', 'kafka'
FROM bench_calls c JOIN bench_models b ON b.m = c.m
WHERE $RAW_EVENTS = 1;
INSERT INTO usage_event_keys (tenant_id, source, event_id, occurred_at, payload_hash)
SELECT tenant_id, source, event_id, occurred_at, sha256(convert_to(event_id, 'UTF8')) FROM usage_events;

-- What the reports must add up to, from the calls themselves.
CREATE TABLE bench_expected AS
SELECT count(*) AS calls,
       sum(c.input + c.cache_read + c.output + CASE WHEN b.reasoning THEN c.reasoning_raw ELSE 0 END) AS tokens,
       sum((c.input + c.cache_read * 0.25 + c.output * 4.0 + CASE WHEN b.reasoning THEN c.reasoning_raw * 4.0 ELSE 0 END)
           * b.base * 1.25 * 0.000001) AS spend
FROM bench_calls c JOIN bench_models b ON b.m = c.m;
DROP TABLE bench_calls;

-- Lifecycle: started; completed 30 min later (revenue) unless failed (30 min) or open; a
-- partial refund 2 h after completion; a reversal 5 h after it.
INSERT INTO transaction_events (tenant_id, source, event_id, transaction_id, kind, occurred_at,
    agent_id, service, amount, currency, reason, attributes, payload_hash, channel)
SELECT '$tenant', 'bench-shop', format('%s-%s', x.transaction_id, e.kind), x.transaction_id, e.kind,
       x.started_at + e.after, x.agent_id, x.service, e.amount, CASE WHEN e.amount IS NOT NULL THEN 'USD' END,
       '', '{}'::jsonb, sha256(convert_to(x.transaction_id || e.kind, 'UTF8')), 'kafka'
FROM bench_tx x
CROSS JOIN LATERAL (VALUES
    (1::int2, interval '0', NULL::numeric, true),
    (2::int2, interval '30 minutes', x.revenue, x.outcome < 77),
    (4::int2, interval '150 minutes', round(x.revenue * 0.3, 2), x.outcome BETWEEN 65 AND 74),
    (5::int2, interval '330 minutes', NULL::numeric, x.outcome BETWEEN 75 AND 76),
    (3::int2, interval '30 minutes', NULL::numeric, x.outcome BETWEEN 77 AND 91)
) AS e(kind, after, amount, included)
WHERE e.included;

-- Transaction states, the usage rollup by state and the lifecycle rollups, by the functions
-- migrations 0007 and 0008 fill them with on an upgraded database (ingest keeps them as it
-- writes usage_rollups and transaction_events).
SELECT backfill_usage_state_rollups();
SELECT backfill_lifecycle_rollups();
SELECT backfill_daily_attribution_rollups();

-- A month that has ended is old data: vacuumed (hint bits set) and analyzed, as in production.
VACUUM (ANALYZE) usage_rollups; VACUUM (ANALYZE) transaction_events; VACUUM (ANALYZE) usage_events;
VACUUM (ANALYZE) usage_event_keys; VACUUM (ANALYZE) transaction_states;
VACUUM (ANALYZE) usage_state_rollups; VACUUM (ANALYZE) lifecycle_contributions;
VACUUM (ANALYZE) lifecycle_rollups; VACUUM (ANALYZE) lifecycle_rollup_pairs; ANALYZE tenants;
VACUUM (ANALYZE) usage_state_daily_rollups; VACUUM (ANALYZE) lifecycle_daily_rollups;
VACUUM (ANALYZE) lifecycle_daily_rollup_pairs;
SQL
fi
if [[ -n "${BENCH_DB:-}" ]]; then
  seeded="reused from an earlier run"
else
  seeded="seeded in $(echo "$(date +%s.%N) - $seed_started" | bc | xargs printf '%.0f') s"
fi
read -r seeded_calls raw_rows rollup_events rollup_rows lifecycle_rows state_events state_rows <<<"$(psql_q "$bench_url" -F ' ' -c "
  SELECT (SELECT calls FROM bench_expected), (SELECT count(*) FROM usage_events),
         (SELECT sum(events) FROM usage_rollups), (SELECT count(*) FROM usage_rollups),
         (SELECT count(*) FROM transaction_events), (SELECT sum(events) FROM usage_state_rollups),
         (SELECT count(*) FROM usage_state_rollups)")"
[[ "$seeded_calls" == "$usage_events" && "$rollup_events" == "$usage_events" && "$state_events" == "$usage_events" ]] \
  || die "seeded $seeded_calls calls, $rollup_events in rollups, $state_events in state rollups; expected $usage_events"
[[ "$RAW_EVENTS" != 1 || "$raw_rows" == "$usage_events" ]] || die "seeded $raw_rows raw rows, expected $usage_events"
db_size="$(psql_q "$bench_url" -c "SELECT pg_size_pretty(pg_database_size(current_database()))")"
log "$seeded: $usage_events usage events ($raw_rows raw rows), $rollup_rows rollup rows, $state_rows state rollup rows, $lifecycle_rows lifecycle events ($db_size)"

# What the ungrouped report must say, straight from the seeded rows (a reversed transaction
# has no refund in this seed, so it takes back its whole revenue).
read -r want_completed want_tokens want_spend want_net <<<"$(psql_q "$bench_url" -F ' ' -c "
  SELECT (SELECT count(*) FROM transaction_events WHERE kind = 2),
         (SELECT tokens FROM bench_expected),
         (SELECT spend FROM bench_expected),
         (SELECT sum(amount) FILTER (WHERE kind = 2) - sum(amount) FILTER (WHERE kind = 4)
                 - (SELECT coalesce(sum(c.amount), 0) FROM transaction_events c
                    JOIN transaction_events v ON v.transaction_id = c.transaction_id AND v.kind = 5
                    WHERE c.kind = 2)
          FROM transaction_events)")"

# --- the measured run ------------------------------------------------------------------------
api_key="bench-attribution-key-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
server_log="$out_dir/attribution-serve-$stamp.log"
GRPC_PORT="$(free_port)"
start_server TOKENMETER_DATABASE__URL="$bench_url" TOKENMETER_KAFKA__ENABLED=false \
  TOKENMETER_AUTH__BOOTSTRAP_ADMIN_KEY="$api_key"
grpc_url="http://127.0.0.1:$GRPC_PORT"
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
log "calling GetAttribution $CALLS times per shape ($SHAPES) at $grpc_url"
# shellcheck disable=SC2086 # SHAPES is a list
results="$(TOKENMETER_API_KEY="$api_key" "$latency_bin" "$grpc_url" "$tenant" "$period_start" "$period_end" "$CALLS" $SHAPES)"
server_rss="$(rss_kib "$server_pid" VmHWM)"

# --- checks -------------------------------------------------------------------------------------
ungrouped="$(awk -F'\t' '$1 == "none:" {print $7}' <<<"$results")"
if [[ -n "$ungrouped" ]]; then
  for want in "completed=$want_completed " "tokens=$want_tokens "; do
    [[ "$ungrouped " == *"$want"* ]] || die "the ungrouped report disagrees with the seed: want $want, got $ungrouped"
  done
  field() { local rest="${ungrouped#* "$1"=}"; echo "${rest%% *}"; }
  got_spend="$(field spend)"
  got_net="$(field net_revenue)"
  [[ "$(echo "$got_spend == $want_spend" | bc)" == 1 ]] || die "spend $got_spend, seeded $want_spend"
  [[ "$(echo "$got_net == $want_net" | bc)" == 1 ]] || die "net revenue $got_net, seeded $want_net"
fi

{
  echo "attribution benchmark — $stamp, commit $commit"
  echo "machine: $machine; postgres $pg_version; load average before the calls $load_before"
  echo "tenant-month $period_start..$period_end, one tenant: $usage_events usage events ($raw_rows raw rows kept), $rollup_rows rollup rows, $state_rows state rollup rows, $lifecycle_rows lifecycle events of $TRANSACTIONS transactions ($seeded, database $db_size)"
  echo "server peak RSS $(mib "$server_rss"); ungrouped report checked against the seeded totals"
  while IFS=$'\t' read -r shape calls p50 p99 max rows _; do
    [[ "$shape" == shape ]] && continue
    printf 'GetAttribution %-22s %s calls, %6s rows: p50 %8s ms  p99 %8s ms  max %8s ms  (target p99 ≤ %s ms: %s)\n' \
      "$shape" "$calls" "$rows" "$p50" "$p99" "$max" "$TARGET_P99_MS" "$(verdict "$p99" '<=' "$TARGET_P99_MS")"
  done <<<"$results"
} | tee "$figures_txt"
