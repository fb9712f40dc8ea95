#!/usr/bin/env bash
# make demo: a local Redis and a seeded legacy IMAP upstream (Dovecot with
# CONDSTORE, QRESYNC and ENABLE hidden) on loopback, qresyncd in front of
# them, and a client session through it. Everything runs on private ports in
# a temp dir and is stopped by PID when the demo ends.
set -euo pipefail
cd "$(dirname "$0")/.."

# shellcheck source=../tests/integration/servers.sh
source tests/integration/servers.sh

echo "== seeding a legacy mail store"
python3 tests/integration/seed.py "$QR_TMP/seed" >/dev/null
export QR_SEED_MAILDIR=$QR_TMP/seed/Maildir
start_redis
start_dovecot
echo "   redis on 127.0.0.1:$REDIS_PORT, legacy Dovecot on 127.0.0.1:$DOVECOT_PORT"

PROXY_PORT=$(qr_free_port)
./qresyncd --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$DOVECOT_PORT" \
    --redis "redis://127.0.0.1:$REDIS_PORT" --condstore 2>"$QR_TMP/qresyncd.log" &
PROXY_PID=$!
stop_proxy() { kill "$PROXY_PID" 2>/dev/null && wait "$PROXY_PID" 2>/dev/null || true; }
QR_CLEANUP_HOOKS="stop_proxy $QR_CLEANUP_HOOKS"
qr_wait_ready "$PROXY_PORT" "$PROXY_PID" "* OK" ""
echo "   qresyncd (pid $PROXY_PID) on 127.0.0.1:$PROXY_PORT"
echo

echo "== the upstream alone"
python3 deploy/demo_client.py 127.0.0.1 "$DOVECOT_PORT" "$QR_USER" "$QR_PASS" --caps-only
echo
echo "== a client through qresyncd"
python3 deploy/demo_client.py 127.0.0.1 "$PROXY_PORT" "$QR_USER" "$QR_PASS" \
    --other 127.0.0.1:"$DOVECOT_PORT"
echo
echo "== qresyncd's log"
cat "$QR_TMP/qresyncd.log"
