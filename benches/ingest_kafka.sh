#!/usr/bin/env bash
# End-to-end Kafka ingest benchmark (DESIGN §7, issue 4): `tokenmeter loadgen --kafka-topic`
# pre-loads a fresh topic (PARTITIONS partitions) with EVENTS unique usage events plus 5 %
# duplicates, in all three wire formats; then the release binary's `serve` starts on a fresh
# database with the consumer on that topic, and the script measures the drain: wall time from
# the server's start until every partition's position is stored in Postgres, events/s overall and
# over the steady middle (10 % to 90 % drained, from kafka_offsets), the service's peak RSS, the
# CPU each process spent, and the consumer's end-to-end latency histogram. It checks the stored
# per-tenant, per-class sums against loadgen's ground truth, then times a binary COPY of the same
# rows into the same table in a second database for the ratio. Optionally (LATENCY_RATE) a second
# phase produces at a fixed rate below capacity to measure produce → rollup latency honestly
# (for a pre-loaded topic the histogram is mostly queueing time).
#
#   benches/ingest_kafka.sh                      # 10M events: tens of minutes on 2 cores
#   EVENTS=1000000 LATENCY_RATE=5000 benches/ingest_kafka.sh
#
# Environment (all optional):
#   EVENTS=10000000  DUPLICATE_RATIO=0.05  POISON_RATIO=0  PARTITIONS=8  TENANTS=100  SEED=1
#   CODECS=protobuf,cloudevents-structured,cloudevents-binary  LOADGEN_ARGS="..." (more options)
#   LATENCY_RATE=0 (events/s of the second phase; 0 = no second phase)  LATENCY_SECONDS=30
#   SERVER_ENV="TOKENMETER_KAFKA__CONSUMER__WRITERS=4 ..." (more server settings)
#   KAFKA_BROKERS=127.0.0.1:9092  BENCH_DATABASE_URL (default: deploy/local/postgres.sh url)
#   KAFKA_LIBS (Kafka jars for creating and deleting the topics; default .local/kafka/libs)
#   KEEP_DATABASES=1  KEEP_TOPICS=1  SKIP_BUILD=1  TOKENMETER_LOG__FILTER (default warn)
#
# Exit status: non-zero if anything fails or the stored totals differ from the ground truth;
# missing a performance target is reported, not fatal. Figures, the loadgen reports, the metrics
# and the server log are kept under target/bench/.
# shellcheck disable=SC2154 # the loadgen figures (lg_*, lat_*) are assigned by `eval` below
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

EVENTS="${EVENTS:-10000000}"
DUPLICATE_RATIO="${DUPLICATE_RATIO:-0.05}"
POISON_RATIO="${POISON_RATIO:-0}"
PARTITIONS="${PARTITIONS:-8}"
# Key = tenant id: with 10 tenants the partitions would get at most 10 keys, some none.
TENANTS="${TENANTS:-100}"
SEED="${SEED:-1}"
CODECS="${CODECS:-protobuf,cloudevents-structured,cloudevents-binary}"
LOADGEN_ARGS="${LOADGEN_ARGS:-}"
LATENCY_RATE="${LATENCY_RATE:-0}"
LATENCY_SECONDS="${LATENCY_SECONDS:-30}"
SERVER_ENV="${SERVER_ENV:-}"

# DESIGN §7 targets for this benchmark.
TARGET_EVENTS_PER_S=100000
TARGET_RATIO=0.5
TARGET_RSS_MIB=256

# shellcheck source=benches/lib.sh
source benches/lib.sh

bench_db="tm_bench_kafka_$(date +%s)_$$"
copy_db="${bench_db}_copy"
bench_url="$(url_for "$bench_db")"
run_id="kb$(date +%s | tail -c 7)"
topic="tm-bench-$run_id"
dlq="$topic.dlq"
group="tm-bench-$run_id"
report_json="$out_dir/ingest_kafka-$stamp.json"
latency_json="$out_dir/ingest_kafka-$stamp.latency.json"
metrics_txt="$out_dir/ingest_kafka-$stamp.metrics.txt"
server_log="$out_dir/ingest_kafka-$stamp.server.log"
figures_txt="$out_dir/ingest_kafka-$stamp.txt"

# --- topics --------------------------------------------------------------------------------------
kafka_libs="${KAFKA_LIBS:-${TOKENMETER_LOCAL_DIR:-$PWD/.local}/kafka/libs}"
compgen -G "$kafka_libs/kafka-clients-*.jar" >/dev/null \
  || die "no Kafka jars in $kafka_libs (deploy/local/kafka.sh start fetches them; or set KAFKA_LIBS)"
kafka_topics() {
  java -Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -cp "$kafka_libs/*" \
    org.apache.kafka.tools.TopicCommand --bootstrap-server "$kafka_brokers" "$@" \
    2>"$scratch/topic-command.log"
}
topics_created=()
create_topic() {
  kafka_topics --create --topic "$1" --partitions "$2" --replication-factor 1 >/dev/null \
    || { cat "$scratch/topic-command.log" >&2; die "could not create topic $1"; }
  topics_created+=("$1")
}
# Deletes the topics (once read, or on exit), unless KEEP_TOPICS=1.
bench_cleanup() {
  if [[ "${KEEP_TOPICS:-0}" == 1 ]]; then
    ((${#topics_created[@]})) && log "kept topics: ${topics_created[*]}"
  else
    for t in "${topics_created[@]}"; do
      kafka_topics --delete --topic "$t" >/dev/null || log "could not delete topic $t"
    done
  fi
  topics_created=()
}
create_topic "$topic" "$PARTITIONS"
create_topic "$dlq" 1

# --- pre-load --------------------------------------------------------------------------------------
loadgen_cmd=(loadgen --kafka-topic "$topic" --kafka-brokers "$kafka_brokers" --events "$EVENTS"
  --duplicate-ratio "$DUPLICATE_RATIO" --poison-ratio "$POISON_RATIO" --tenants "$TENANTS"
  --seed "$SEED" --codecs "$CODECS" --run-id "$run_id")
# shellcheck disable=SC2206 # word splitting of extra options is intended
loadgen_cmd+=($LOADGEN_ARGS)
log "pre-loading: tokenmeter ${loadgen_cmd[*]}"
tm "${loadgen_cmd[@]}" --json >"$report_json"

# Figures of a loadgen report, as shell assignments prefixed with $2.
report_vars() {
  python3 - "$1" "$2" <<'PY'
import json, shlex, sys
r, prefix = json.load(open(sys.argv[1])), sys.argv[2]
v = {
    "messages": r["kafka"]["messages"],
    "unique": r["sent"]["original"],
    "invalid": r["sent"]["invalid"],
    "dups": r["sent"]["duplicate"],
    "conflicts": r["sent"]["conflict"],
    "poison": r["kafka"]["poison"],
    "accepted": r["expected"]["accepted"],
    "dead": r["expected_dead_letters"],
    "by_codec": ", ".join(f"{k} {n}" for k, n in r["kafka"]["messages_by_codec"].items()),
    "produce_mps": "%.0f" % r["performance"]["messages_per_s"],
    "produce_s": "%.1f" % r["performance"]["elapsed_s"],
    "tokens": r["tokens"]["total"],
    # SQL VALUES of (partition, end offset): drained when every stored position reaches them.
    "ends": ",".join(f"({p},{n})" for p, n in r["end_offsets"].items()),
    "partitions": len(r["end_offsets"]),
}
for k, x in v.items():
    print(f"{prefix}{k}={shlex.quote(str(x))}")
PY
}
eval "$(report_vars "$report_json" lg_)"

# --- sampling ---------------------------------------------------------------------------------------
clk_tck="$(getconf CLK_TCK)"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
# Busy ticks of the whole machine (every process, every core).
machine_busy() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }
# "pid ticks" of every process named $1 (e.g. every Postgres process, whoever it serves).
ticks_by_pid() {
  local f line
  for f in /proc/[0-9]*/stat; do
    { read -r line <"$f"; } 2>/dev/null || continue
    if [[ "$line" == *"($1)"* ]]; then awk '{print $1, $14 + $15}' <<<"$line"; fi
  done
}
# Ticks spent between two ticks_by_pid snapshots by the processes alive at the second (those
# that exited in between are missed, so this is a lower bound).
ticks_between() {
  awk 'NR == FNR {before[$1] = $2; next} {total += $2 - before[$1]} END {print total + 0}' "$1" "$2"
}
kafka_pid="$(pgrep -f 'kafka\.Kafka ' | head -1 || true)"
declare -A backend_ticks=()
samples="$scratch/samples.tsv"
: >"$samples"

# Polls until the group's stored positions reach `ends`; records (seconds since $1, messages
# drained, server RSS in KiB) per sample in $samples and the CPU of the database's backends in backend_ticks.
drain() {
  local t0="$1" ends="$2" partitions="$3" timeout_s="$4" now out progress done_parts pid
  while :; do
    now="$(date +%s%N)"
    # (LEAST ignores NULLs: a partition with no stored position counts 0, not its end.)
    out="$(psql_q "$bench_url" -F ' ' -c "SELECT coalesce(sum(least(coalesce(k.next_offset, 0), e.n)), 0),
            count(*) FILTER (WHERE k.next_offset >= e.n)
          FROM (VALUES $ends) AS e (p, n)
          LEFT JOIN kafka_offsets k ON k.partition = e.p AND k.topic = '$topic'
            AND k.consumer_group = '$group'" \
        -c "SELECT coalesce(string_agg(pid::text, ' '), '') FROM pg_stat_activity
          WHERE datname = '$bench_db' AND pid <> pg_backend_pid()" 2>/dev/null || true)"
    read -r progress done_parts <<<"$(sed -n 1p <<<"$out")"
    # shellcheck disable=SC2013 # the line is a list of pids
    for pid in $(sed -n 2p <<<"$out"); do
      backend_ticks[$pid]="$(cpu_ticks "$pid")"
    done
    echo "$(awk -v a="$t0" -v b="$now" 'BEGIN {printf "%.3f", (b - a) / 1e9}') ${progress:-0} $(rss_kib "$server_pid" VmRSS)" >>"$samples"
    [[ "${done_parts:-0}" == "$partitions" ]] && return 0
    kill -0 "$server_pid" 2>/dev/null || { tail -30 "$server_log" >&2; die "the server died while draining"; }
    (($(date +%s) - t0 / 1000000000 < timeout_s)) || die "not drained within $timeout_s s (log: $server_log)"
    sleep 0.25
  done
}

metrics() { curl -fsS -m 5 "http://127.0.0.1:$admin_port/metrics"; }

# histogram NAME UNIT NOW [BEFORE]: quantiles of a histogram in a /metrics scrape (minus an
# earlier scrape): the upper bound of the bucket where each falls, as buckets allow, and the mean.
histogram() {
  python3 - "$1" "$2" "$3" "${4:-/dev/null}" <<'PY'
import re, sys
name, unit, now_path, before_path = sys.argv[1:5]
def read(path):
    buckets, total, count = {}, 0.0, 0.0
    for line in open(path):
        m = re.match(rf'{name}_bucket{{le="([^"]+)"}} (\S+)', line)
        if m:
            buckets[float(m.group(1))] = float(m.group(2))
        elif line.startswith(f"{name}_sum "):
            total = float(line.split()[1])
        elif line.startswith(f"{name}_count "):
            count = float(line.split()[1])
    return buckets, total, count
b1, s1, c1 = read(now_path)
b0, s0, c0 = read(before_path)
count, total = c1 - c0, s1 - s0
cum = sorted((le, n - b0.get(le, 0.0)) for le, n in b1.items())
def q(p):
    for le, n in cum:
        if n >= p * count:
            return f"> {cum[-2][0]:g}{unit}" if le == float("inf") else f"<= {le:g}{unit}"
    return "n/a"
mean = total / count if count else 0.0
print(f"p50 {q(0.5)}, p99 {q(0.99)}, mean {mean:.3g}{unit}, {count:.0f} observations")
PY
}

# --- drain ---------------------------------------------------------------------------------------
create_db "$bench_db"
log "database $bench_db; consumer group $group on $topic ($lg_messages messages)"
cpu_before_machine="$(machine_busy)"
ticks_by_pid postgres >"$scratch/pg_before"
kafka_before="$( [[ -n "$kafka_pid" ]] && cpu_ticks "$kafka_pid" || echo 0)"
t_start="$(date +%s%N)"
# shellcheck disable=SC2086 # SERVER_ENV is a list of NAME=VALUE words
start_server TOKENMETER_DATABASE__URL="$bench_url" TOKENMETER_KAFKA__BROKERS="$kafka_brokers" \
  TOKENMETER_KAFKA__CONSUMER__ENABLED=true TOKENMETER_KAFKA__CONSUMER__USAGE_TOPIC="$topic" \
  TOKENMETER_KAFKA__CONSUMER__DEAD_LETTER_TOPIC="$dlq" TOKENMETER_KAFKA__CONSUMER__GROUP_ID="$group" \
  $SERVER_ENV
ready_s="$(awk -v a="$t_start" -v b="$(date +%s%N)" 'BEGIN {printf "%.1f", (b - a) / 1e9}')"
drain "$t_start" "$lg_ends" "$lg_partitions" 7200
drain_s="$(tail -1 "$samples" | cut -d' ' -f1)"
tm_ticks="$(cpu_ticks "$server_pid")"
cpu_after_machine="$(machine_busy)"
ticks_by_pid postgres >"$scratch/pg_after"
kafka_after="$( [[ -n "$kafka_pid" ]] && cpu_ticks "$kafka_pid" || echo 0)"
rss_peak_kib="$(rss_kib "$server_pid" VmHWM)"
metrics >"$metrics_txt.drain"
backend_total=0
for pid in "${!backend_ticks[@]}"; do backend_total=$((backend_total + backend_ticks[$pid])); done

# Overall and steady (10 % → 90 % drained) rates, from the samples.
read -r eps steady_eps steady_window < <(awk -v total="$lg_messages" -v wall="$drain_s" '
  { t[NR] = $1; n[NR] = $2 }
  END {
    for (i = 1; i <= NR; i++) {
      if (!a && n[i] >= 0.1 * total) a = i
      if (!b && n[i] >= 0.9 * total) b = i
    }
    steady = (b > a && t[b] > t[a]) ? (n[b] - n[a]) / (t[b] - t[a]) : 0
    printf "%.0f %.0f %.1f-%.1fs\n", total / wall, steady, t[a], t[b]
  }' "$samples")
# Server RSS as the drain went on (the sample nearest each fraction drained): growth with the
# events consumed, rather than a steady level, would point at a leak or fragmentation.
rss_course="$(awk -v total="$lg_messages" '
  { n[NR] = $2; r[NR] = $3 }
  END {
    split("0.1 0.25 0.5 0.75 0.9", fr, " ")
    for (j = 1; j <= 5; j++)
      for (i = 1; i <= NR; i++)
        if (n[i] >= fr[j] * total) { printf "%s%d %% %.1f", (j > 1 ? ", " : ""), fr[j] * 100, r[i] / 1024; break }
    print " MiB"
  }' "$samples")"
e2e_drain="$(histogram tokenmeter_kafka_end_to_end_seconds " s" "$metrics_txt.drain")"
batch_size="$(histogram tokenmeter_kafka_batch_messages " messages" "$metrics_txt.drain")"
flush="$(histogram tokenmeter_kafka_batch_flush_seconds " s" "$metrics_txt.drain")"
outcomes="$(grep '^tokenmeter_ingest_events_total{channel="kafka"' "$metrics_txt.drain" \
  | sed 's/.*outcome="\([a-z]*\)"} \([0-9]*\)/\1 \2/' | paste -sd, - | sed 's/,/, /g')"

# --- optional: latency at a fixed produce rate below capacity -------------------------------------
latency_line="not measured (LATENCY_RATE=0)"
if ((LATENCY_RATE > 0)); then
  latency_events=$((LATENCY_RATE * LATENCY_SECONDS))
  log "latency phase: $latency_events events at $LATENCY_RATE events/s"
  tm loadgen --kafka-topic "$topic" --kafka-brokers "$kafka_brokers" --events "$latency_events" \
    --duplicate-ratio "$DUPLICATE_RATIO" --tenants "$TENANTS" --seed "$((SEED + 1))" \
    --codecs "$CODECS" --run-id "${run_id}l" --rate "$LATENCY_RATE" --json --quiet >"$latency_json"
  eval "$(report_vars "$latency_json" lat_)"
  drain "$(date +%s%N)" "$lat_ends" "$lat_partitions" 600
  metrics >"$metrics_txt"
  latency_line="$(histogram tokenmeter_kafka_end_to_end_seconds " s" "$metrics_txt" "$metrics_txt.drain") at $LATENCY_RATE events/s offered"
else
  cp "$metrics_txt.drain" "$metrics_txt"
fi
stop_server

# --- the stored rows against the ground truth, then the same rows by raw binary COPY -------------
reports=("$report_json")
((LATENCY_RATE > 0)) && reports+=("$latency_json")
stored_check="$(check_stored "$bench_url" "lg-${run_id}%" "${reports[@]}")"
expected_rows="$(python3 -c 'import json, sys; print(sum(json.load(open(p))["expected"]["accepted"] for p in sys.argv[1:]))' "${reports[@]}")"
expected_conflicts="$(python3 -c 'import json, sys; print(sum(json.load(open(p))["sent"]["conflict"] for p in sys.argv[1:]))' "${reports[@]}")"
stored_conflicts="$(psql_q "$bench_url" -c 'SELECT count(*) FROM usage_event_conflicts')"
dead_check="not counted (kcat not found)"
if command -v kcat >/dev/null 2>&1; then
  dead_letters="$(kcat -C -b "$kafka_brokers" -t "$dlq" -e -q -f '%o\n' 2>/dev/null | wc -l)"
  dead_check="$dead_letters (expected $lg_dead)"
fi
bench_cleanup
copy_baseline "$bench_url" "$copy_db"
ratio="$(awk -v i="$steady_eps" -v c="$copy_rps" 'BEGIN {printf "%.3f", (c > 0 ? i / c : 0)}')"
ratio_overall="$(awk -v i="$eps" -v c="$copy_rps" 'BEGIN {printf "%.3f", (c > 0 ? i / c : 0)}')"

# --- figures ------------------------------------------------------------------------------------
cpu_s() { awk -v t="$1" -v hz="$clk_tck" 'BEGIN {printf "%.1f", t / hz}'; }
per_event_us() { awk -v t="$1" -v hz="$clk_tck" -v n="$lg_messages" 'BEGIN {printf "%.1f", t / hz / n * 1e6}'; }
machine_ticks=$((cpu_after_machine - cpu_before_machine))
busy_pct="$(awk -v t="$machine_ticks" -v hz="$clk_tck" -v w="$drain_s" -v c="$(nproc)" 'BEGIN {printf "%.0f", 100 * t / hz / (w * c)}')"
rows_note=""
[[ "$stored_rows" == "$expected_rows" ]] || rows_note="  (MISMATCH: expected $expected_rows, one per first-seen valid event)"
conflicts_note=""
[[ "$stored_conflicts" == "$expected_conflicts" ]] || conflicts_note="  (MISMATCH: expected $expected_conflicts)"
{
  echo "==== tokenmeter Kafka ingest benchmark ===="
  echo "date            $stamp"
  echo "commit          $commit"
  echo "machine         $machine"
  echo "postgres        $pg_version; kafka $kafka_version (single node, same box)"
  echo "pre-load        tokenmeter ${loadgen_cmd[*]}"
  echo "messages        $lg_messages = $lg_unique unique (of which $lg_invalid invalid) + $lg_dups duplicates + $lg_conflicts conflicts + $lg_poison poison, $lg_partitions partitions"
  echo "wire formats    $lg_by_codec"
  echo "producer        $lg_produce_mps messages/s over $lg_produce_s s (loadgen, idempotent, lz4)"
  echo "server          defaults${SERVER_ENV:+ + $SERVER_ENV}; ready after $ready_s s"
  echo "drain           $lg_messages messages in $drain_s s from the server's start = $eps events/s"
  echo "steady          $steady_eps events/s from 10 % to 90 % drained ($steady_window)"
  echo "batch size      $batch_size"
  echo "batch flush     $flush"
  echo "outcomes        $outcomes (metrics, channel kafka)"
  echo "end-to-end      $e2e_drain (pre-loaded topic: mostly time spent queued)"
  echo "latency phase   $latency_line"
  echo "rows stored     $stored_rows in usage_events$rows_note"
  echo "conflicts       $stored_conflicts in usage_event_conflicts$conflicts_note"
  echo "dead letters    $dead_check"
  echo "stored tokens   $stored_check"
  echo "server RSS      peak (VmHWM) $(mib "$rss_peak_kib"); during the drain (VmRSS at % drained) $rss_course"
  echo "CPU (drain)     tokenmeter $(cpu_s "$tm_ticks") s ($(per_event_us "$tm_ticks") µs/event),"\
    "its Postgres backends $(cpu_s "$backend_total") s ($(per_event_us "$backend_total") µs/event),"\
    "all Postgres processes $(cpu_s "$(ticks_between "$scratch/pg_before" "$scratch/pg_after")") s (at least), Kafka broker $(cpu_s $((kafka_after - kafka_before))) s;"\
    "machine busy $busy_pct % of $(nproc) cores (other load included)"
  echo "binary COPY     $copied_rows rows ($file_mib MiB) in $copy_s s = $copy_rps rows/s"
  echo "ratio           steady events/s / COPY rows/s = $ratio (overall: $ratio_overall)"
  echo "targets         steady events/s >= $TARGET_EVENTS_PER_S: $(verdict "$steady_eps" '>=' "$TARGET_EVENTS_PER_S"),"\
    "ratio >= $TARGET_RATIO: $(verdict "$ratio" '>=' "$TARGET_RATIO"),"\
    "RSS <= $TARGET_RSS_MIB MiB: $(verdict "${rss_peak_kib:-0}" '<=' "$((TARGET_RSS_MIB * 1024))")"
  echo "kept            $figures_txt, $report_json, $metrics_txt, $server_log"
} | tee "$figures_txt"

[[ "$stored_check" != MISMATCH* && -z "$rows_note" && -z "$conflicts_note" ]] || exit 1
