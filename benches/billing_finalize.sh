#!/usr/bin/env bash
# Monthly invoice finalization benchmark (DESIGN §7, issue 6): seeds a fresh database with
# TENANTS tenants whose last calendar month has hourly rollups over a realistic spread of models
# and token classes (SQL, no ingest), then times `tokenmeter bill close --period <last month>`
# with the release binary, checks that every tenant got exactly one finalized invoice with
# gap-free numbers, and prints elapsed seconds, invoices/s and the machine.
#
#   benches/billing_finalize.sh            # from anywhere; seeding takes a minute or two
#
# Environment (all optional):
#   TENANTS=10000  MODELS_PER_TENANT=3  HOURS_PER_DAY=1 (rollup rows per model × class × day)
#   KEEP_DATABASES=1 (do not drop the database)  SKIP_BUILD=1 (use the existing binary)
#   BENCH_DB=name (the scratch database; benches/export_invoice_lines.sh reuses it)
#
# Exit status: non-zero if anything fails or the invoices are wrong; missing the target is
# reported, not fatal. Figures are kept under target/bench/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TENANTS="${TENANTS:-10000}"
MODELS_PER_TENANT="${MODELS_PER_TENANT:-3}"
HOURS_PER_DAY="${HOURS_PER_DAY:-1}"
TARGET_SECONDS=10

# The close runs without a server, so Kafka is not needed.
BENCH_NEEDS_KAFKA=0
# shellcheck source=benches/lib.sh
source benches/lib.sh

bench_db="${BENCH_DB:-tm_bench_billing_$(date +%s)_$$}"
bench_url="$(url_for "$bench_db")"
figures_txt="$out_dir/billing_finalize-$stamp.txt"

create_db "$bench_db"
TOKENMETER_DATABASE__URL="$bench_url" TOKENMETER_LOG__FILTER=warn tm migrate

# The last whole calendar month (UTC): ended, so it can be closed.
period="$(date -u -d "$(date -u +%Y-%m-01) -1 month" +%Y-%m)"
period_start="${period}-01T00:00:00Z"
log "seeding $TENANTS tenants × $MODELS_PER_TENANT models for period $period"

seed_started=$(date +%s.%N)
psql_q "$bench_url" <<SQL
-- One book: eight models, five classes each; one model's input is graduated, one's output volume.
INSERT INTO price_book_versions (version_id, price_book_id, currency, effective_from)
VALUES ('bench-v1', 'default', 'USD', timestamptz '$period_start' - interval '1 year');
INSERT INTO price_book_rates (version_id, provider, model, token_class, price_per_million,
                              cost_per_million, tier_mode)
SELECT 'bench-v1', m.provider, m.model, c.class, m.base * c.factor, m.base * c.factor * 0.7,
       CASE WHEN m.model = 'gpt-4.1' AND c.class = 1 THEN 'graduated'
            WHEN m.model = 'claude-sonnet-4-5' AND c.class = 5 THEN 'volume' ELSE 'flat' END
FROM (VALUES ('openai', 'gpt-4.1', 2.00), ('openai', 'gpt-4.1-mini', 0.40),
             ('openai', 'gpt-4o', 2.50), ('openai', 'o3', 2.00),
             ('anthropic', 'claude-sonnet-4-5', 3.00), ('anthropic', 'claude-haiku-4-5', 1.00),
             ('google', 'gemini-2.5-pro', 1.25), ('google', 'gemini-2.5-flash', 0.30))
     AS m(provider, model, base)
CROSS JOIN (VALUES (1::int2, 1.0), (2::int2, 0.1), (3::int2, 1.25), (5::int2, 4.0), (6::int2, 4.0))
     AS c(class, factor);
INSERT INTO price_book_rate_tiers VALUES
    ('bench-v1', 'openai', 'gpt-4.1', 1, 0, 1000000, 2.00),
    ('bench-v1', 'openai', 'gpt-4.1', 1, 1, 10000000, 1.60),
    ('bench-v1', 'openai', 'gpt-4.1', 1, 2, NULL, 1.20),
    ('bench-v1', 'anthropic', 'claude-sonnet-4-5', 5, 0, 500000, 12.00),
    ('bench-v1', 'anthropic', 'claude-sonnet-4-5', 5, 1, NULL, 10.00);

-- Tenants: a third taxed, a tenth with a discount, all created before the period.
INSERT INTO tenants (tenant_id, name, currency, tax_rate_percent, created_at)
SELECT format('bench-%s', lpad(i::text, 6, '0')), format('bench tenant %s', i), 'USD',
       CASE WHEN i % 3 = 0 THEN 19 END, timestamptz '$period_start' - interval '10 days'
FROM generate_series(1, $TENANTS) AS i;
INSERT INTO tenant_price_overrides (override_id, tenant_id, discount_percent, effective_from)
SELECT format('bench-d%s', i), format('bench-%s', lpad(i::text, 6, '0')), 10,
       timestamptz '$period_start' - interval '10 days'
FROM generate_series(10, $TENANTS, 10) AS i;

-- Rollups: each tenant uses MODELS_PER_TENANT of the eight models (varying by tenant), every
-- priced class of them, HOURS_PER_DAY hours a day, every day of the month.
WITH models AS (
    SELECT provider, model, row_number() OVER (ORDER BY model) - 1 AS n
    FROM (SELECT DISTINCT provider, model FROM price_book_rates) AS d
), days AS (
    SELECT generate_series(timestamptz '$period_start',
                           timestamptz '$period_start' + interval '1 month' - interval '1 day',
                           interval '1 day') AS day
)
INSERT INTO usage_rollups (tenant_id, hour, agent_id, transaction_id, service, provider, model,
    token_class, currency, tokens, billed_amount, cost_amount, unpriced_tokens, class_events,
    class_unpriced_events, events, unpriced_events)
SELECT format('bench-%s', lpad(t::text, 6, '0')), d.day + make_interval(hours => h * 7),
       'agent-1', '', '', m.provider, m.model, c.class, 'USD',
       (1000 + (t * 7919 + h * 104729 + c.class * 1299709) % 40000) * c.scale,
       0, 0, 0, 10, 0, CASE WHEN c.class = 1 THEN 10 ELSE 0 END, 0
FROM generate_series(1, $TENANTS) AS t
CROSS JOIN generate_series(0, $MODELS_PER_TENANT - 1) AS k
JOIN models m ON m.n = (t + k * 3) % 8
CROSS JOIN days d
CROSS JOIN generate_series(0, $HOURS_PER_DAY - 1) AS h
CROSS JOIN (VALUES (1::int2, 20), (2::int2, 60), (3::int2, 5), (5::int2, 4), (6::int2, 2)) AS c(class, scale)
WHERE c.class <> 6 OR m.model IN ('o3', 'gemini-2.5-pro', 'claude-sonnet-4-5');
-- A month that has ended is old data: vacuumed (hint bits set) and analyzed, as in production.
VACUUM (ANALYZE) usage_rollups; ANALYZE tenants; ANALYZE price_book_rates;
SQL
seed_s="$(echo "$(date +%s.%N) - $seed_started" | bc)"
rollup_rows="$(psql_q "$bench_url" -c 'SELECT count(*) FROM usage_rollups')"
log "seeded $rollup_rows rollup rows in ${seed_s}s"

# --- the measured run ------------------------------------------------------------------------
# Other work on the box moves this figure a lot on 2 cores: the load average is printed with it.
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
started=$(date +%s.%N)
TOKENMETER_DATABASE__URL="$bench_url" TOKENMETER_LOG__FILTER=warn \
  tm bill close --period "$period" --ignore-grace-period
elapsed="$(echo "$(date +%s.%N) - $started" | bc)"

# --- checks -------------------------------------------------------------------------------------
read -r invoices tenants_billed max_number lines total <<<"$(psql_q "$bench_url" -F ' ' -c "
  SELECT count(*), count(DISTINCT tenant_id), max(substring(number from '[0-9]+\$')::int),
         (SELECT count(*) FROM invoice_lines), sum(total)
  FROM invoices WHERE state = 'finalized' AND period_label = '$period'")"
[[ "$invoices" == "$TENANTS" && "$tenants_billed" == "$TENANTS" ]] \
  || die "expected $TENANTS finalized invoices, one per tenant; got $invoices for $tenants_billed tenants"
[[ "$max_number" == "$TENANTS" ]] || die "numbers are not gap-free: highest is $max_number for $invoices invoices"
mismatched="$(psql_q "$bench_url" -c "
  SELECT count(*) FROM invoices i
  WHERE i.total <> (SELECT coalesce(sum(amount), 0) FROM invoice_lines l WHERE l.invoice_id = i.invoice_id)")"
[[ "$mismatched" == 0 ]] || die "$mismatched invoices whose total is not the sum of their lines"

per_s="$(echo "scale=0; $invoices / $elapsed" | bc)"
met="met"
(($(echo "$elapsed > $TARGET_SECONDS" | bc))) && met="NOT MET"
{
  echo "billing finalize benchmark — $stamp, commit $commit"
  echo "machine: $machine; postgres $pg_version; load average before the run $load_before"
  echo "period $period: $TENANTS tenants, $rollup_rows rollup rows (seeded in ${seed_s}s)"
  echo "finalized: $invoices invoices, $lines lines, numbers 1..$max_number gap-free, Σ totals $total USD"
  printf 'elapsed: %.2f s (target ≤ %s s: %s); %s invoices/s\n' "$elapsed" "$TARGET_SECONDS" "$met" "$per_s"
} | tee "$figures_txt"
