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
log() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

PSQL="$(command -v psql || find /usr/lib/postgresql -path '*/bin/psql' 2>/dev/null | sort -V | tail -1)"
[[ -x "$PSQL" ]] || die "psql not found"
psql_q() { "$PSQL" "$1" -X -v ON_ERROR_STOP=1 -qtA "${@:2}"; }
base_url="$(deploy/local/postgres.sh url)"
export BENCH_DB="tm_bench_export_$(date +%s)_$$"
bench_url="${base_url%/*}/$BENCH_DB"
scratch="$(mktemp -d)"
cleanup() {
  local rc=$?
  rm -rf "$scratch"
  for _ in $(seq 1 30); do
    psql_q "$base_url" -c "DROP DATABASE IF EXISTS \"$BENCH_DB\" WITH (FORCE)" >/dev/null 2>&1 && break
    sleep 2
  done
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

KEEP_DATABASES=1 benches/billing_finalize.sh >&2
bin=target/release/tokenmeter
tm_env=()
while read -r name; do
  rest="${name#TOKENMETER_}"
  [[ "$rest" == *__* || "$rest" == SHUTDOWN_GRACE ]] || tm_env+=(-u "$name")
done < <(compgen -e | grep '^TOKENMETER_' || true)

period="$(date -u -d "$(date -u +%Y-%m-01) -1 month" +%Y-%m)"
cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
machine="nproc $(nproc), CPU ${cpu_model:-$(uname -m)}, memory $(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo), kernel $(uname -r)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
pg_version="$(psql_q "$base_url" -c 'SHOW server_version')"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"

run_export() {
  local out="$scratch/$1" started elapsed
  started=$(date +%s.%N)
  env "${tm_env[@]}" TOKENMETER_DATABASE__URL="$bench_url" TOKENMETER_LOG__FILTER=warn \
    "$bin" export invoice-lines --period "$period" --format "$FORMAT" --out "$out" 2>/dev/null
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
