#!/usr/bin/env bash
# End-to-end gRPC ingest benchmark (DESIGN §7, issue 3): `tokenmeter loadgen` sends EVENTS unique
# usage events (100 per IngestUsage call, 10 % duplicates on top) to the release binary serving a
# fresh database, checks every answer against its ground truth, and reports events/s and call
# latency. In the same run it measures raw binary COPY of the same rows into the same table in a
# second, freshly migrated database, and prints the ratio between the two, the server's peak RSS
# and the machine it ran on.
#
#   benches/ingest_grpc.sh            # from anywhere; takes a few minutes for 1M events
#
# Environment (all optional):
#   EVENTS=1000000  BATCH_SIZE=100  CONCURRENCY=32  DUPLICATE_RATIO=0.1  TENANTS=10  SEED=1
#   RATE=0 (events/s, 0 = as fast as possible)  LOADGEN_ARGS="..." (more loadgen options)
#   GRPC_PORT / ADMIN_PORT (default: free ports)  LOADGEN_API_KEY (default: a random one-off
#   bootstrap admin key given to the server)
#   KEEP_DATABASES=1 (do not drop the two databases)  SKIP_BUILD=1 (use the existing binary)
#   TOKENMETER_LOG__FILTER (server log filter, default warn)
#
# Exit status: non-zero if anything fails or the server's answers differ from the ground truth;
# missing a performance target is reported, not fatal. Figures, the loadgen JSON report and the
# server log are kept under target/bench/.
# shellcheck disable=SC2154 # the loadgen figures are assigned by `eval` below
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EVENTS="${EVENTS:-1000000}"
BATCH_SIZE="${BATCH_SIZE:-100}"
CONCURRENCY="${CONCURRENCY:-32}"
DUPLICATE_RATIO="${DUPLICATE_RATIO:-0.1}"
TENANTS="${TENANTS:-10}"
SEED="${SEED:-1}"
RATE="${RATE:-0}"
LOADGEN_ARGS="${LOADGEN_ARGS:-}"

# DESIGN §7 targets for this benchmark.
TARGET_EVENTS_PER_S=50000
TARGET_P99_MS=20
TARGET_RSS_MIB=256

# shellcheck source=benches/lib.sh
source benches/lib.sh

bench_db="tm_bench_$(date +%s)_$$"
copy_db="${bench_db}_copy"
bench_url="$(url_for "$bench_db")"
run_id="bench$(date +%s | tail -c 6)"
report_json="$out_dir/ingest_grpc-$stamp.json"
server_log="$out_dir/ingest_grpc-$stamp.server.log"
figures_txt="$out_dir/ingest_grpc-$stamp.txt"

# --- server on a fresh database ------------------------------------------------------------------
create_db "$bench_db"
log "database $bench_db"
# Every call needs a key: the server gets a one-off bootstrap admin key, loadgen sends it.
export LOADGEN_API_KEY="${LOADGEN_API_KEY:-bench-$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')}"
grpc_port="${GRPC_PORT:-$(free_port)}"
GRPC_PORT="$grpc_port" start_server TOKENMETER_DATABASE__URL="$bench_url" \
  TOKENMETER_AUTH__BOOTSTRAP_ADMIN_KEY="$LOADGEN_API_KEY" TOKENMETER_KAFKA__CONSUMER__ENABLED=false

# The loadgen tenants, in case the server does not auto-create unknown tenants.
if [[ "$(psql_q "$bench_url" -c "SELECT to_regclass('public.tenants') IS NOT NULL")" == t ]]; then
  psql_q "$bench_url" -c "INSERT INTO tenants (tenant_id, name, currency)
      SELECT format('lg-%s-t%s', '$run_id', i), format('loadgen tenant %s', i), 'USD'
      FROM generate_series(0, $TENANTS - 1) AS i ON CONFLICT DO NOTHING" >/dev/null \
    || log "could not pre-create the loadgen tenants; relying on the server to auto-create them"
fi

rss_before_kib="$(rss_kib "$server_pid" VmRSS)"

# --- ingest ---------------------------------------------------------------------------------------
loadgen_cmd=("$bin" loadgen --target "http://127.0.0.1:$grpc_port" --events "$EVENTS"
  --batch-size "$BATCH_SIZE" --concurrency "$CONCURRENCY" --duplicate-ratio "$DUPLICATE_RATIO"
  --tenants "$TENANTS" --seed "$SEED" --rate "$RATE" --run-id "$run_id")
# shellcheck disable=SC2206 # word splitting of extra options is intended
loadgen_cmd+=($LOADGEN_ARGS)
log "running: ${loadgen_cmd[*]}"
set +e
env "${tm_env[@]}" "${loadgen_cmd[@]}" --json >"$report_json"
loadgen_rc=$?
set -e

rss_peak_kib="$(rss_kib "$server_pid" VmHWM)"
rss_end_kib="$(rss_kib "$server_pid" VmRSS)"

if ! python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$report_json" 2>/dev/null; then
  die "loadgen failed (exit $loadgen_rc) without a report; see its error above"
fi
eval "$(python3 - "$report_json" <<'PY'
import json, shlex, sys
r = json.load(open(sys.argv[1]))
p = r["performance"]
v = {
    "lg_ok": "1" if r["ok"] else "0",
    "lg_problem": r.get("problem") or "",
    "lg_sent": r["sent"]["events"],
    "lg_unique": r["sent"]["original"],
    "lg_dups": r["sent"]["duplicate"],
    "lg_conflicts": r["sent"]["conflict"],
    "lg_retried": r.get("retried_calls", 0),
    "lg_invalid": r["sent"]["invalid"],
    "lg_calls": r["sent"]["calls"],
    "exp_accepted": r["expected"]["accepted"],
    "srv": "accepted {accepted}, duplicate {duplicate}, conflict {conflict}, invalid {invalid}".format(**r["server"]),
    "ingest_eps": "%.0f" % p["events_per_s"],
    "ingest_eps_raw": p["events_per_s"],
    "accepted_eps": "%.0f" % p["accepted_per_s"],
    "elapsed_s": "%.2f" % p["elapsed_s"],
    "p50": "%.2f" % p["latency_ms"]["p50"],
    "p95": "%.2f" % p["latency_ms"]["p95"],
    "p99": "%.2f" % p["latency_ms"]["p99"],
    "pmax": "%.2f" % p["latency_ms"]["max"],
    "p99_raw": p["latency_ms"]["p99"],
    "tokens_total": r["tokens"]["total"],
}
for k, x in v.items():
    print(f"{k}={shlex.quote(str(x))}")
PY
)"

# --- the stored rows against the ground truth, then the same rows by raw binary COPY -------------
stop_server
stored_check="$(check_stored "$bench_url" "lg-${run_id}-t%" "$report_json")"
copy_baseline "$bench_url" "$copy_db"
ratio="$(awk -v i="$ingest_eps_raw" -v c="$copy_rps" 'BEGIN {printf "%.3f", (c > 0 ? i / c : 0)}')"

# --- figures ------------------------------------------------------------------------------------
check="OK"
((lg_ok)) || check="FAILED: $lg_problem"
rows_note=""
[[ "$stored_rows" == "$exp_accepted" ]] || rows_note="  (expected $exp_accepted: one row per accepted event)"

{
  echo "==== tokenmeter gRPC ingest benchmark ===="
  echo "date            $stamp"
  echo "commit          $commit"
  echo "machine         $machine"
  echo "postgres        $pg_version (deploy/local/postgres.sh settings)"
  echo "command         ${loadgen_cmd[*]}"
  echo "events sent     $lg_sent = $lg_unique unique (of which $lg_invalid invalid) + $lg_dups duplicates + $lg_conflicts conflicts, in $lg_calls calls of $BATCH_SIZE, concurrency $CONCURRENCY"
  echo "ground truth    $check"
  echo "server summary  $srv"
  echo "tokens (truth)  $tokens_total"
  echo "ingest          $ingest_eps events/s ($accepted_eps accepted/s) over $elapsed_s s"
  echo "call latency    p50 $p50 ms  p95 $p95 ms  p99 $p99 ms  max $pmax ms (client side; $lg_retried calls retried)"
  echo "rows stored     $stored_rows in usage_events$rows_note"
  echo "stored tokens   $stored_check"
  echo "server RSS      peak (VmHWM) $(mib "$rss_peak_kib"), at end $(mib "$rss_end_kib"), before load $(mib "$rss_before_kib")"
  echo "binary COPY     $copied_rows rows ($file_mib MiB) in $copy_s s = $copy_rps rows/s"
  echo "ratio           ingest events/s / COPY rows/s = $ratio"
  echo "targets         events/s >= $TARGET_EVENTS_PER_S: $(verdict "$ingest_eps_raw" '>=' "$TARGET_EVENTS_PER_S"),"\
    "p99 <= $TARGET_P99_MS ms: $(verdict "$p99_raw" '<=' "$TARGET_P99_MS"),"\
    "RSS <= $TARGET_RSS_MIB MiB: $(verdict "${rss_peak_kib:-0}" '<=' "$((TARGET_RSS_MIB * 1024))")"
  echo "kept            $figures_txt, $report_json, $server_log"
} | tee "$figures_txt"

[[ "$stored_check" != MISMATCH* ]] || exit 1
exit "$loadgen_rc"
