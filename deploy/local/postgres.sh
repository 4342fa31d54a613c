#!/usr/bin/env bash
# Local PostgreSQL for development and tests: installs Debian's package if missing, runs a
# project-owned cluster under $TOKENMETER_LOCAL_DIR/postgres (so it never touches a system
# cluster), and creates the `tokenmeter` role and database. Idempotent.
#
#   deploy/local/postgres.sh [start|stop|status|url]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LOCAL_DIR="${TOKENMETER_LOCAL_DIR:-$REPO_ROOT/.local}"
PG_PORT="${TOKENMETER_PG_PORT:-5433}"
PG_USER=tokenmeter
PG_PASSWORD=tokenmeter
PG_DB=tokenmeter

# The cluster runs as the `postgres` user, which may not be able to enter a checkout under a
# private home directory (CI clones anywhere); then the data goes under /var/tmp instead.
resolve_dirs() {
  PG_DIR="${TOKENMETER_PG_DIR:-$LOCAL_DIR/postgres}"
  if [[ -z "${TOKENMETER_PG_DIR:-}" && "$(id -u)" == 0 ]] && id postgres >/dev/null 2>&1 \
    && ! runuser -u postgres -- test -x "$REPO_ROOT"; then
    PG_DIR="/var/tmp/tokenmeter-$(echo -n "$REPO_ROOT" | md5sum | cut -c1-8)/postgres"
  fi
  PG_DATA="$PG_DIR/data"
  PG_LOG="$PG_DIR/server.log"
}

log() { echo "postgres: $*" >&2; }

pg_bin() {
  local dir
  dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
  [[ -n "$dir" && -x "$dir/pg_ctl" ]] && echo "$dir"
}

install_if_missing() {
  if [[ -z "$(pg_bin)" ]]; then
    log "installing Debian postgresql"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq postgresql postgresql-contrib >/dev/null
  fi
}

# initdb and postgres refuse to run as root, so the cluster belongs to the `postgres` user.
as_postgres() {
  if [[ "$(id -u)" == 0 ]]; then
    # From /, so the postgres user is not left in a directory it may not enter.
    (cd / && runuser -u postgres -- "$@")
  else
    "$@"
  fi
}

is_running() {
  local bin; bin="$(pg_bin)" || return 1
  [[ -f "$PG_DATA/PG_VERSION" ]] && as_postgres "$bin/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

psql_admin() {
  local bin; bin="$(pg_bin)"
  as_postgres "$bin/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"
}

start() {
  install_if_missing
  resolve_dirs
  local bin; bin="$(pg_bin)"
  mkdir -p "$PG_DIR"
  if [[ "$(id -u)" == 0 ]]; then chown postgres: "$PG_DIR"; fi
  if ! as_postgres test -w "$PG_DIR"; then
    log "the postgres user cannot write $PG_DIR; set TOKENMETER_PG_DIR"; exit 1
  fi
  if [[ ! -f "$PG_DATA/PG_VERSION" ]]; then
    log "initializing cluster in $PG_DATA"
    as_postgres "$bin/initdb" -D "$PG_DATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 >/dev/null
    cat >>"$PG_DATA/postgresql.conf" <<CONF
# tokenmeter local settings
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PG_DIR'
max_connections = 400
shared_buffers = 512MB
work_mem = 16MB
maintenance_work_mem = 256MB
max_wal_size = 4GB
wal_compression = on
timezone = 'UTC'
CONF
  fi
  if ! is_running; then
    as_postgres "$bin/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 start >/dev/null || {
      log "failed to start; last log lines:"; tail -20 "$PG_LOG" >&2; exit 1; }
  fi
  psql_admin <<SQL >/dev/null
SELECT 'CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD ''$PG_PASSWORD'''
  WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '$PG_USER') \gexec
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER'
  WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '$PG_DB') \gexec
SQL
  log "ready: $(url)"
}

stop() {
  local bin
  if bin="$(pg_bin)" && is_running; then
    as_postgres "$bin/pg_ctl" -D "$PG_DATA" -m fast -w stop >/dev/null
    log "stopped"
  fi
}

url() { echo "postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"; }

case "${1:-start}" in
  start) start ;;
  stop) resolve_dirs; stop ;;
  status) resolve_dirs; is_running ;;
  url) url ;;
  *) echo "usage: $0 [start|stop|status|url]" >&2; exit 2 ;;
esac
