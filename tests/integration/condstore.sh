#!/usr/bin/env bash
# CONDSTORE and QRESYNC through qresyncd against real legacy upstreams
# (Dovecot with CONDSTORE hidden, Courier) and a real Redis
# (tests/integration/condstore.py, qresync.py, then status.py).
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
# Each harness ends with "N passed, M failed"; the last line is the sum.
passed=0 failed=0
for suite in condstore qresync status sync; do
    out=$QR_TMP/$suite.out
    python3 "tests/integration/$suite.py" "$@" 2>&1 | tee "$out" || true
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$out" | tail -n 1)
    if [ -z "$line" ]; then
        line="0 passed, 1 failed"
    fi
    passed=$((passed + ${line%% passed*}))
    f=${line#*passed, }
    failed=$((failed + ${f%% failed*}))
done
echo "condstore.sh: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
