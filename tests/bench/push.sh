#!/usr/bin/env bash
# Issue 7's benchmark: how fast an out-of-band change reaches a client
# idling through qresyncd, and what the polling costs the upstream.
#
#   latency   out-of-band flag change on the upstream (a direct connection's
#             STORE, clock started at its tagged OK) to the FETCH at a
#             client idling (IDLE, QRESYNC) through qresyncd: median and max
#             over BENCH_PUSH_CHANGES changes at poll-interval 2 s and 10 s
#   pubsub    the same with two qresyncd processes at poll-interval 60 s,
#             the change observed by a second client's NOOP through the
#             other process (Redis pub/sub carries it)
#   commands  internal upstream commands per minute caused by
#             BENCH_PUSH_SESSIONS (100) idle CONDSTORE sessions on one
#             mailbox (counted in qresyncd's debug log over a window)
#
# The upstream is Courier by default (its IDLE is itself a 60-second poll,
# spec U4: only qresyncd's polling brings changes); BENCH_PUSH_UPSTREAM=
# dovecot takes a Dovecot with CONDSTORE hidden instead (its own IDLE
# notifications then arrive first). tests/bench/push.py does the sessions
# and figures. When qresyncd has no --poll-interval yet, it says "not
# offered yet" and exits 0 (a report, no figures).
#
# A benchmark, not a test: timing never fails the run; a FETCH without UID or
# MODSEQ, a MODSEQ not above the client's, or a qresyncd that dies does.
#
# Prints "bench: ..." lines and writes build/bench/push.md; qresyncd's logs
# (debug level) in build/bench/push.logs/. Knobs (environment):
#   BENCH_PUSH_UPSTREAM=courier|dovecot  BENCH_PUSH_CHANGES=50
#   BENCH_PUSH_POLLS="2 10"  BENCH_PUSH_PUBSUB_CHANGES=10 (0: leave out)
#   BENCH_PUSH_SESSIONS=100  BENCH_PUSH_RATE_POLL=10  BENCH_PUSH_WINDOW=60
#   BENCH_QRESYNCD=PATH  BENCH_QRESYNCD_ARGS
set -euo pipefail
cd "$(dirname "$0")/../.."

UPSTREAM=${BENCH_PUSH_UPSTREAM:-courier}
NAME=push
# shellcheck source=tests/bench/resync_lib.sh
source tests/bench/resync_lib.sh

keep_logs() {
    rs_keep_log "${COURIER_DIR:-}/courier.log" courier
    rs_keep_log "${DOVECOT_DIR:-}/dovecot.log" dovecot
    rs_keep_log "${REDIS_DIR:-}/redis.log" redis
}
QR_CLEANUP_HOOKS="keep_logs $QR_CLEANUP_HOOKS"

if ! "$QRESYNCD" --help 2>&1 | grep -q -- '--poll-interval'; then
    say "push: qresyncd has no --poll-interval: push to idling clients not offered yet, nothing measured"
    {
        echo "# Push to idling clients (issue 7)"
        echo
        echo "Not offered yet: $QRESYNCD has no \`--poll-interval\` option; nothing measured."
    } >"$OUT/push.md"
    exit 0
fi

T0=$(date +%s)
start_redis
case $UPSTREAM in
courier)
    [ -x "$QR_COURIER_ROOT/root/usr/sbin/couriertcpd" ] ||
        fail "Courier is not unpacked in $QR_COURIER_ROOT (deploy/fetch-courier.sh)"
    start_courier
    UP_PORT=$COURIER_PORT UP_PID=$COURIER_PID
    UP_NAME="Courier-IMAP $(sed -n 's/^courier-imap=//p' "$QR_COURIER_ROOT/.stamp" 2>/dev/null || true)"
    ;;
dovecot)
    start_dovecot # servers.sh's legacy capability list: no CONDSTORE/QRESYNC/ENABLE
    UP_PORT=$DOVECOT_PORT UP_PID=$DOVECOT_PID
    UP_NAME="Dovecot $(dovecot --version | cut -d' ' -f1) (legacy capabilities)"
    ;;
*) fail "BENCH_PUSH_UPSTREAM=$UPSTREAM: courier or dovecot" ;;
esac
say "push: upstream $UP_NAME 127.0.0.1:$UP_PORT (pid $UP_PID); redis 127.0.0.1:$REDIS_PORT (pid $REDIS_PID)"

rm -rf "$OUT/push.logs"
mkdir -p "$OUT/push.logs"
rc=0
PB_UPSTREAM_PORT=$UP_PORT PB_UPSTREAM=$UP_NAME PB_REDIS_PORT=$REDIS_PORT \
    PB_QRESYNCD=$QRESYNCD PB_QRESYNCD_ARGS="${QRESYNCD_ARGS[*]}" PB_OUT=$OUT/push.md PB_LOGDIR=$OUT/push.logs \
    PB_CHANGES=${BENCH_PUSH_CHANGES:-50} PB_POLLS=${BENCH_PUSH_POLLS:-"2 10"} \
    PB_PUBSUB_CHANGES=${BENCH_PUSH_PUBSUB_CHANGES:-10} PB_SESSIONS=${BENCH_PUSH_SESSIONS:-100} \
    PB_RATE_POLL=${BENCH_PUSH_RATE_POLL:-10} PB_WINDOW=${BENCH_PUSH_WINDOW:-60} \
    PB_VERSIONS="Redis $(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p')." \
    python3 tests/bench/push.py || rc=$?
say "push: total $(($(date +%s) - T0)) s"
[ "$rc" = 0 ] || fail "push: wrong results or a broken session (tests/bench/push.py exit $rc)"
