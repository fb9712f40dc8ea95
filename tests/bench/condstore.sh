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

MSGS=${BENCH_CS_MSGS:-100000}
RUNS=${BENCH_CS_RUNS:-3}
PCT=${BENCH_CS_CHANGE_PCT:-1}
NAME=condstore
# shellcheck source=tests/bench/resync_lib.sh
source tests/bench/resync_lib.sh

keep_logs() {
    rs_keep_log "${LEGACY_DIR:-}/dovecot.log" dovecot-legacy
    rs_keep_log "${NATIVE_DIR:-}/dovecot.log" dovecot-native
    rs_keep_log "${REDIS_DIR:-}/redis.log" redis
}
QR_CLEANUP_HOOKS="keep_logs $QR_CLEANUP_HOOKS"

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

rs_generate "$MSGS"

start_redis
start_dovecot # legacy: servers.sh's capability list, without CONDSTORE
LEGACY_PORT=$DOVECOT_PORT LEGACY_DIR=$DOVECOT_DIR LEGACY_PID=$DOVECOT_PID
QR_DOVECOT_CAPS=$BENCH_DOVECOT_NATIVE_CAPS start_dovecot
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

rs_start_qresyncd "$LEGACY_PORT"
say "condstore: qresyncd on 127.0.0.1:$PROXY_PORT (pid $PROXY_PID) $QRESYNCD --condstore ${QRESYNCD_ARGS[*]}"

rc=0
CS_LEGACY_PORT=$LEGACY_PORT CS_NATIVE_PORT=$NATIVE_PORT CS_PROXY_PORT=$PROXY_PORT \
    CS_PROXY_PID=$PROXY_PID CS_REDIS_PORT=$REDIS_PORT CS_REDIS_PID=$REDIS_PID CS_MSGS=$MSGS CS_RUNS=$RUNS \
    CS_CHANGE_PCT=$PCT CS_OUT=$OUT/condstore.md CS_DOVECOT_VERSION=$DOVECOT_VERSION \
    CS_REDIS_VERSION=$(redis-server --version | sed -n 's/.* v=\([^ ]*\).*/\1/p') \
    CS_DOVECOT_INDEX="legacy $ls s | | native $ns s | " \
    python3 tests/bench/condstore.py || rc=$?
rs_check_qresyncd
say "condstore: total $(($(date +%s) - T0)) s"
[ "$rc" = 0 ] || fail "condstore: wrong results or a broken session (tests/bench/condstore.py exit $rc)"
