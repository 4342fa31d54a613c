#!/usr/bin/env bash
# One command from a fresh Debian machine to a running tokenmeter: installs what is missing,
# starts Postgres and Kafka on loopback, builds, migrates, and serves in the foreground
# (Ctrl-C drains and stops it; `deploy/local/down.sh` stops Postgres and Kafka).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

source deploy/local/deps.sh
if ! command -v kcat >/dev/null 2>&1; then
  apt-get install -y -qq kcat >/dev/null 2>&1 || echo "up: kcat not installed (optional)" >&2
fi
deploy/local/postgres.sh start
deploy/local/kafka.sh start

cargo build --release --locked
export TOKENMETER_DATABASE__URL="${TOKENMETER_DATABASE__URL:-$(deploy/local/postgres.sh url)}"
./target/release/tokenmeter migrate

# Every call needs an API key. For local use, a bootstrap admin key is made once and kept in
# .local/admin-key (mode 600); create scoped keys with `tokenmeter keys create`.
key_file=.local/admin-key
if [[ ! -s "$key_file" ]]; then
  mkdir -p .local
  (umask 077 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$key_file")
fi
export TOKENMETER_AUTH__BOOTSTRAP_ADMIN_KEY="${TOKENMETER_AUTH__BOOTSTRAP_ADMIN_KEY:-$(cat "$key_file")}"
echo "up: serving gRPC on 127.0.0.1:50051, admin HTTP on 127.0.0.1:9464 (Ctrl-C to stop)" >&2
echo "up: admin key in $key_file — e.g. grpcurl -H \"authorization: Bearer \$(cat $key_file)\" …" >&2
exec ./target/release/tokenmeter serve "$@"
