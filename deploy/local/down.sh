#!/usr/bin/env bash
# Stops the local Kafka and Postgres started by up.sh / test.sh. Data stays in .local/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
deploy/local/kafka.sh stop
deploy/local/postgres.sh stop
