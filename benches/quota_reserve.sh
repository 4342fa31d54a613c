#!/usr/bin/env bash
# Quota reserve benchmark (DESIGN §7, issue 5): a separate load process (benches/quota_load.rs)
# calls Reserve, then settles each allowed call in a task of its own, over gRPC on loopback against the release binary serving a fresh
# database, with hard daily token budgets that run out during the run. It reports decisions/s,
# Reserve latency percentiles and the overspend (granted tokens above a budget: must be 0),
# first at saturation (closed loop), then at a fixed offered rate (open loop, latency measured
# from each call's scheduled start, and from when it was sent: the difference is the load
# process's own lateness, up to 1 ms of Tokio timer rounding plus CPU waits).
#
#   benches/quota_reserve.sh
#
# Environment (all optional):
#   CONCURRENCY=64  DURATION=20s  TENANTS=8  BUDGET=2000000 (tokens per tenant)  TOKENS=100
#   RATES="2000 20000" (offered decisions/s of the open-loop runs)  SKIP_BUILD=1
#   REPLICAS=1 (serve processes on one database; the one load process spreads its connections
#   over them, so they race for the same budgets)  QUOTA_WRITERS (quota.writers)
#   QUOTA_LEASES=true (quota.leases: false decides every Reserve in a transaction)
#   SETTLE=event (IngestUsage with the reservation id) | counts (Settle RPC) | none
#   CALL=reserve | health (the gRPC health check instead of Reserve, same callers and clocks:
#   the floor a decision over gRPC stands on here; its "decisions" are answered checks)
#   TOKENMETER_LOCAL_DIR (where deploy/local/postgres.sh keeps its cluster)
#
# Exit status: non-zero if anything fails or any run overspends; missing the latency or
# throughput target is reported, not fatal. Figures are kept under target/bench/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

CONCURRENCY="${CONCURRENCY:-64}"
DURATION="${DURATION:-20s}"
TENANTS="${TENANTS:-8}"
BUDGET="${BUDGET:-2000000}"
TOKENS="${TOKENS:-100}"
RATES="${RATES:-2000 20000}"
REPLICAS="${REPLICAS:-1}"
SETTLE="${SETTLE:-event}"
CALL="${CALL:-reserve}"

log() { echo "bench: $*" >&2; }
die() { echo "bench: error: $*" >&2; exit 1; }

# shellcheck source=deploy/local/deps.sh
source deploy/local/deps.sh
command -v curl >/dev/null 2>&1 || die "curl is required"

cpu_model="$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -1)"
machine="nproc $(nproc), CPU ${cpu_model:-$(uname -m)}, memory $(awk '/^MemTotal:/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
if [[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]]; then commit="$commit (with uncommitted changes)"; fi

deploy/local/postgres.sh start
if [[ "${SKIP_BUILD:-0}" != 1 ]]; then
  cargo build --release --locked --bin tokenmeter
  cargo bench --locked --bench quota_load --no-run
fi
bin=target/release/tokenmeter
[[ -x "$bin" ]] || die "$bin is missing; build it with cargo build --release --locked"
load="$(find target/release/deps -maxdepth 1 -type f -executable -name 'quota_load-*' -printf '%T@ %p\n' | sort -n | tail -1 | cut -d' ' -f2)"
[[ -x "$load" ]] || die "the quota_load bench binary is missing; run cargo bench --bench quota_load --no-run"

# The binary reads every TOKENMETER_* variable as a setting; hide the deploy scripts' own.
tm_env=()
while read -r name; do
  rest="${name#TOKENMETER_}"
  [[ "$rest" == *__* || "$rest" == SHUTDOWN_GRACE ]] || tm_env+=(-u "$name")
done < <(compgen -e | grep '^TOKENMETER_' || true)

PSQL="$(command -v psql || find /usr/lib/postgresql -path '*/bin/psql' 2>/dev/null | sort -V | tail -1)"
[[ -x "$PSQL" ]] || die "psql not found"
base_url="$(deploy/local/postgres.sh url)"
bench_db="tm_quota_bench_$(date +%s)_$$"
bench_url="${base_url%/*}/$bench_db"
pg_version="$("$PSQL" "$base_url" -XqtAc 'SHOW server_version')"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out_dir="target/bench"
mkdir -p "$out_dir"
figures="$out_dir/quota_reserve-$stamp.txt"

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

pids=()
# shellcheck disable=SC2317 # runs from the EXIT trap
cleanup() {
  local rc=$?
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  "$PSQL" "$base_url" -XqtAc "DROP DATABASE IF EXISTS \"$bench_db\" WITH (FORCE)" >/dev/null 2>&1 || true
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

"$PSQL" "$base_url" -XqtAc "CREATE DATABASE \"$bench_db\"" >/dev/null
export QUOTA_BENCH_API_KEY="bench-$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')"
targets=()
for replica in $(seq 1 "$REPLICAS"); do
  grpc_port="$(free_port)"
  admin_port="$(free_port)"
  env "${tm_env[@]}" TOKENMETER_DATABASE__URL="$bench_url" \
    TOKENMETER_AUTH__BOOTSTRAP_ADMIN_KEY="$QUOTA_BENCH_API_KEY" \
    TOKENMETER_GRPC__LISTEN_ADDR="127.0.0.1:$grpc_port" \
    TOKENMETER_ADMIN__LISTEN_ADDR="127.0.0.1:$admin_port" \
    TOKENMETER_KAFKA__ENABLED=false \
    ${QUOTA_WRITERS:+TOKENMETER_QUOTA__WRITERS="$QUOTA_WRITERS"} \
    ${QUOTA_LEASES:+TOKENMETER_QUOTA__LEASES="$QUOTA_LEASES"} \
    TOKENMETER_LOG__FILTER="${TOKENMETER_LOG__FILTER:-warn}" \
    "$bin" serve --run-migrations >"$out_dir/quota_reserve-$stamp.server$replica.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 1 300); do
    curl -fsS -m 2 "http://127.0.0.1:$admin_port/readyz" >/dev/null 2>&1 && break
    kill -0 "${pids[-1]}" 2>/dev/null || die "server $replica exited during startup"
    sleep 0.2
  done
  targets+=("http://127.0.0.1:$grpc_port")
  # Migrations are applied by the first replica before the next one starts.
done

# One load process (separate from the servers) for all replicas: they share its tenants and
# budgets, its connections spread over them.
run() {
  local rate="$1" label="$2" out="$out_dir/quota_reserve-$stamp.$2.json" rc=0
  "$load" --target "$(IFS=,; echo "${targets[*]}")" --concurrency "$CONCURRENCY" --rate "$rate" \
    --duration "$DURATION" --tenants "$TENANTS" --budget "$BUDGET" --tokens "$TOKENS" \
    --settle "$SETTLE" --call "$CALL" >"$out" || rc=1
  python3 - "$label" "$out" <<'PY'
import json, sys
label, f = sys.argv[1], sys.argv[2]
r = json.load(open(f))
ms = r["reserve_ms"]
print(f"{label:<16} decisions {r['decisions']:>8}  ({r['allowed']} allowed, {r['denied']} denied, {r['health_checks']} health checks, {r['errors']} errors)  "
      f"{r['decisions_per_s']:>8.0f} decisions/s  reserve p50 {ms['p50']:.2f} ms  p90 {ms['p90']:.2f} ms  "
      f"p99 {ms['p99']:.2f} ms  max {ms['max']:.2f} ms  from send p50 {r['sent_ms']['p50']:.2f} ms  "
      f"p99 {r['sent_ms']['p99']:.2f} ms  settles {r['settles']} ({r['settle_errors']} errors, "
      f"{r['settles'] / r['settled_s']:.0f}/s)  settle p50 {r['settle_ms']['p50']:.2f} ms  p99 {r['settle_ms']['p99']:.2f} ms  "
      f"budget used {r['budget_used']:.3f}  overspend {r['overspend_tokens'] + r['stored_overspend_tokens']}")
PY
  return "$rc"
}

{
  echo "==== tokenmeter quota reserve benchmark ===="
  echo "date        $stamp"
  echo "commit      $commit"
  echo "machine     $machine"
  echo "postgres    $pg_version (deploy/local/postgres.sh settings)"
  echo "load        $(cut -d' ' -f1-3 /proc/loadavg) (1/5/15-min load average before the runs; the box may be shared)"
  echo "setup       $REPLICAS serve process(es), quota.leases ${QUOTA_LEASES:-true}, $CONCURRENCY callers, $TENANTS tenants x hard daily budget $BUDGET tokens, $TOKENS tokens per Reserve, settle of each allow: $SETTLE, calls: $CALL, $DURATION per run"
} | tee "$figures"
status=0
run 0 "saturation" | tee -a "$figures" || status=1
for rate in $RATES; do
  run "$rate" "rate-$rate" | tee -a "$figures" || status=1
done
echo "load after  $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$figures"
echo "target      p99 <= 1 ms at >= 20000 decisions/s, overspend 0" | tee -a "$figures"
echo "kept        $figures and the JSON reports beside it" | tee -a "$figures"
exit "$status"
