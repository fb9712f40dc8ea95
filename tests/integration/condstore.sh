#!/usr/bin/env bash
# CONDSTORE through qresyncd against real legacy upstreams (Dovecot with
# CONDSTORE hidden, Courier) and a real Redis (tests/integration/condstore.py).
set -euo pipefail
cd "$(dirname "$0")/../.."
export QRESYNCD=${QRESYNCD:-$PWD/qresyncd}

# shellcheck source=servers.sh
source tests/integration/servers.sh
python3 tests/integration/seed.py "$QR_TMP/seed" >/dev/null
export QR_SEED_MAILDIR=$QR_TMP/seed/Maildir
start_redis
start_dovecot
start_courier
export DOVECOT_PORT DOVECOT_PID DOVECOT_MAILDIR COURIER_PORT REDIS_PORT REDIS_PID QR_TMP QR_USER QR_PASS
rc=0
python3 tests/integration/condstore.py "$@" || rc=1
python3 tests/integration/status.py "$@" || rc=1; exit $rc
