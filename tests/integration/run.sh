#!/usr/bin/env bash
# Integration tests: real Redis, Dovecot and Courier-IMAP on loopback, the
# transcript corpus run directly and through qresyncd, and the tests of the
# binary itself. Run from anywhere (it works from the repo root); as root.
#
#   QRESYNCD=build/asan/qresyncd tests/integration/run.sh   # another binary
#   QR_ONLY='dovecot/(idle|store)' tests/integration/run.sh  # some sessions
#   QR_KEEP_TMP=1 ...       keep the temp dir (transcripts, logs, mail)
#   QR_SELF_CHECK=1 ...     run each session directly twice and compare
#                           (checks the harness is deterministic; no proxy)
#
# When the qresyncd binary does not exist, the direct runs still happen and
# every proxy test is counted as failed ("qresyncd binary missing").
# Ends with exactly one line `N passed, M failed`; exits 1 when M > 0.
set -uo pipefail

cd "$(dirname "$0")/../.."
REPO=$(pwd)
IT=$REPO/tests/integration
QRESYNCD=${QRESYNCD:-./qresyncd}
t_start=$(date +%s)
passed=0
failed=0

ok() { passed=$((passed + 1)); echo "PASS $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }

if [ "$(id -u)" != 0 ]; then
    echo "integration: must run as root (servers drop to the mail user, Courier needs a mount namespace)" >&2
    echo "0 passed, 1 failed"
    exit 1
fi

# Courier is unpacked outside the repo; a fresh machine may not have it yet.
if ! "$REPO/deploy/fetch-courier.sh" >/dev/null; then
    echo "integration: deploy/fetch-courier.sh failed" >&2
fi

# shellcheck source=servers.sh
. "$IT/servers.sh"

rm -rf "$QR_TMP/seed"
if python3 "$IT/seed.py" "$QR_TMP/seed" >/dev/null; then
    chown -R mail:mail "$QR_TMP/seed"
    export QR_SEED_MAILDIR=$QR_TMP/seed/Maildir
    ok "setup/seed mail store"
else
    bad "setup/seed mail store"
fi

if start_redis; then ok "setup/redis starts"; else bad "setup/redis starts"; unset REDIS_PORT; fi
if start_dovecot; then ok "setup/dovecot starts"; else bad "setup/dovecot starts"; unset DOVECOT_PORT; fi
if start_courier; then ok "setup/courier starts"; else bad "setup/courier starts"; unset COURIER_PORT; fi
echo "INFO servers up in $(($(date +%s) - t_start)) s: redis ${REDIS_PORT:--} dovecot ${DOVECOT_PORT:--} courier ${COURIER_PORT:--} (tmp $QR_TMP)"

args=(--results "$QR_TMP/results")
[ -n "${QR_ONLY:-}" ] && args+=(--only "$QR_ONLY")
if [ "${QR_SELF_CHECK:-0}" = 1 ]; then
    args+=(--self-check)
elif [ -x "$QRESYNCD" ]; then
    args+=(--proxy "$QRESYNCD")
    echo "INFO proxy binary: $QRESYNCD"
else
    args+=(--no-proxy)
    echo "INFO proxy binary $QRESYNCD does not exist: direct runs only, proxy tests count as failed"
fi

python3 "$IT/transcripts.py" "${args[@]}"
rc=$?
if [ -s "$QR_TMP/results" ]; then
    read -r p f <"$QR_TMP/results"
    passed=$((passed + p))
    failed=$((failed + f))
else
    bad "transcripts.py ended without results (exit $rc)"
fi

trap - EXIT INT TERM
qr_cleanup 2>&1
echo "INFO integration wall time $(($(date +%s) - t_start)) s"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
