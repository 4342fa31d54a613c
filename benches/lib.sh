# Shared by the end-to-end benchmarks (benches/ingest_*.sh), sourced from the repository root:
# the machine, Postgres and Kafka, the release binary, scratch databases, the server process,
# the check of stored usage against a loadgen ground truth, and the binary COPY baseline.
# shellcheck shell=bash
# shellcheck disable=SC2034 # the figures set here are read by the scripts that source this one

log() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

# --- machine ------------------------------------------------------------------------------------
cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
[[ -n "$cpu_model" ]] || cpu_model="$(uname -m)"
mem_total_kib="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
machine="nproc $(nproc), CPU ${cpu_model}, memory $(awk -v k="$mem_total_kib" 'BEGIN {printf "%.1f GiB", k / 1048576}'), kernel $(uname -r)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then commit="$commit (with uncommitted changes)"; fi
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out_dir="target/bench"
mkdir -p "$out_dir"

# --- Postgres and Kafka: the running ones when they answer, else deploy/local's -----------------
# shellcheck source=deploy/local/deps.sh
source deploy/local/deps.sh
command -v curl >/dev/null 2>&1 || die "curl is required"
PSQL="$(command -v psql || find /usr/lib/postgresql -path '*/bin/psql' 2>/dev/null | sort -V | tail -1)"
psql_q() { "$PSQL" "$1" -X -v ON_ERROR_STOP=1 -qtA "${@:2}"; }
base_url="${BENCH_DATABASE_URL:-$(deploy/local/postgres.sh url)}"
url_for() { echo "${base_url%/*}/$1"; }
kafka_brokers="${KAFKA_BROKERS:-127.0.0.1:9092}"
kafka_answers() {
  local first="${kafka_brokers%%,*}"
  (exec 3<>"/dev/tcp/${first%:*}/${first##*:}") 2>/dev/null
}
if [[ -x "$PSQL" ]] && psql_q "$base_url" -c 'SELECT 1' >/dev/null 2>&1; then
  log "using the Postgres that answers at ${base_url%%@*}@${base_url#*@}"
else
  deploy/local/postgres.sh start
  PSQL="$(command -v psql || find /usr/lib/postgresql -path '*/bin/psql' 2>/dev/null | sort -V | tail -1)"
fi
[[ -x "$PSQL" ]] || die "psql not found"
# A bench that runs the server without Kafka sets BENCH_NEEDS_KAFKA=0 before sourcing this.
if [[ "${BENCH_NEEDS_KAFKA:-1}" == 1 ]]; then
  if kafka_answers; then
    log "using the Kafka broker that answers at $kafka_brokers"
  else
    deploy/local/kafka.sh start
  fi
fi
pg_version="$(psql_q "$base_url" -c 'SHOW server_version')"
kafka_version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' deploy/local/kafka/pom.xml | head -1)"

# --- the release binary ------------------------------------------------------------------------
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
tm loadgen --help >/dev/null 2>&1 || die "'tokenmeter loadgen' is not available in $bin"

# --- scratch databases, the server, cleanup --------------------------------------------------------
free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

dbs_created=()
# drop_db NAME: WITH (FORCE) ends our own leftover sessions, but Postgres 15 refuses it while an
# autovacuum worker is in the database (it runs as no role we may signal) — common right after
# millions of inserts. A plain DROP cancels autovacuum itself, so it is the fallback.
drop_db() {
  psql_q "$base_url" -c "DROP DATABASE IF EXISTS \"$1\" WITH (FORCE)" 2>/dev/null && return 0
  local attempt
  for attempt in 1 2 3 4 5; do
    psql_q "$base_url" -c "DROP DATABASE IF EXISTS \"$1\"" && return 0
    sleep "$attempt"
  done
  return 1
}
create_db() {
  psql_q "$base_url" -c "CREATE DATABASE \"$1\""
  dbs_created+=("$1")
}

server_pid=""
server_log=""
admin_port=""
# Starts `serve --run-migrations` with the given extra NAME=VALUE settings on free ports, logging
# to $server_log, and waits until /readyz answers 200.
start_server() {
  local grpc_port
  grpc_port="${GRPC_PORT:-$(free_port)}"
  admin_port="${ADMIN_PORT:-$(free_port)}"
  log "serving gRPC on 127.0.0.1:$grpc_port, admin on 127.0.0.1:$admin_port"
  env "${tm_env[@]}" TOKENMETER_GRPC__LISTEN_ADDR="127.0.0.1:$grpc_port" \
    TOKENMETER_ADMIN__LISTEN_ADDR="127.0.0.1:$admin_port" \
    TOKENMETER_LOG__FILTER="${TOKENMETER_LOG__FILTER:-warn}" \
    "$@" "$bin" serve --run-migrations >"$server_log" 2>&1 &
  server_pid=$!
  for _ in $(seq 1 300); do
    if ! kill -0 "$server_pid" 2>/dev/null; then
      tail -30 "$server_log" >&2 || true
      die "the server exited during startup (log: $server_log)"
    fi
    if curl -fsS -m 2 "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  tail -30 "$server_log" >&2
  die "the server was not ready within 60 s (log: $server_log)"
}

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

# Memory of a process from /proc/<pid>/status, in KiB: VmRSS now, VmHWM its peak.
rss_kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status" 2>/dev/null || true; }
mib() { awk -v k="${1:-0}" 'BEGIN {printf "%.1f MiB", k / 1024}'; }
verdict() { if awk -v a="$1" -v b="$3" "BEGIN {exit !(a $2 b)}"; then echo met; else echo "NOT met"; fi; }

# shellcheck disable=SC2317 # runs from the EXIT trap
cleanup() {
  local rc=$?
  # A second Ctrl-C or TERM must not cut the cleanup short and leave databases behind.
  trap '' INT TERM
  stop_server
  if declare -F bench_cleanup >/dev/null; then bench_cleanup || true; fi
  if [[ "${KEEP_DATABASES:-0}" == 1 ]]; then
    ((${#dbs_created[@]})) && log "kept databases: ${dbs_created[*]}"
  else
    for db in "${dbs_created[@]}"; do
      drop_db "$db" >/dev/null \
        || log "could not drop database $db"
    done
  fi
  rm -rf "$scratch"
  exit "$rc"
}
# Created with the trap that removes it: the \copy files and the samples go there.
scratch="$(mktemp -d "${TMPDIR:-/var/tmp}/tokenmeter-bench.XXXXXX")"
chmod 755 "$scratch"
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- stored usage against the ground truth ---------------------------------------------------------
# check_stored DB_URL TENANT_LIKE REPORT.json...: compares, per tenant, the event count and token
# class sums of usage_events and of usage_rollups with the loadgen reports' ground truth; prints
# one line starting with OK or MISMATCH.
check_stored() {
  local url="$1" like="$2"
  shift 2
  local classes=(input cache_read cache_write_5m cache_write_1h output reasoning input_audio output_audio input_image output_image cache_write_30m cache_write_12h)
  local sums="" c i=1 rollup_sums=""
  for c in "${classes[@]}"; do
    sums+="${sums:+, }coalesce(sum($c), 0)::bigint AS $c"
    rollup_sums+="${rollup_sums:+, }coalesce(sum(tokens) FILTER (WHERE token_class = $i), 0)::bigint AS $c"
    i=$((i + 1))
  done
  "$PSQL" "$url" -X -v ON_ERROR_STOP=1 -q --csv -c "SELECT tenant_id, count(*) AS events, $sums
      FROM usage_events WHERE tenant_id LIKE '$like' GROUP BY tenant_id" >"$scratch/stored_events.csv"
  "$PSQL" "$url" -X -v ON_ERROR_STOP=1 -q --csv -c "SELECT tenant_id, sum(events)::bigint AS events, $rollup_sums
      FROM usage_rollups WHERE tenant_id LIKE '$like' GROUP BY tenant_id" >"$scratch/stored_rollups.csv"
  python3 - "$scratch/stored_events.csv" "$scratch/stored_rollups.csv" "$@" <<'PY'
import csv, json, sys
truth = {}
for path in sys.argv[3:]:
    for t in json.load(open(path))["tenants"]:
        if t["events"]:
            truth[t["tenant_id"]] = {"events": t["events"], **t["by_class"]}
diffs = []
for table, path in (("usage_events", sys.argv[1]), ("usage_rollups", sys.argv[2])):
    stored = {row.pop("tenant_id"): row for row in csv.DictReader(open(path))}
    for tenant in sorted(set(truth) | set(stored)):
        want, got = truth.get(tenant, {}), stored.get(tenant, {})
        for key in sorted(set(want) | set(got)):
            w, g = int(want.get(key, 0)), int(got.get(key, 0))
            if w != g:
                diffs.append(f"{table} {tenant} {key}: stored {g}, expected {w}")
if diffs:
    print(f"MISMATCH ({len(diffs)}): " + "; ".join(diffs[:5]))
else:
    print(f"OK (usage_events and usage_rollups: every tenant's event count and token class sums equal the ground truth, {len(truth)} tenants)")
PY
}

# --- the physical baseline: binary COPY of the same rows into the same table ----------------------
# copy_baseline DB_URL COPY_DB: copies usage_events of DB_URL (and the rows they reference)
# into the freshly migrated database COPY_DB and times the COPY of the events alone. Sets
# stored_rows, copied_rows, file_mib, copy_s and copy_rps. The source database is dropped once
# exported (unless KEEP_DATABASES=1), so that the two never take disk space at the same time.
copy_baseline() {
  local url="$1" copy_db="$2" copy_url cols events_file referenced table partitions
  copy_url="$(url_for "$copy_db")"
  [[ "$(psql_q "$url" -c "SELECT to_regclass('public.usage_events') IS NOT NULL")" == t ]] \
    || die "table usage_events does not exist: there is nothing to COPY"
  stored_rows="$(psql_q "$url" -c 'SELECT count(*) FROM usage_events')"
  # Insertable columns (generated columns cannot be copied in).
  columns_of() {
    psql_q "$1" -c "SELECT string_agg(quote_ident(column_name), ', ' ORDER BY ordinal_position)
      FROM information_schema.columns
      WHERE table_schema = 'public' AND table_name = '$2' AND is_generated = 'NEVER'"
  }
  events_file="$scratch/usage_events.bin"
  cols="$(columns_of "$url" usage_events)"
  psql_q "$url" -c "\\copy (SELECT $cols FROM usage_events) TO '$events_file' WITH (FORMAT binary)"
  file_mib="$(awk -v b="$(stat -c %s "$events_file")" 'BEGIN {printf "%.1f", b / 1048576}')"

  # Partitions the ingest created on demand, so that every row has a partition to land in.
  partitions="$(psql_q "$url" -c "SELECT format('CREATE TABLE IF NOT EXISTS %I.%I PARTITION OF usage_events %s;',
        n.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid))
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace
      WHERE i.inhparent = 'public.usage_events'::regclass")"
  # Rows the events reference through foreign keys (tenants, …), copied untimed, deepest first.
  referenced="$(psql_q "$url" -c "WITH RECURSIVE deps(tbl, depth) AS (
        SELECT confrelid, 1 FROM pg_constraint
          WHERE conrelid = 'public.usage_events'::regclass AND contype = 'f'
        UNION ALL
        SELECT c.confrelid, d.depth + 1 FROM pg_constraint c JOIN deps d ON c.conrelid = d.tbl
          WHERE c.contype = 'f' AND c.confrelid <> c.conrelid AND d.depth < 10)
      SELECT c.relname FROM deps JOIN pg_class c ON c.oid = deps.tbl
      WHERE deps.tbl <> 'public.usage_events'::regclass
      GROUP BY c.relname ORDER BY max(depth) DESC, c.relname")"
  declare -A referenced_cols=()
  while read -r table; do
    [[ -n "$table" ]] || continue
    referenced_cols[$table]="$(columns_of "$url" "$table")"
    psql_q "$url" -c "\\copy (SELECT ${referenced_cols[$table]} FROM $table) TO '$scratch/$table.bin' WITH (FORMAT binary)"
  done <<<"$referenced"
  if [[ "${KEEP_DATABASES:-0}" != 1 ]]; then
    drop_db "${url##*/}" >/dev/null || die "could not drop database ${url##*/}"
  fi

  create_db "$copy_db"
  TOKENMETER_DATABASE__URL="$copy_url" TOKENMETER_LOG__FILTER=warn tm migrate
  "$PSQL" "$copy_url" -X -q <<<"$partitions" >/dev/null 2>&1 || true
  if [[ -n "$referenced" ]]; then
    psql_q "$copy_url" -c "TRUNCATE $(echo "$referenced" | paste -sd, -) CASCADE"
    while read -r table; do
      psql_q "$copy_url" -c "\\copy $table (${referenced_cols[$table]}) FROM '$scratch/$table.bin' WITH (FORMAT binary)"
    done <<<"$referenced"
  fi
  psql_q "$copy_url" -c "CHECKPOINT" >/dev/null 2>&1 || true

  log "timing binary COPY of $stored_rows rows ($file_mib MiB) into usage_events of $copy_db"
  local t0 t1
  t0="$(date +%s%N)"
  psql_q "$copy_url" -c "\\copy usage_events ($cols) FROM '$events_file' WITH (FORMAT binary)"
  t1="$(date +%s%N)"
  rm -f "$events_file"
  copied_rows="$(psql_q "$copy_url" -c 'SELECT count(*) FROM usage_events')"
  copy_s="$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", (b - a) / 1e9}')"
  copy_rps="$(awk -v n="$copied_rows" -v s="$copy_s" 'BEGIN {printf "%.0f", (s > 0 ? n / s : 0)}')"
}
