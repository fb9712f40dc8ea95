#!/usr/bin/env bash
# Issue 6's benchmark: a QRESYNC resync of a 100 000-message mailbox after
# 1% of its messages' flags were changed and 0.1% of them expunged out of
# band, on a legacy upstream (Courier-IMAP, no CONDSTORE/QRESYNC). Peers,
# measured in the same run:
#
#   legacy   SELECT INBOX + UID FETCH 1:* (FLAGS), directly against Courier
#   imapc    Dovecot with the imapc storage backend in front of the same
#            Courier, its QRESYNC (the one existing system for this job)
#   native   Dovecot serving its own copy of the Maildir, its own QRESYNC
#            (the same changes made on it directly)
#   qresyncd ./qresyncd --condstore (Redis) in front of the same Courier;
#            measured only when it offers QRESYNC after login, otherwise
#            "bench: qresyncd: QRESYNC not offered, skipped"
#
# Bytes to the client (target: qresyncd at most 2% of legacy) and wall time
# (target: qresyncd faster than imapc). tests/bench/qresync.py does the
# sessions, changes, checks and report; this script makes the mailbox and
# runs the servers.
#
# A benchmark, not a test: timing never fails the run. A wrong answer (a
# resync that misses an expunged UID, names a live one as vanished, misses a
# changed message or reports flags other than Courier's), a broken session
# or a qresyncd that dies make it exit non-zero.
#
# Servers (tests/integration/servers.sh, loopback, private ports and temp
# dirs, stopped by PID from its trap): Redis; Courier with the generated
# Maildir (tests/bench/condstore_gen.py, UIDs 1..N fixed by its
# courierimapuiddb); a native Dovecot (Dovecot 2.3's default capabilities)
# with a copy of it; the imapc Dovecot, which keeps only its index
# (~/imapc in its temp home) and reaches Courier as the test user:
#
#   mail_location = imapc:~/imapc
#   imapc_host = 127.0.0.1, imapc_port = Courier's port
#   imapc_user = %u, imapc_password = the test user's password
#   imapc_features = (none)
#
# Clients log in to it against servers.sh's passwd-file passdb (the same
# user and password as on Courier). imapc_features stays empty: in Dovecot
# 2.3 none of them makes a flag resync from a server without CONDSTORE
# cheaper (`modseq` needs CONDSTORE upstream; `delay-login` only moves the
# upstream login into the first SELECT; the others are workarounds or
# concern message bodies, headers, search and ACLs).
#
# Prints "bench: ..." lines and writes build/bench/qresync.md; logs in
# build/bench/qresync.*.log. Knobs (environment):
#   BENCH_QR_MSGS=100000 BENCH_QR_RUNS=3
#   BENCH_QR_CHANGE_PCT=1 BENCH_QR_EXPUNGE_PCT=0.1
#   BENCH_QR_UPSTREAM=courier  or dovecot: a Dovecot with CONDSTORE, QRESYNC
#                             and ENABLE hidden (servers.sh's legacy list) as
#                             the legacy upstream instead of Courier
#   BENCH_QRESYNCD=PATH       the proxy binary (default ./qresyncd)
#   BENCH_QRESYNCD_ARGS       extra qresyncd arguments
set -euo pipefail
cd "$(dirname "$0")/../.."

MSGS=${BENCH_QR_MSGS:-100000}
RUNS=${BENCH_QR_RUNS:-3}
UPSTREAM=${BENCH_QR_UPSTREAM:-courier}
NAME=qresync
# shellcheck source=tests/bench/resync_lib.sh
source tests/bench/resync_lib.sh

keep_logs() {
    rs_keep_log "${COURIER_DIR:-}/courier.log" courier
    rs_keep_log "${LEGACY_DIR:-}/dovecot.log" dovecot-legacy
    rs_keep_log "${IMAPC_DIR:-}/dovecot.log" dovecot-imapc
    rs_keep_log "${NATIVE_DIR:-}/dovecot.log" dovecot-native
    rs_keep_log "${REDIS_DIR:-}/redis.log" redis
}
QR_CLEANUP_HOOKS="keep_logs $QR_CLEANUP_HOOKS"
case $UPSTREAM in
courier)
    [ -x "$QR_COURIER_ROOT/root/usr/sbin/couriertcpd" ] ||
        fail "Courier is not unpacked in $QR_COURIER_ROOT (deploy/fetch-courier.sh)"
    ;;
dovecot) ;;
*) fail "BENCH_QR_UPSTREAM=$UPSTREAM: courier or dovecot" ;;
esac

rs_generate "$MSGS"

start_redis
DOVECOT_VERSION=$(dovecot --version | cut -d' ' -f1)
if [ "$UPSTREAM" = courier ]; then
    start_courier
    UP_PORT=$COURIER_PORT UP_PID=$COURIER_PID
    # deploy/fetch-courier.sh's stamp lists the unpacked packages' versions.
    UP_NAME=Courier UP_VERSION="Courier-IMAP $(sed -n 's/^courier-imap=//p' "$QR_COURIER_ROOT/.stamp" 2>/dev/null || true), "
else
    start_dovecot # servers.sh's legacy capability list: no CONDSTORE/QRESYNC/ENABLE
    UP_PORT=$DOVECOT_PORT UP_PID=$DOVECOT_PID LEGACY_DIR=$DOVECOT_DIR
    UP_NAME="Dovecot legacy" UP_VERSION=
fi
QR_DOVECOT_CAPS=$BENCH_DOVECOT_NATIVE_CAPS start_dovecot
NATIVE_PORT=$DOVECOT_PORT NATIVE_DIR=$DOVECOT_DIR NATIVE_PID=$DOVECOT_PID
rm -rf "$QR_TMP/seed"
unset QR_SEED_MAILDIR
QR_DOVECOT_CAPS=$BENCH_DOVECOT_NATIVE_CAPS QR_DOVECOT_EXTRA_CONF="
# tests/bench/qresync.sh: the imapc storage in front of the legacy upstream
mail_location = imapc:~/imapc
imapc_host = 127.0.0.1
imapc_port = $UP_PORT
imapc_user = %u
imapc_password = $QR_PASS
imapc_features =
" start_dovecot
IMAPC_PORT=$DOVECOT_PORT IMAPC_DIR=$DOVECOT_DIR IMAPC_PID=$DOVECOT_PID
say "qresync: upstream $UP_NAME 127.0.0.1:$UP_PORT (pid $UP_PID); dovecot $DOVECOT_VERSION native 127.0.0.1:$NATIVE_PORT (pid $NATIVE_PID), imapc 127.0.0.1:$IMAPC_PORT (pid $IMAPC_PID); redis 127.0.0.1:$REDIS_PORT (pid $REDIS_PID) ($(($(date +%s) - T0)) s)"

rs_start_qresyncd "$UP_PORT"
say "qresync: qresyncd on 127.0.0.1:$PROXY_PORT (pid $PROXY_PID) $QRESYNCD --condstore ${QRESYNCD_ARGS[*]}"

rc=0
QB_UPSTREAM_PORT=$UP_PORT QB_UPSTREAM=$UP_NAME QB_NATIVE_PORT=$NATIVE_PORT QB_IMAPC_PORT=$IMAPC_PORT \
    QB_PROXY_PORT=$PROXY_PORT QB_PROXY_PID=$PROXY_PID QB_REDIS_PID=$REDIS_PID \
    QB_MSGS=$MSGS QB_RUNS=$RUNS QB_CHANGE_PCT=${BENCH_QR_CHANGE_PCT:-1} \
    QB_EXPUNGE_PCT=${BENCH_QR_EXPUNGE_PCT:-0.1} QB_OUT=$OUT/qresync.md \
    QB_VERSIONS="${UP_VERSION}Dovecot $DOVECOT_VERSION, Redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')" \
    python3 tests/bench/qresync.py || rc=$?
rs_check_qresyncd
say "qresync: total $(($(date +%s) - T0)) s"
[ "$rc" = 0 ] || fail "qresync: wrong results or a broken session (tests/bench/qresync.py exit $rc)"
