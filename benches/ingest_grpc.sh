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

log() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

# shellcheck source=deploy/local/deps.sh
source deploy/local/deps.sh
command -v curl >/dev/null 2>&1 || die "curl is required"

# --- machine ------------------------------------------------------------------------------------
cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
[[ -n "$cpu_model" ]] || cpu_model="$(uname -m)"
mem_total_kib="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
machine="nproc $(nproc), CPU ${cpu_model}, memory $(awk -v k="$mem_total_kib" 'BEGIN {printf "%.1f GiB", k / 1048576}'), kernel $(uname -r)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then commit="$commit (with uncommitted changes)"; fi

# --- dependencies and build ------------------------------------------------------------------
deploy/local/postgres.sh start
deploy/local/kafka.sh start
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  cargo build --release --locked
fi
bin=target/release/tokenmeter
[[ -x "$bin" ]] || die "$bin is missing; build it with cargo build --release --locked"
# The binary reads every TOKENMETER_* variable as a setting and rejects unknown ones, so the
# deploy scripts' own variables (TOKENMETER_LOCAL_DIR, TOKENMETER_PG_DIR, …) are hidden from it.
tm_env=()
while read -r name; do
  rest="${name#TOKENMETER_}"
  [[ "$rest" == *__* || "$rest" == SHUTDOWN_GRACE ]] || tm_env+=(-u "$name")
done < <(compgen -e | grep '^TOKENMETER_' || true)
tm() { env "${tm_env[@]}" "$bin" "$@"; }
tm loadgen --help >/dev/null 2>&1 \
  || die "'tokenmeter loadgen' is not available in $bin (the subcommand is not wired into the CLI yet)"

PSQL="$(command -v psql || find /usr/lib/postgresql -path '*/bin/psql' 2>/dev/null | sort -V | tail -1)"
[[ -x "$PSQL" ]] || die "psql not found"
psql_q() { "$PSQL" "$1" -X -v ON_ERROR_STOP=1 -qtA "${@:2}"; }

base_url="$(deploy/local/postgres.sh url)"
url_for() { echo "${base_url%/*}/$1"; }
pg_version="$(psql_q "$base_url" -c 'SHOW server_version')"

stamp="$(date -u +%Y%m%dT%H%M%SZ)"
bench_db="tm_bench_$(date +%s)_$$"
copy_db="${bench_db}_copy"
bench_url="$(url_for "$bench_db")"
copy_url="$(url_for "$copy_db")"
run_id="bench$(date +%s | tail -c 6)"
out_dir="target/bench"
mkdir -p "$out_dir"
report_json="$out_dir/ingest_grpc-$stamp.json"
server_log="$out_dir/ingest_grpc-$stamp.server.log"
figures_txt="$out_dir/ingest_grpc-$stamp.txt"
scratch="$(mktemp -d "${TMPDIR:-/var/tmp}/tokenmeter-bench.XXXXXX")"
chmod 755 "$scratch"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
grpc_port="${GRPC_PORT:-$(free_port)}"
admin_port="${ADMIN_PORT:-$(free_port)}"

server_pid=""
dbs_created=()
stop_server() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$server_pid" 2>/dev/null; then
      log "server did not stop after SIGTERM; killing it"
      kill -KILL "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" 2>/dev/null || true
  fi
  server_pid=""
}
# shellcheck disable=SC2317 # runs from the EXIT trap
cleanup() {
  local rc=$?
  stop_server
  if [[ "${KEEP_DATABASES:-0}" == 1 ]]; then
    ((${#dbs_created[@]})) && log "kept databases: ${dbs_created[*]}"
  else
    for db in "${dbs_created[@]}"; do
      psql_q "$base_url" -c "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" >/dev/null 2>&1 \
        || log "could not drop database $db"
    done
  fi
  rm -rf "$scratch"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

create_db() {
  psql_q "$base_url" -c "CREATE DATABASE \"$1\""
  dbs_created+=("$1")
}

# --- server on a fresh database ------------------------------------------------------------------
create_db "$bench_db"
log "serving gRPC on 127.0.0.1:$grpc_port, admin on 127.0.0.1:$admin_port, database $bench_db"
# Every call needs a key: the server gets a one-off bootstrap admin key, loadgen sends it.
export LOADGEN_API_KEY="${LOADGEN_API_KEY:-bench-$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')}"
env "${tm_env[@]}" TOKENMETER_DATABASE__URL="$bench_url" \
  TOKENMETER_AUTH__BOOTSTRAP_ADMIN_KEY="$LOADGEN_API_KEY" \
  TOKENMETER_GRPC__LISTEN_ADDR="127.0.0.1:$grpc_port" \
  TOKENMETER_ADMIN__LISTEN_ADDR="127.0.0.1:$admin_port" \
  TOKENMETER_LOG__FILTER="${TOKENMETER_LOG__FILTER:-warn}" \
  "$bin" serve --run-migrations >"$server_log" 2>&1 &
server_pid=$!

ready=0
for _ in $(seq 1 300); do
  if ! kill -0 "$server_pid" 2>/dev/null; then
    tail -30 "$server_log" >&2 || true
    die "the server exited during startup (log: $server_log)"
  fi
  if curl -fsS -m 2 "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.2
done
((ready)) || { tail -30 "$server_log" >&2; die "the server was not ready within 60 s (log: $server_log)"; }

# The loadgen tenants, in case the server does not auto-create unknown tenants.
if [[ "$(psql_q "$bench_url" -c "SELECT to_regclass('public.tenants') IS NOT NULL")" == t ]]; then
  psql_q "$bench_url" -c "INSERT INTO tenants (tenant_id, name, currency)
      SELECT format('lg-%s-t%s', '$run_id', i), format('loadgen tenant %s', i), 'USD'
      FROM generate_series(0, $TENANTS - 1) AS i ON CONFLICT DO NOTHING" >/dev/null \
    || log "could not pre-create the loadgen tenants; relying on the server to auto-create them"
fi

rss_kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status" 2>/dev/null || true; }
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

# --- the same rows by raw binary COPY --------------------------------------------------------------
[[ "$(psql_q "$bench_url" -c "SELECT to_regclass('public.usage_events') IS NOT NULL")" == t ]] \
  || die "table usage_events does not exist in $bench_db: the raw-event store of usage ingest (issue 3) has not landed, so there is nothing to COPY"
stored_rows="$(psql_q "$bench_url" -c 'SELECT count(*) FROM usage_events')"
stop_server

# What Postgres holds for this run, per tenant and token class, against the ground truth.
class_cols=(input cache_read cache_write_5m cache_write_1h output reasoning input_audio output_audio input_image output_image)
have_cols="$(psql_q "$bench_url" -c "SELECT count(*) FROM information_schema.columns
  WHERE table_schema = 'public' AND table_name = 'usage_events'
    AND column_name IN ($(printf "'%s'," "${class_cols[@]}" | sed 's/,$//'))")"
if [[ "$have_cols" == "${#class_cols[@]}" ]]; then
  sums=""
  for c in "${class_cols[@]}"; do sums+="${sums:+, }coalesce(sum($c), 0)::bigint AS $c"; done
  "$PSQL" "$bench_url" -X -v ON_ERROR_STOP=1 -q --csv -c "SELECT tenant_id, count(*) AS events, $sums
      FROM usage_events WHERE tenant_id LIKE 'lg-${run_id}-t%' GROUP BY tenant_id" >"$scratch/stored.csv"
  stored_check="$(python3 - "$report_json" "$scratch/stored.csv" <<'PY'
import csv, json, sys
truth = {t["tenant_id"]: t for t in json.load(open(sys.argv[1]))["tenants"]}
stored = {row["tenant_id"]: row for row in csv.DictReader(open(sys.argv[2]))}
diffs = []
for tenant in sorted(set(truth) | set(stored)):
    t, s = truth.get(tenant), stored.get(tenant)
    want = {"events": t["events"], **t["by_class"]} if t else {}
    for key in sorted(set(want) | set(s or {}) - {"tenant_id"}):
        w, g = int(want.get(key, 0)), int((s or {}).get(key, 0))
        if w != g:
            diffs.append(f"{tenant} {key}: stored {g}, expected {w}")
if diffs:
    print(f"MISMATCH ({len(diffs)}): " + "; ".join(diffs[:5]))
else:
    print("OK (every tenant's event count and token class sums equal the ground truth)")
PY
)"
else
  stored_check="skipped (usage_events has no per-class token columns)"
fi

# Insertable columns (generated columns cannot be copied in).
columns_of() {
  psql_q "$1" -c "SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position)
    FROM information_schema.columns
    WHERE table_schema = 'public' AND table_name = '$2' AND is_generated = 'NEVER'"
}
events_file="$scratch/usage_events.bin"
cols="$(columns_of "$bench_url" usage_events)"
psql_q "$bench_url" -c "\\copy (SELECT $cols FROM usage_events) TO '$events_file' WITH (FORMAT binary)"
file_mib="$(awk -v b="$(stat -c %s "$events_file")" 'BEGIN {printf "%.1f", b / 1048576}')"

create_db "$copy_db"
TOKENMETER_DATABASE__URL="$copy_url" TOKENMETER_LOG__FILTER=warn tm migrate
# Partitions the ingest created on demand, so that every row has a partition to land in.
psql_q "$bench_url" -c "SELECT format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF usage_events %s;',
      n.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid))
    FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE i.inhparent = 'public.usage_events'::regclass" \
  | "$PSQL" "$copy_url" -X -q >/dev/null 2>&1 || true
# Rows the events reference through foreign keys (tenants, …), copied untimed, deepest first.
referenced="$(psql_q "$bench_url" -c "WITH RECURSIVE deps(tbl, depth) AS (
      SELECT confrelid, 1 FROM pg_constraint
        WHERE conrelid = 'public.usage_events'::regclass AND contype = 'f'
      UNION ALL
      SELECT c.confrelid, d.depth + 1 FROM pg_constraint c JOIN deps d ON c.conrelid = d.tbl
        WHERE c.contype = 'f' AND c.confrelid <> c.conrelid AND d.depth < 10)
    SELECT c.relname FROM deps JOIN pg_class c ON c.oid = deps.tbl
    WHERE deps.tbl <> 'public.usage_events'::regclass
    GROUP BY c.relname ORDER BY max(depth) DESC, c.relname")"
if [[ -n "$referenced" ]]; then
  psql_q "$copy_url" -c "TRUNCATE $(echo "$referenced" | paste -sd, -) CASCADE"
  while read -r table; do
    table_cols="$(columns_of "$bench_url" "$table")"
    psql_q "$bench_url" -c "\\copy (SELECT $table_cols FROM $table) TO '$scratch/$table.bin' WITH (FORMAT binary)"
    psql_q "$copy_url" -c "\\copy $table ($table_cols) FROM '$scratch/$table.bin' WITH (FORMAT binary)"
  done <<<"$referenced"
fi
psql_q "$copy_url" -c "CHECKPOINT" >/dev/null 2>&1 || true

log "timing binary COPY of $stored_rows rows ($file_mib MiB) into usage_events of $copy_db"
t0="$(date +%s%N)"
psql_q "$copy_url" -c "\\copy usage_events ($cols) FROM '$events_file' WITH (FORMAT binary)"
t1="$(date +%s%N)"
copied_rows="$(psql_q "$copy_url" -c 'SELECT count(*) FROM usage_events')"
copy_s="$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')"
copy_rps="$(awk -v n="$copied_rows" -v s="$copy_s" 'BEGIN {printf "%.0f", (s > 0 ? n / s : 0)}')"
ratio="$(awk -v i="$ingest_eps_raw" -v c="$copy_rps" 'BEGIN {printf "%.3f", (c > 0 ? i / c : 0)}')"

# --- figures ------------------------------------------------------------------------------------
mib() { awk -v k="${1:-0}" 'BEGIN {printf "%.1f MiB", k / 1024}'; }
verdict() { if awk -v a="$1" -v b="$3" "BEGIN {exit !(a $2 b)}"; then echo PASS; else echo FAIL; fi; }
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
