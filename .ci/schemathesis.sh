#!/usr/bin/env bash
# Contract test: schemathesis (from PyPI, in a venv under /tmp) fuzzes the served OpenAPI document
# against the real server and fails on a 5xx, a status the document does not list, or a response
# that breaks its schema. Uses the debug binary `cargo test` built (nothing new is compiled), a
# throwaway data dir (SQLite), rate limits off, and a seeded admin's token. The routes that end the
# session (logout, revoke-all, password change, account deletion, session revocation) run in a
# second pass, so they do not cut the first one short. Bounded: SCHEMATHESIS_MAX_SECONDS overall.
set -euo pipefail
cd "$(dirname "$0")/.."

bin="${CARGO_TARGET_DIR:-target}/debug/devpocket"
venv="${SCHEMATHESIS_VENV:-/tmp/devpocket-schemathesis-venv}"
# Test cases per operation and pass; schemathesis adds its coverage-phase cases on top.
examples="${SCHEMATHESIS_MAX_EXAMPLES:-100}"
# Wall-clock bound of both passes together (CI has 90 minutes; the build and tests take ~15).
budget="${SCHEMATHESIS_MAX_SECONDS:-600}"
# Seed, so a failure reproduces.
seed="${SCHEMATHESIS_SEED:-20261130}"

log() { printf '\n== schemathesis: %s\n' "$*"; }

[ -x "$bin" ] || { echo "no $bin: run cargo test (or cargo build) first" >&2; exit 1; }

if [ ! -x "$venv/bin/schemathesis" ]; then
  log "install"
  if ! python3 -m venv "$venv" 2>/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check 'schemathesis>=4,<5'
fi
"$venv/bin/schemathesis" --version

work=$(mktemp -d)
# Environment accounts (the local provider as root) reach their homes through it.
chmod 711 "$work"
server_pid=""
stop_server() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  # The environments' accounts go with their workspaces.
  for account in $(awk -F: -v w="$work/" '$1 ~ /^dp-/ && index($6, w) == 1 {print $1}' /etc/passwd); do
    pkill -KILL -U "$account" || true
    userdel "$account" || true
  done
  rm -rf "$work"
}
trap stop_server EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base="http://127.0.0.1:$port"
export DEVPOCKET_SERVER__BIND="127.0.0.1:$port"
export DEVPOCKET_SERVER__DATA_DIR="$work/data"
export DEVPOCKET_LOCAL__WORKSPACES_DIR="$work/workspaces"
export DEVPOCKET_SERVER__REGISTRATION=open
export DEVPOCKET_DATABASE__URL=""
export DEVPOCKET_RATE_LIMIT__ENABLED=false
export DEVPOCKET_LOG__LEVEL=warn
# Google sign-in on (an unconfigured server answers every call 503, which reads as a server
# error), with its key set on a closed loopback port: random tokens never get that far.
export DEVPOCKET_GOOGLE__CLIENT_ID=contract-test.apps.googleusercontent.com
export DEVPOCKET_GOOGLE__JWKS_URL="http://127.0.0.1:9/certs"
unset DATABASE_URL SECRET_KEY || true

log "seed a user"
password="Contract-Pocket-$RANDOM-$RANDOM"
printf '%s\n' "$password" | "$bin" user create --username contract --email contract@example.com \
  --plan admin --password-stdin >/dev/null

log "start the server on $base"
"$bin" serve >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 1 100); do
  curl -fsS "$base/health/live" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log"; exit 1; }
  sleep 0.2
done

login() {
  curl -fsS -H 'content-type: application/json' \
    -d "{\"username_or_email\":\"contract\",\"password\":\"$password\"}" "$base/api/v1/auth/login" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])'
}

# The routes that end the calling session (or the account): the second pass.
ending=(
  post_api_v1_auth_logout
  post_api_v1_users_me_sessions_revoke_all
  post_api_v1_users_me_password
  delete_api_v1_users_me_sessions_session_id
  delete_api_v1_users_me
)
exclude_ending=() include_ending=()
for op in "${ending[@]}"; do
  exclude_ending+=(--exclude-operation-id "$op")
  include_ending+=(--include-operation-id "$op")
done
common=(
  "$base/api/v1/openapi.json"
  --checks not_a_server_error,status_code_conformance,response_schema_conformance,content_type_conformance
  --max-examples "$examples"
  --seed "$seed"
  --workers 2
  --request-timeout 30
  --phases examples,coverage,fuzzing
  --suppress-health-check all
  --warnings off
  # The WebSocket routes answer 400 without an upgrade; they are tested by the terminal tests.
  --exclude-tag websockets
)

status=0
started=$(date +%s)
log "pass 1: every route but those that end the session"
token=$(login)
# Run from the temp dir: schemathesis keeps a cache (.schemathesis/) in its working directory.
(cd "$work" && timeout --kill-after=10 "$((budget * 2 / 3))" "$venv/bin/schemathesis" run "${common[@]}" \
  -H "Authorization: Bearer $token" \
  "${exclude_ending[@]}") \
  || status=$?

left=$((budget - ($(date +%s) - started)))
[ "$left" -lt 60 ] && left=60
log "pass 2: the routes that end the session ($left s left)"
token=$(login)
(cd "$work" && timeout --kill-after=10 "$left" "$venv/bin/schemathesis" run "${common[@]}" \
  -H "Authorization: Bearer $token" \
  "${include_ending[@]}") \
  || status=$?

if [ "$status" != 0 ]; then
  log "FAILED (exit $status); server log tail:"
  tail -n 50 "$work/server.log"
fi
exit "$status"
