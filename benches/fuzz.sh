#!/usr/bin/env bash
# Fuzzes the Kafka message decoders and the provider-usage normalizers (issue 8) with cargo-fuzz
# (libFuzzer, AddressSanitizer): each target in fuzz/fuzz_targets runs for a bounded time under
# memory limits, starting from the committed seeds (fuzz/seeds/<target>) and growing its corpus
# in fuzz/corpus/<target> (kept between runs, not committed). Prints, per target, the inputs
# tried (executions), the corpus size and the crashes found.
#
#   benches/fuzz.sh                     # from anywhere; 3 targets × 60 s, plus a first build
#   FUZZ_SECONDS=600 TARGETS=decode benches/fuzz.sh
#
# Environment (all optional):
#   FUZZ_SECONDS=60       seconds per target
#   TARGETS="decode validate_protobuf normalize_json"
#   RSS_LIMIT_MB=2048     the whole process (AddressSanitizer included); beyond it libFuzzer reports an out-of-memory crash
#   MALLOC_LIMIT_MB=64    one allocation; inputs are at most a few KiB, so anything near this
#                         is an unbounded allocation
#   JOBS=1                parallel fuzzing processes per target
#
# Needs a nightly toolchain (rustup) and cargo-fuzz (installed from crates.io if missing).
# Exit status: non-zero if any target crashed; the crashing inputs are in
# fuzz/artifacts/<target>/ (replay one with `cargo +nightly fuzz run --fuzz-dir fuzz <target>
# <file>`; fix the bug and keep the input as a regression unit test).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
TARGETS="${TARGETS:-decode validate_protobuf normalize_json}"
RSS_LIMIT_MB="${RSS_LIMIT_MB:-2048}"
MALLOC_LIMIT_MB="${MALLOC_LIMIT_MB:-64}"
JOBS="${JOBS:-1}"
TARGET_DIR="target/fuzz"

log() { echo "fuzz: $*" >&2; }
die() { echo "fuzz: error: $*" >&2; exit 1; }

rustup toolchain list 2>/dev/null | grep -q '^nightly' \
  || die "a nightly toolchain is required: rustup toolchain install nightly"
if ! cargo fuzz --version >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi
# The fuzz crate is its own workspace; start it from the root's locked versions.
[[ -f fuzz/Cargo.lock ]] || cp Cargo.lock fuzz/Cargo.lock

log "building the fuzz targets (nightly, release, AddressSanitizer)"
cargo +nightly fuzz build --fuzz-dir fuzz --target-dir "$TARGET_DIR" >&2

mkdir -p "$TARGET_DIR/logs"
summary="$TARGET_DIR/summary.txt"
printf '%-18s %8s %12s %10s %10s %8s %8s %8s\n' \
  target seconds executions exec/s corpus bytes rss_mb crashes >"$summary"
failed=0
for target in $TARGETS; do
  corpus="fuzz/corpus/$target"
  artifacts="fuzz/artifacts/$target"
  mkdir -p "$corpus" "$artifacts"
  crashes_before=$(find "$artifacts" -type f | wc -l)
  run_log="$TARGET_DIR/logs/$target.log"
  log "running $target for ${FUZZ_SECONDS}s (log: $run_log)"
  status=0
  cargo +nightly fuzz run --fuzz-dir fuzz --target-dir "$TARGET_DIR" --jobs "$JOBS" \
    "$target" "$corpus" "fuzz/seeds/$target" -- \
    -max_total_time="$FUZZ_SECONDS" \
    -rss_limit_mb="$RSS_LIMIT_MB" \
    -malloc_limit_mb="$MALLOC_LIMIT_MB" \
    -timeout=10 \
    -dict=fuzz/json.dict \
    -print_final_stats=1 \
    >"$run_log" 2>&1 || status=$?
  stat() { sed -n "s/^stat::$1: *//p" "$run_log" | awk '{s += $1} END {print s + 0}'; }
  executions=$(stat number_of_executed_units)
  per_second=$(stat average_exec_per_sec)
  rss=$(stat peak_rss_mb)
  corpus_files=$(find "$corpus" -type f | wc -l)
  corpus_bytes=$(find "$corpus" -type f -printf '%s\n' | awk '{s += $1} END {print s + 0}')
  crashes=$(($(find "$artifacts" -type f | wc -l) - crashes_before))
  if ((status != 0)); then
    failed=1
    ((crashes > 0)) || crashes="?"
    log "$target failed (exit $status); see $run_log and $artifacts/"
    grep -m5 -E 'panicked|ERROR: libFuzzer|SUMMARY' "$run_log" >&2 || true
  fi
  printf '%-18s %8s %12s %10s %10s %8s %8s %8s\n' "$target" "$FUZZ_SECONDS" "$executions" \
    "$per_second" "$corpus_files" "$corpus_bytes" "$rss" "$crashes" >>"$summary"
done

echo "fuzz run $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) cores, $(rustc +nightly --version)"
echo "limits: -rss_limit_mb=$RSS_LIMIT_MB -malloc_limit_mb=$MALLOC_LIMIT_MB -timeout=10s"
cat "$summary"
exit "$failed"
