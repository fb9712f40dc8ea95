# shellcheck shell=bash
# Shared by the resync benches, tests/bench/condstore.sh and
# tests/bench/qresync.sh. Source it from the repository's root with NAME
# set (condstore, qresync: the prefix of build/bench/NAME.md and of the
# logs build/bench/NAME.*.log). It sets OUT, QRESYNCD and QRESYNCD_ARGS
# (from BENCH_QRESYNCD, default ./qresyncd, and BENCH_QRESYNCD_ARGS),
# removes the previous run's report and logs, gives say and fail, then
# sources tests/integration/servers.sh (in a temp dir of the bench's own)
# and tests/bench/dovecot.sh.
#
#   rs_generate COUNT     the mailbox: COUNT messages of ~300 B in a seed
#       Maildir (tests/bench/condstore_gen.py; QR_SEED_MAILDIR, exported,
#       for the servers started next); sets T0 (start time, seconds)
#   rs_start_qresyncd UPSTREAM-PORT [ARG...]   -> PROXY_PORT PROXY_PID PROXY_LOG
#       qresyncd --condstore with Redis ($REDIS_PORT) in front of
#       127.0.0.1:UPSTREAM-PORT, log level warn, stopped by the trap
#   rs_check_qresyncd     fails when it died; shows what it logged
#   rs_keep_log SRC DEST  copies a server's log to build/bench/NAME.DEST.log
: "${NAME:?set NAME before sourcing resync_lib.sh}"
QRESYNCD=${BENCH_QRESYNCD:-./qresyncd}
read -r -a QRESYNCD_ARGS <<<"${BENCH_QRESYNCD_ARGS:-}"
OUT=$(pwd)/build/bench
mkdir -p "$OUT"
rm -f "$OUT/$NAME.md" "$OUT/$NAME".*.log

say() { printf 'bench: %s\n' "$*"; }
fail() {
    printf 'bench: FAILED: %s\n' "$*" >&2
    exit 1
}
[ -x "$QRESYNCD" ] || fail "$QRESYNCD not built (make VARIANT=release all)"

# A temp dir of our own even when called from tests/bench/run.sh (which
# exports its QR_TMP): removed by our trap, not left for the caller's.
unset QR_TMP QR_SEED_MAILDIR
# shellcheck source=tests/integration/servers.sh
source tests/integration/servers.sh
# shellcheck source=tests/bench/dovecot.sh
source tests/bench/dovecot.sh

rs_generate() {
    T0=$(date +%s)
    say "$NAME: generating $1 messages (~300 B each) ..."
    python3 tests/bench/condstore_gen.py "$QR_TMP/seed/Maildir" "$1" 300 >"$QR_TMP/gen.out"
    export QR_SEED_MAILDIR=$QR_TMP/seed/Maildir
    say "$NAME: $(cat "$QR_TMP/gen.out") ($(($(date +%s) - T0)) s)"
}

PROXY_PID=
rs_stop_qresyncd() {
    [ -n "$PROXY_PID" ] || return 0
    kill "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=
}
QR_CLEANUP_HOOKS="rs_stop_qresyncd $QR_CLEANUP_HOOKS"

rs_start_qresyncd() {
    local up=$1
    shift
    PROXY_LOG=$OUT/$NAME.qresyncd.log
    PROXY_PORT=$(qr_free_port)
    "$QRESYNCD" --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$up" \
        --redis "redis://127.0.0.1:$REDIS_PORT" --condstore --log-level warn \
        "$@" "${QRESYNCD_ARGS[@]}" >"$PROXY_LOG" 2>&1 </dev/null &
    PROXY_PID=$!
    if ! qr_wait_ready "$PROXY_PORT" "$PROXY_PID" "* OK"; then
        tail -20 "$PROXY_LOG" >&2
        fail "qresyncd did not start (log $PROXY_LOG)"
    fi
}

rs_check_qresyncd() {
    local prc
    if ! kill -0 "$PROXY_PID" 2>/dev/null; then
        wait "$PROXY_PID" && prc=0 || prc=$?
        PROXY_PID=
        tail -20 "$PROXY_LOG" >&2
        fail "qresyncd exited (status $prc); log $PROXY_LOG"
    fi
    if [ -s "$PROXY_LOG" ]; then
        say "$NAME: qresyncd logged (warn and above), last lines of $PROXY_LOG:"
        tail -5 "$PROXY_LOG" | sed 's/^/bench:   /'
    fi
}

rs_keep_log() { # rs_keep_log SRC DEST: never fails (runs from the trap)
    [ -f "$1" ] && cp "$1" "$OUT/$NAME.$2.log" 2>/dev/null
    return 0
}
