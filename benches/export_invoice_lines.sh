#!/usr/bin/env bash
# Finance export benchmark (issue 7): finalizes a month of invoices for TENANTS tenants with
# benches/billing_finalize.sh (same seed), then times `tokenmeter export invoice-lines --period
# <that month>` into a scratch directory with the release binary, twice, checks the two files are
# byte-identical and that the manifest's totals equal Σ invoices.total, and prints rows/s and
# bytes/s with the machine.
#
#   benches/export_invoice_lines.sh          # seeding + finalizing take a minute or two
#
# Environment (all optional): TENANTS=10000, FORMAT=csv (or jsonl), SKIP_BUILD=1, and the
# seeding knobs of billing_finalize.sh. Figures are kept under target/bench/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

FORMAT="${FORMAT:-csv}"
BENCH_NEEDS_KAFKA=0
# shellcheck source=benches/lib.sh
source benches/lib.sh

BENCH_DB="tm_bench_export_$(date +%s)_$$"
export BENCH_DB
bench_url="$(url_for "$BENCH_DB")"
# billing_finalize.sh creates and keeps it; this script's cleanup drops it.
dbs_created+=("$BENCH_DB")
KEEP_DATABASES=1 SKIP_BUILD=1 benches/billing_finalize.sh >&2
period="$(date -u -d "$(date -u +%Y-%m-01) -1 month" +%Y-%m)"

run_export() {
  local out="$scratch/$1" started elapsed
  started=$(date +%s.%N)
  TOKENMETER_DATABASE__URL="$bench_url" TOKENMETER_LOG__FILTER=warn \
    tm export invoice-lines --period "$period" --format "$FORMAT" --out "$out" 2>/dev/null
  elapsed="$(echo "$(date +%s.%N) - $started" | bc)"
  echo "$elapsed"
}
load_before="$(cut -d' ' -f1-3 /proc/loadavg)"
first_s="$(run_export 1)"
second_s="$(run_export 2)"

file="invoice_lines-$period.$FORMAT"
cmp -s "$scratch/1/$file" "$scratch/2/$file" || die "two exports of the same data differ"
rows="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["row_count"])' "$scratch/1/manifest.json")"
bytes="$(stat -c %s "$scratch/1/$file")"
exported_total="$(python3 -c 'import json,sys; print(next(t["amount"] for t in json.load(open(sys.argv[1]))["totals"] if t["column"] == "amount"))' "$scratch/1/manifest.json")"
invoiced_total="$(psql_q "$bench_url" -c "SELECT sum(total) FROM invoices WHERE period_label = '$period' AND state = 'finalized'")"
[[ "$(psql_q "$bench_url" -c "SELECT '$exported_total'::numeric = '$invoiced_total'::numeric")" == t ]] \
  || die "manifest total $exported_total is not Σ invoices.total $invoiced_total"
best="$(printf '%s\n%s\n' "$first_s" "$second_s" | sort -g | head -1)"
{
  echo "export invoice-lines benchmark — $stamp, commit $commit"
  echo "machine: $machine; postgres $pg_version; load average before the runs $load_before"
  echo "command: tokenmeter export invoice-lines --period $period --format $FORMAT --out DIR"
  echo "exported: $rows rows, $bytes bytes, twice byte-identical; manifest total $exported_total USD = Σ invoices.total"
  printf 'elapsed: %.2f s and %.2f s; best %.0f rows/s, %.1f MiB/s\n' "$first_s" "$second_s" \
    "$(echo "$rows / $best" | bc -l)" "$(echo "$bytes / $best / 1048576" | bc -l)"
} | tee "target/bench/export_invoice_lines-$stamp.txt"
