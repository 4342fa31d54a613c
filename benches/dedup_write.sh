#!/usr/bin/env bash
# Dedup-write variants (issue 3: "measure variants … and keep the fastest correct one"): the
# bench binary benches/dedup_write.rs inserts the same identities into usage_event_keys of a
# freshly migrated database with the shipped unnest statement (random and time-ordered event ids)
# and with binary COPY into a staging table, checks each variant stored exactly the unique
# identities, and prints rows/s per variant and the ratio to the shipped one.
#
#   benches/dedup_write.sh
#
# Environment (all optional): ROWS=400000 BATCH=1000 DUPLICATES=0.1 WRITERS=2 ROUNDS=2
#   SKIP_BUILD=1 KEEP_DATABASES=1
# Figures are kept under target/bench/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=benches/lib.sh
source benches/lib.sh

if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  cargo bench --locked --bench dedup_write --no-run
fi
load="$(find target/release/deps -maxdepth 1 -type f -executable -name 'dedup_write-*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)"
[[ -x "$load" ]] || die "the dedup_write bench binary is missing; run cargo bench --bench dedup_write --no-run"

db="tm_bench_dedup_$(date +%s)_$$"
create_db "$db"
url="$(url_for "$db")"
TOKENMETER_DATABASE__URL="$url" tm migrate >/dev/null

report="$out_dir/dedup_write-$stamp.txt"
{
  echo "==== tokenmeter dedup-write variants ===="
  echo "date      $stamp"
  echo "commit    $commit"
  echo "machine   $machine"
  echo "postgres  $pg_version (deploy/local/postgres.sh settings)"
  echo "load avg  $(cut -d' ' -f1-3 /proc/loadavg) (before)"
  "$load" --database-url "$url" --rows "${ROWS:-400000}" --batch "${BATCH:-1000}" \
    --duplicates "${DUPLICATES:-0.1}" --writers "${WRITERS:-2}" --rounds "${ROUNDS:-2}"
  echo "load avg  $(cut -d' ' -f1-3 /proc/loadavg) (after)"
} | tee "$report"
log "kept $report"
