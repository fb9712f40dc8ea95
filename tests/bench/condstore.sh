#!/usr/bin/env bash
# Issue 5's benchmark: a CONDSTORE resync of a 100 000-message mailbox with
# 1% of its messages' flags changed out of band. `UID FETCH 1:* (FLAGS)
# (CHANGEDSINCE m)` through qresyncd against the legacy way (`UID FETCH 1:*
# (FLAGS)` directly against Dovecot) and against Dovecot's native CONDSTORE
# as the reference peer: bytes the client receives (target: at most 2% of the
# legacy bytes) and wall time; also the time of qresyncd's first SELECT
# (CONDSTORE) (its snapshot of 100 000 messages) and the Redis memory it
# keeps for the mailbox. tests/bench/condstore.py does the sessions, checks
# and report; this script makes the mailbox and runs the servers.
#
# A benchmark, not a test: timing never fails the run. A wrong answer (the
# CHANGEDSINCE answer not naming exactly the changed UIDs, a legacy fetch
# that misses messages), a session that breaks or a qresyncd that dies make
# it exit non-zero.
#
# Servers (tests/integration/servers.sh, loopback, private ports and temp
# dirs, stopped by PID from its trap): one Redis, two Dovecots each serving
# its own copy of the generated Maildir (tests/bench/condstore_gen.py): the
# legacy one (CONDSTORE, QRESYNC and ENABLE not advertised: servers.sh's
# default list) in front of which qresyncd runs, and the native one
# (Dovecot 2.3's default capability list, CONDSTORE included). Each
# Dovecot's first SELECT builds its index; it is done and timed once before
# anything is measured.
#
# Prints "bench: ..." lines and writes build/bench/condstore.md; logs in
# build/bench/condstore.*.log. Knobs (environment):
#   BENCH_CS_MSGS=100000 BENCH_CS_RUNS=3 BENCH_CS_CHANGE_PCT=1
#   BENCH_QRESYNCD=PATH       the proxy binary (default ./qresyncd)
#   BENCH_QRESYNCD_ARGS       extra qresyncd arguments
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

MSGS=${BENCH_CS_MSGS:-100000}
RUNS=${BENCH_CS_RUNS:-3}
PCT=${BENCH_CS_CHANGE_PCT:-1}
QRESYNCD=${BENCH_QRESYNCD:-./qresyncd}
read -r -a QRESYNCD_ARGS <<<"${BENCH_QRESYNCD_ARGS:-}"
OUT=$ROOT/build/bench
mkdir -p "$OUT"
rm -f "$OUT/condstore.md" "$OUT"/condstore.*.log

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

PROXY_PID=
stop_proxy() {
    [ -n "$PROXY_PID" ] || return 0
    kill "$PROXY_PID" 2>/dev/null || true
    wait "$PROXY_PID" 2>/dev/null || true
    PROXY_PID=
}
keep_logs() {
    [ -n "${LEGACY_DIR:-}" ] && cp "$LEGACY_DIR/dovecot.log" "$OUT/condstore.dovecot-legacy.log" 2>/dev/null
    [ -n "${NATIVE_DIR:-}" ] && cp "$NATIVE_DIR/dovecot.log" "$OUT/condstore.dovecot-native.log" 2>/dev/null
    [ -n "${REDIS_DIR:-}" ] && cp "$REDIS_DIR/redis.log" "$OUT/condstore.redis.log" 2>/dev/null
    return 0
}
QR_CLEANUP_HOOKS="stop_proxy keep_logs $QR_CLEANUP_HOOKS"

# A first SELECT and flag fetch, directly: Dovecot builds its index for the
# new Maildir. Prints the seconds each took.
dovecot_warm() { # dovecot_warm PORT
    python3 - "$1" <<'EOF'
import os, socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=300)
buf = b""
def cmd(tag, text):
    global buf
    s.sendall(tag + b" " + text + b"\r\n")
    t0 = time.perf_counter()
    while True:
        i = buf.find(b"\r\n" + tag + b" ")
        if i >= 0 and buf.find(b"\r\n", i + 2) >= 0:
            break
        d = s.recv(1 << 20)
        if not d:
            sys.exit("closed")
        buf += d
    t = time.perf_counter() - t0
    line = buf[i + 2:buf.find(b"\r\n", i + 2)]
    if not line.startswith(tag + b" OK"):
        sys.exit("warm-up %r: %r" % (text, line))
    n = buf.count(b" FETCH (")
    buf = b""
    return t, n
while b"\r\n" not in buf:
    buf += s.recv(4096)
buf = b"\r\n"
cmd(b"L", ('LOGIN "%s" "%s"' % (os.environ["QR_USER"], os.environ["QR_PASS"])).encode())
ts, _ = cmd(b"S", b"SELECT INBOX")
tf, n = cmd(b"F", b"UID FETCH 1:* (FLAGS)")
print("%.2f %.2f %d" % (ts, tf, n))
EOF
}

T0=$(date +%s)
say "condstore: generating $MSGS messages (~300 B each) ..."
python3 tests/bench/condstore_gen.py "$QR_TMP/seed/Maildir" "$MSGS" 300 >"$QR_TMP/gen.out"
export QR_SEED_MAILDIR=$QR_TMP/seed/Maildir
say "condstore: $(cat "$QR_TMP/gen.out") ($(($(date +%s) - T0)) s)"

start_redis
start_dovecot # legacy: servers.sh's capability list, without CONDSTORE
LEGACY_PORT=$DOVECOT_PORT LEGACY_DIR=$DOVECOT_DIR LEGACY_PID=$DOVECOT_PID
# Dovecot 2.3.19's built-in capability list (the string in
# /usr/lib/dovecot/imap), CONDSTORE QRESYNC ENABLE included, plus the
# LITERAL+ SPECIAL-USE that the legacy list has too.
QR_DOVECOT_CAPS="IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ SPECIAL-USE" \
    start_dovecot
NATIVE_PORT=$DOVECOT_PORT NATIVE_DIR=$DOVECOT_DIR NATIVE_PID=$DOVECOT_PID
rm -rf "$QR_TMP/seed"
DOVECOT_VERSION=$(dovecot --version | cut -d' ' -f1)
say "condstore: dovecot $DOVECOT_VERSION legacy 127.0.0.1:$LEGACY_PORT (pid $LEGACY_PID), native 127.0.0.1:$NATIVE_PORT (pid $NATIVE_PID); redis 127.0.0.1:$REDIS_PORT (pid $REDIS_PID) ($(($(date +%s) - T0)) s)"

read -r ls lf ln <<<"$(dovecot_warm "$LEGACY_PORT")" || fail "legacy dovecot warm-up"
read -r ns nf nn <<<"$(dovecot_warm "$NATIVE_PORT")" || fail "native dovecot warm-up"
if [ "$ln" != "$MSGS" ] || [ "$nn" != "$MSGS" ]; then
    fail "warm-up fetched $ln and $nn messages, $MSGS expected"
fi
say "condstore: dovecot first SELECT (index build): legacy $ls s, native $ns s; first UID FETCH 1:* (FLAGS): legacy $lf s, native $nf s"

PROXY_LOG=$OUT/condstore.qresyncd.log
PROXY_PORT=$(qr_free_port)
"$QRESYNCD" --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$LEGACY_PORT" \
    --redis "redis://127.0.0.1:$REDIS_PORT" --condstore --log-level warn \
    "${QRESYNCD_ARGS[@]}" >"$PROXY_LOG" 2>&1 </dev/null &
PROXY_PID=$!
if ! qr_wait_ready "$PROXY_PORT" "$PROXY_PID" "* OK"; then
    tail -20 "$PROXY_LOG" >&2
    fail "qresyncd did not start (log $PROXY_LOG)"
fi
say "condstore: qresyncd on 127.0.0.1:$PROXY_PORT (pid $PROXY_PID) $QRESYNCD --condstore ${QRESYNCD_ARGS[*]}"

rc=0
CS_LEGACY_PORT=$LEGACY_PORT CS_NATIVE_PORT=$NATIVE_PORT CS_PROXY_PORT=$PROXY_PORT \
    CS_PROXY_PID=$PROXY_PID CS_REDIS_PORT=$REDIS_PORT CS_REDIS_PID=$REDIS_PID CS_MSGS=$MSGS CS_RUNS=$RUNS \
    CS_CHANGE_PCT=$PCT CS_OUT=$OUT/condstore.md CS_DOVECOT_VERSION=$DOVECOT_VERSION \
    CS_REDIS_VERSION=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p') \
    CS_DOVECOT_INDEX="legacy $ls s | | native $ns s | " \
    python3 tests/bench/condstore.py || rc=$?
if ! kill -0 "$PROXY_PID" 2>/dev/null; then
    wait "$PROXY_PID" && prc=0 || prc=$?
    PROXY_PID=
    tail -20 "$PROXY_LOG" >&2
    fail "qresyncd exited (status $prc); log $PROXY_LOG"
fi
if [ -s "$PROXY_LOG" ]; then
    say "condstore: qresyncd logged (warn and above), last lines of $PROXY_LOG:"
    tail -5 "$PROXY_LOG" | sed 's/^/bench:   /'
fi
say "condstore: total $(($(date +%s) - T0)) s"
[ "$rc" = 0 ] || fail "condstore: wrong results or a broken session (tests/bench/condstore.py exit $rc)"
