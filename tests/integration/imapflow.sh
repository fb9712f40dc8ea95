#!/usr/bin/env bash
# A real IMAP client library through qresyncd: imapflow (npm) resynchronises
# INBOX with CONDSTORE against a legacy Dovecot and Courier-IMAP, and a
# mailbox with QRESYNC (also against native Dovecot, the reference)
# (tests/integration/imapflow.mjs). QRESYNCD selects the binary.
#
# imapflow is installed from the npm registry into
# tests/integration/imapflow/node_modules with `npm ci` (the versions in
# package-lock.json), once: a stamp holding the lock file's hash skips the
# install while the lock file is unchanged. Needs node and npm.
# Ends with "N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
export QRESYNCD=${QRESYNCD:-$PWD/qresyncd}
PKG=tests/integration/imapflow

for tool in node npm; do
    if ! command -v "$tool" >/dev/null; then
        echo "imapflow: $tool is not installed"
        echo "0 passed, 1 failed"
        exit 1
    fi
done

stamp=$PKG/node_modules/.qresyncd-lock-sha256
want=$(sha256sum "$PKG/package-lock.json" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "imapflow: npm ci in $PKG"
    if ! (cd "$PKG" && npm ci --no-audit --no-fund --loglevel=error); then
        echo "imapflow: npm ci failed"
        echo "0 passed, 1 failed"
        exit 1
    fi
    echo "$want" >"$stamp"
fi

# shellcheck source=servers.sh
source tests/integration/servers.sh
python3 tests/integration/seed.py "$QR_TMP/seed" >/dev/null
export QR_SEED_MAILDIR=$QR_TMP/seed/Maildir
start_redis
# Native Dovecot with its own CONDSTORE and QRESYNC: the reference the
# QRESYNC tests run against first (its own capability list).
QR_DOVECOT_CAPS="IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE UIDPLUS CONDSTORE QRESYNC LITERAL+ NAMESPACE UNSELECT CHILDREN MOVE SPECIAL-USE" start_dovecot
NATIVE_PORT=$DOVECOT_PORT
start_dovecot
start_courier

# start_proxy NAME UPSTREAM_PORT REDIS_DB: one qresyncd, stopped by the
# servers.sh trap through its pidfile; sets PROXY_PORT.
start_proxy() {
    local name=$1 up=$2 db=$3 pid
    PROXY_PORT=$(qr_free_port)
    "$QRESYNCD" --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$up" \
        --redis "redis://127.0.0.1:$REDIS_PORT/$db" --condstore --log-level debug \
        >"$QR_TMP/qresyncd-$name.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$QR_TMP/qresyncd-$name.pid"
    QR_SERVER_PIDS+=("$QR_TMP/qresyncd-$name.pid")
    if ! qr_wait_ready "$PROXY_PORT" "$pid" "* OK"; then
        echo "imapflow: qresyncd ($name) did not start:"
        tail -20 "$QR_TMP/qresyncd-$name.log"
        echo "0 passed, 1 failed"
        exit 1
    fi
}
# Each upstream's state in its own Redis database: both serve the same
# user, mailbox names and UIDVALIDITY.
start_proxy dovecot "$DOVECOT_PORT" 1
PROXY_DOVECOT_PORT=$PROXY_PORT
start_proxy courier "$COURIER_PORT" 2
PROXY_COURIER_PORT=$PROXY_PORT
# A second process per upstream on the same Redis database: the QRESYNC
# client reconnects through it (DESIGN inv. 7).
start_proxy dovecot-b "$DOVECOT_PORT" 1
PROXY_DOVECOT_PORT_B=$PROXY_PORT
start_proxy courier-b "$COURIER_PORT" 2
PROXY_COURIER_PORT_B=$PROXY_PORT
export PROXY_DOVECOT_PORT PROXY_COURIER_PORT PROXY_DOVECOT_PORT_B PROXY_COURIER_PORT_B
export DOVECOT_PORT COURIER_PORT NATIVE_PORT QR_USER QR_PASS

rc=0
node tests/integration/imapflow.mjs "$@" | tee "$QR_TMP/imapflow.out" || rc=$?
# qresyncd's own error lines fail the run too, and so do sanitizer reports
# (UBSan's go to stderr, not to UBSAN_OPTIONS' log_path).
errs=$(grep -h -e "level=err" -e "runtime error:" -e "Sanitizer" "$QR_TMP"/qresyncd-*.log || true)
if [ -n "$errs" ]; then
    echo "imapflow: qresyncd logged errors or sanitizer reports:"
    echo "$errs" | head -20
    line=$(tail -n 1 "$QR_TMP/imapflow.out")
    p=${line%% passed*}
    f=${line##*passed, }
    f=${f%% failed*}
    echo "$p passed, $((f + 1)) failed"
    exit 1
fi
exit "$rc"
