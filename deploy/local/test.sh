#!/usr/bin/env bash
# The whole test suite on a fresh Debian machine: installs what is missing, starts the real
# Postgres and Kafka on loopback, checks formatting and lints, then runs unit, property and
# integration tests against them. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
started=$SECONDS

source deploy/local/deps.sh
deploy/local/postgres.sh start
deploy/local/kafka.sh start

database_url="$(deploy/local/postgres.sh url)"
export TOKENMETER_TEST_DATABASE_URL="${TOKENMETER_TEST_DATABASE_URL:-$database_url}"
export TOKENMETER_TEST_KAFKA_BROKERS="${TOKENMETER_TEST_KAFKA_BROKERS:-127.0.0.1:${KAFKA_PORT:-9092}}"
export TOKENMETER_TEST_KAFKA_SASL_BROKERS="${TOKENMETER_TEST_KAFKA_SASL_BROKERS:-127.0.0.1:${KAFKA_SASL_PORT:-9094}}"

# Each integration test creates its own database; drop the ones earlier runs left behind.
psql "$TOKENMETER_TEST_DATABASE_URL" -qtA -c \
  "SELECT format('DROP DATABASE IF EXISTS %I;', datname) FROM pg_database WHERE datname LIKE 'tm\_test\_%'" \
  | psql "$TOKENMETER_TEST_DATABASE_URL" -q >/dev/null

# The alert rules' unit tests need promtool, from Debian's prometheus package (the server it
# also brings is not started: the package's service stays off outside systemd).
if ! command -v promtool >/dev/null 2>&1; then
  echo "test.sh: installing promtool (Debian package prometheus)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
           --no-install-recommends prometheus >/dev/null; }
fi
promtool check rules deploy/prometheus/alerts.yml
promtool test rules deploy/prometheus/alerts.test.yml
# Provider SDK conformance: the official SDKs pinned in tests/sdk/requirements.txt (from PyPI)
# regenerate tests/sdk's fixtures and field lists; a difference fails here, before the Rust
# tests that read them.
sdk_venv=.local/sdk-venv
if ! cmp -s tests/sdk/requirements.txt "$sdk_venv/requirements.txt"; then
  python3 -m venv --clear "$sdk_venv"
  "$sdk_venv/bin/pip" install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
  cp tests/sdk/requirements.txt "$sdk_venv/requirements.txt"
fi
"$sdk_venv/bin/python" tests/sdk/generate.py --check

cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked "$@"
echo "test.sh: finished in $((SECONDS - started)) s" >&2
