#!/usr/bin/env bash
# TLS on both sides of qresyncd (issue 4) against a real Dovecot with TLS on
# loopback: a throwaway PKI made now (make_pki.sh), Dovecot with STARTTLS on
# its plain port and implicit TLS on a second one, then
#   1. tests/integration/tls_behaviour.py: the proxy's TLS behaviour;
#   2. the transcript corpus (transcripts.py --tls), Dovecot sessions run
#      directly over TLS and through qresyncd with TLS on both sides.
# QRESYNCD selects the binary. Ends with one line "N passed, M failed".
#   QR_TLS_ONLY=RE        only the behaviour tests whose name matches
#   QR_TLS_TRANSCRIPTS=0  leave out the transcript corpus
set -uo pipefail
cd "$(dirname "$0")/../.."
export QRESYNCD=${QRESYNCD:-$PWD/qresyncd}

# shellcheck source=servers.sh
source tests/integration/servers.sh

passed=0
failed=0
QR_PKI=$QR_TMP/pki
if ! tests/integration/make_pki.sh "$QR_PKI"; then
    echo "tls: make_pki.sh failed"
    echo "0 passed, 1 failed"
    exit 1
fi
export QR_PKI
export QR_DOVECOT_SSL_CERT=$QR_PKI/dovecot.pem QR_DOVECOT_SSL_KEY=$QR_PKI/dovecot.key
python3 tests/integration/seed.py "$QR_TMP/seed" >/dev/null
chown -R mail:mail "$QR_TMP/seed"
export QR_SEED_MAILDIR=$QR_TMP/seed/Maildir
if ! start_dovecot; then
    echo "0 passed, 1 failed"
    exit 1
fi
export DOVECOT_PORT DOVECOT_TLS_PORT DOVECOT_PID DOVECOT_DIR DOVECOT_MAILDIR QR_TMP QR_USER QR_PASS

out=$QR_TMP/tls_behaviour.out
python3 tests/integration/tls_behaviour.py "${QR_TLS_ONLY:-}" 2>&1 | tee "$out"
line=$(grep -E '^[0-9]+ passed, [0-9]+ failed' "$out" | tail -n 1)
if [ -n "$line" ]; then
    passed=$((passed + ${line%% passed*}))
    f=${line#*passed, }
    failed=$((failed + ${f%% failed*}))
else
    failed=$((failed + 1))
fi

if [ "${QR_TLS_TRANSCRIPTS:-1}" = 1 ] && [ -z "${QR_TLS_ONLY:-}" ]; then
    echo "== transcripts over TLS on both sides (Dovecot)"
    python3 tests/integration/transcripts.py --tls --proxy "$QRESYNCD" --only '^dovecot/' \
        --results "$QR_TMP/tls_results"
    if [ -s "$QR_TMP/tls_results" ]; then
        read -r p f <"$QR_TMP/tls_results"
        passed=$((passed + p))
        failed=$((failed + f))
    else
        failed=$((failed + 1))
    fi
fi
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
