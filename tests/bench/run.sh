#!/usr/bin/env bash
# make bench: qresyncd against the same legacy Dovecot upstream, direct vs
# through the proxy, in one run (STYLE.md §9: ratios against a baseline from
# the same run). Benchmarks are not tests: timing never fails the run; a
# broken session, a wrong byte count, differing FETCH bytes between direct and
# proxy, or a proxy that dies makes it exit non-zero.
#
#   1. NOOP round trip, one logged-in connection: median and p99, added median.
#   2. UID FETCH 1:* BODY.PEEK[] of a generated 2000-message (~200 MB)
#      mailbox: MB/s direct and proxy, alternated, medians, ratio.
#   3. RSS of a fresh qresyncd holding 1000 logged-in idle sessions.
#
# Prints a table ("bench: ...") and writes build/bench/results.md. Logs of
# qresyncd and Dovecot stay in build/bench/. Knobs (environment):
#   BENCH_NOOP_N=2000 BENCH_NOOP_WARMUP=200 BENCH_FETCH_RUNS=5 BENCH_MSGS=2000
#   BENCH_MSG_BYTES=100000 BENCH_IDLE_N=1000 BENCH_IDLE_HOLD=3
#   BENCH_DIRECT_ONLY=1   only the Dovecot side (no ./qresyncd needed)
#   BENCH_PERF=1          perf record -g qresyncd during the proxy fetches
#                         (build/bench/perf.data, report in perf-report.txt)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

NOOP_N=${BENCH_NOOP_N:-2000}
NOOP_WARMUP=${BENCH_NOOP_WARMUP:-200}
FETCH_RUNS=${BENCH_FETCH_RUNS:-5}
MSGS=${BENCH_MSGS:-2000}
MSG_BYTES=${BENCH_MSG_BYTES:-100000}
IDLE_N=${BENCH_IDLE_N:-1000}
IDLE_HOLD=${BENCH_IDLE_HOLD:-3}
DIRECT_ONLY=${BENCH_DIRECT_ONLY:-0}
PERF=${BENCH_PERF:-0}

OUT=$ROOT/build/bench
mkdir -p "$OUT"
rm -f "$OUT/results.md" "$OUT"/*.log

say() { printf 'bench: %s\n' "$*"; }
fail() {
    printf 'bench: FAILED: %s\n' "$*" >&2
    exit 1
}

# 1000 client sockets + 1000 upstream sockets in qresyncd, as many in the
# load tool, and Dovecot's login process: raise the descriptor limit for
# everything started from here.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -gt 65536 ]; then
    hard=65536
fi
ulimit -n "$hard"
if [ "$hard" -lt $((2 * IDLE_N + 200)) ]; then
    fail "ulimit -n is $hard (hard limit); $((2 * IDLE_N + 200)) needed for $IDLE_N sessions"
fi

# ------------------------------------------------------------- the tool ----
cc -O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -Wshadow \
    -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 -Wundef -Wvla \
    -o "$OUT/imapbench" tests/bench/imapbench.c
BENCH_CMD=("$OUT/imapbench")

if [ "$DIRECT_ONLY" != 1 ] && [ ! -x ./qresyncd ]; then
    fail "./qresyncd not built (make VARIANT=release all)"
fi

# shellcheck source=../integration/servers.sh
source tests/integration/servers.sh

# -------------------------------------------------------------- Dovecot ----
# servers.sh's start_dovecot caps Dovecot at 500 processes and 500
# connections per user and IP, and takes no extra settings; the bench needs
# 1000 sessions through the proxy (1000 upstream connections from 127.0.0.1
# as one user) plus its own. Same legacy setup otherwise: same capability
# list, passwd-file auth, Maildir, mail processes as `mail`. Login processes
# run in high-performance mode (service_count = 0), one imap process per
# session as usual.
bench_start_dovecot() {
    DOVECOT_DIR=$(mktemp -d "$QR_TMP/dovecot.XXXXXX")
    chmod 755 "$DOVECOT_DIR"
    DOVECOT_PORT=$(qr_free_port)
    local d=$DOVECOT_DIR
    mkdir -p "$d/run" "$d/state" "$d/home/$QR_USER"
    DOVECOT_MAILDIR=$d/home/$QR_USER/Maildir
    printf '%s:{PLAIN}%s::::::\n' "$QR_USER" "$QR_PASS" >"$d/passwd"
    chgrp dovecot "$d/passwd"
    chmod 640 "$d/passwd"
    cat >"$d/dovecot.conf" <<EOF
# qresyncd bench: Dovecot as a legacy upstream (no CONDSTORE, QRESYNC or
# ENABLE advertised), sized for $IDLE_N+ sessions of one user from 127.0.0.1.
protocols = imap
listen = 127.0.0.1
base_dir = $d/run
state_dir = $d/state
instance_name = qr-bench-dovecot-$DOVECOT_PORT
log_path = $d/dovecot.log
info_log_path = $d/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
imap_capability = $QR_DOVECOT_CAPS
mail_location = maildir:~/Maildir
first_valid_uid = $QR_MAIL_UID
last_valid_uid = $QR_MAIL_UID
first_valid_gid = $QR_MAIL_GID
imap_hibernate_timeout = 0
default_process_limit = $((IDLE_N + 200))
default_client_limit = $((4 * IDLE_N + 1000))
mail_max_userip_connections = $((2 * IDLE_N + 100))
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $d/passwd
}
userdb {
  driver = static
  args = uid=$QR_MAIL_UID gid=$QR_MAIL_GID home=$d/home/%u
}
namespace inbox {
  inbox = yes
  separator = .
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $DOVECOT_PORT
  }
  inet_listener imaps {
    port = 0
  }
  service_count = 0
  process_min_avail = 2
  process_limit = 4
  client_limit = $((2 * IDLE_N + 200))
}
service imap {
  process_limit = $((IDLE_N + 200))
}
EOF
    dovecot -F -c "$d/dovecot.conf" >>"$d/dovecot.stderr" 2>&1 </dev/null &
    DOVECOT_PID=$!
    echo "$DOVECOT_PID" >"$d/dovecot.pid"
    QR_SERVER_PIDS+=("$d/dovecot.pid")
    if ! qr_wait_ready "$DOVECOT_PORT" "$DOVECOT_PID" "* OK"; then
        qr_log "dovecot did not start; log:"
        tail -20 "$d/dovecot.stderr" "$d/dovecot.log" >&2 2>/dev/null
        return 1
    fi
}

# ------------------------------------------------------------- qresyncd ----
PROXY_PID=
PROXY_PORT=
PROXY_N=0
start_proxy() {
    PROXY_N=$((PROXY_N + 1))
    PROXY_LOG=$OUT/qresyncd.$PROXY_N.log
    PROXY_PORT=$(qr_free_port)
    ./qresyncd --listen "127.0.0.1:$PROXY_PORT" --upstream "127.0.0.1:$DOVECOT_PORT" \
        --log-level warn >"$PROXY_LOG" 2>&1 </dev/null &
    PROXY_PID=$!
    if ! qr_wait_ready "$PROXY_PORT" "$PROXY_PID" "* OK"; then
        tail -20 "$PROXY_LOG" >&2
        fail "qresyncd did not start (log $PROXY_LOG)"
    fi
}
stop_proxy() {
    [ -n "$PROXY_PID" ] || return 0
    local pid=$PROXY_PID rc=0
    PROXY_PID=
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || rc=$?
    return 0
}
check_proxy() {
    if [ -n "$PROXY_PID" ] && ! kill -0 "$PROXY_PID" 2>/dev/null; then
        wait "$PROXY_PID" 2>/dev/null && rc=0 || rc=$?
        PROXY_PID=
        tail -20 "$PROXY_LOG" >&2
        fail "qresyncd exited (status $rc) during $1; log $PROXY_LOG"
    fi
}
keep_logs() {
    [ -n "${DOVECOT_DIR:-}" ] && cp "$DOVECOT_DIR/dovecot.log" "$OUT/dovecot.log" 2>/dev/null
    return 0
}
QR_CLEANUP_HOOKS="stop_proxy keep_logs $QR_CLEANUP_HOOKS"

# Runs the tool; its one line of figures goes to stdout. On failure, shows
# what the tool said and fails the bench.
run_tool() {
    local what=$1 line
    shift
    if ! line=$("${BENCH_CMD[@]}" "$@" 2>"$OUT/tool.err"); then
        cat "$OUT/tool.err" >&2
        check_proxy "$what"
        fail "$what: imapbench $*"
    fi
    printf '%s\n' "$line"
}
field() { # field LINE KEY
    local kv
    for kv in $1; do
        if [ "${kv%%=*}" = "$2" ]; then
            printf '%s\n' "${kv#*=}"
            return 0
        fi
    done
    fail "no $2 in: $1"
}
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {if (NR%2) print v[(NR+1)/2]; else printf "%.1f\n", (v[NR/2]+v[NR/2+1])/2}'; }
calc() { awk "BEGIN {printf \"$1\n\", $2}"; }

# ----------------------------------------------------------------- setup ----
T0=$(date +%s)
say "generating $MSGS messages (~$((MSGS * MSG_BYTES / 1000000)) MB) ..."
GEN=$(python3 tests/bench/genmaildir.py "$QR_TMP/Maildir" "$MSGS" "$MSG_BYTES")
WANT_BYTES=$(field "$GEN" bytes)
bench_start_dovecot
mv "$QR_TMP/Maildir" "$DOVECOT_MAILDIR"
chown -R "$QR_MAIL_UID:$QR_MAIL_GID" "$DOVECOT_DIR/home"
say "dovecot $(dovecot --version | cut -d' ' -f1) on 127.0.0.1:$DOVECOT_PORT (pid $DOVECOT_PID)"
if [ "$DIRECT_ONLY" != 1 ]; then
    start_proxy
    say "qresyncd on 127.0.0.1:$PROXY_PORT (pid $PROXY_PID) -> 127.0.0.1:$DOVECOT_PORT"
fi
H=127.0.0.1
U=$QR_USER
P=$QR_PASS

# ------------------------------------------------------------------ noop ----
# On this kind of host (2 vCPUs) a NOOP round trip is ~20 us when the client
# and the upstream's imap process share a CPU and ~70-85 us when they do not,
# and the scheduler picks per process, so an unpinned median jumps between
# the two from one connection to the next. The reported figures are
# therefore taken pinned: the client on CPU 1, Dovecot (its master, so the
# imap processes forked for these connections) and qresyncd on CPU 0, i.e.
# a remote client and a proxy next to its server. Direct and proxy trips are
# interleaved on two connections of one client process. An unpinned pass
# follows, for the record. Affinity is restored before the fetch phase.
NCPU=$(nproc)
PIN=${BENCH_PIN:-1}
[ "$NCPU" -ge 2 ] || PIN=0
pin() { # pin CPULIST PID...: every thread of each PID
    local cpus=$1 pid
    shift
    for pid in "$@"; do
        taskset -a -p -c "$cpus" "$pid" >/dev/null || fail "taskset $cpus $pid"
    done
}
NOOP_PORTS=$DOVECOT_PORT
[ "$DIRECT_ONLY" = 1 ] || NOOP_PORTS=$DOVECOT_PORT,$PROXY_PORT
CLIENT_PIN=()
if [ "$PIN" = 1 ]; then
    pin 0 "$DOVECOT_PID" ${PROXY_PID:+"$PROXY_PID"}
    CLIENT_PIN=(taskset -c 1)
fi
noop_run() { # noop_run LABEL: sets NOOP_D (and NOOP_P)
    local out
    out=$(run_tool "noop" noop $H "$NOOP_PORTS" "$U" "$P" "$NOOP_N" "$NOOP_WARMUP")
    NOOP_D=$(printf '%s\n' "$out" | sed -n 1p)
    say "  noop direct $1: ${NOOP_D#noop }"
    if [ "$DIRECT_ONLY" != 1 ]; then
        NOOP_P=$(printf '%s\n' "$out" | sed -n 2p)
        say "  noop proxy  $1: ${NOOP_P#noop }"
        check_proxy "noop"
    fi
}
BENCH_CMD=("${CLIENT_PIN[@]}" "$OUT/imapbench")
noop_run "$([ "$PIN" = 1 ] && echo '(pinned)  ' || echo '(unpinned)')"
NOOP_D_PINNED=$NOOP_D
NOOP_P_PINNED=${NOOP_P:-}
if [ "$PIN" = 1 ]; then
    pin "0-$((NCPU - 1))" "$DOVECOT_PID" ${PROXY_PID:+"$PROXY_PID"}
    BENCH_CMD=("$OUT/imapbench")
    noop_run "(unpinned)"
fi
NOOP_D=$NOOP_D_PINNED
NOOP_P=$NOOP_P_PINNED

# ----------------------------------------------------------------- fetch ----
# One untimed direct fetch first: Dovecot indexes the new Maildir and the
# page cache fills. Then direct/proxy alternated FETCH_RUNS times; every run
# must return the same bytes (hash) as the first.
W=$(run_tool "fetch warm-up" fetch $H "$DOVECOT_PORT" "$U" "$P" INBOX "$MSGS" "$WANT_BYTES")
HASH=$(field "$W" hash)
say "  fetch warm-up: ${W#fetch }"
if [ "$PERF" = 1 ] && [ "$DIRECT_ONLY" != 1 ]; then
    perf record -g -o "$OUT/perf.data" -p "$PROXY_PID" >"$OUT/perf.log" 2>&1 &
    PERF_PID=$!
    sleep 1
fi
FD=()
FP=()
for ((i = 1; i <= FETCH_RUNS; i++)); do
    L=$(run_tool "fetch direct" fetch $H "$DOVECOT_PORT" "$U" "$P" INBOX "$MSGS" "$WANT_BYTES")
    [ "$(field "$L" hash)" = "$HASH" ] || fail "fetch direct run $i returned other bytes: $L"
    FD+=("$(field "$L" mb_s)")
    say "  fetch direct run $i: ${L#fetch }"
    if [ "$DIRECT_ONLY" != 1 ]; then
        L=$(run_tool "fetch proxy" fetch $H "$PROXY_PORT" "$U" "$P" INBOX "$MSGS" "$WANT_BYTES")
        [ "$(field "$L" hash)" = "$HASH" ] ||
            fail "fetch through qresyncd run $i returned other bytes than direct: $L"
        FP+=("$(field "$L" mb_s)")
        say "  fetch proxy  run $i: ${L#fetch }"
        check_proxy "fetch"
    fi
done
if [ "$PERF" = 1 ] && [ "$DIRECT_ONLY" != 1 ]; then
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    perf report -i "$OUT/perf.data" --no-children --stdio --percent-limit 1 \
        >"$OUT/perf-report.txt" 2>/dev/null || true
    say "  perf profile of qresyncd: $OUT/perf-report.txt"
fi

# ------------------------------------------------------------------ idle ----
# A fresh qresyncd, so its RSS holds nothing but startup and the sessions.
IDLE_D=$(run_tool "idle direct" idle $H "$DOVECOT_PORT" "$U" "$P" "$IDLE_N" 1)
say "  idle direct: ${IDLE_D#idle }"
if [ "$DIRECT_ONLY" != 1 ]; then
    stop_proxy
    start_proxy
    IDLE_P=$(run_tool "idle proxy" idle $H "$PROXY_PORT" "$U" "$P" "$IDLE_N" "$IDLE_HOLD" "$PROXY_PID")
    say "  idle proxy: ${IDLE_P#idle }"
    check_proxy "idle"
    stop_proxy
fi

# ---------------------------------------------------------------- report ----
nd_med=$(field "$NOOP_D" median_us)
nd_p99=$(field "$NOOP_D" p99_us)
fd_med=$(median "${FD[@]}")
echo
if [ "$DIRECT_ONLY" = 1 ]; then
    say "noop median direct $nd_med us, p99 $nd_p99 us"
    say "fetch direct $fd_med MB/s (median of $FETCH_RUNS)"
    say "(BENCH_DIRECT_ONLY=1: no proxy figures)"
    exit 0
fi
np_med=$(field "$NOOP_P" median_us)
np_p99=$(field "$NOOP_P" p99_us)
add_med=$(calc %.1f "$np_med - $nd_med")
add_p99=$(calc %.1f "$np_p99 - $nd_p99")
fp_med=$(median "${FP[@]}")
ratio=$(calc %.3f "$fp_med / $fd_med")
per_sess=$(field "$IDLE_P" per_session_kib)
rss0=$(field "$IDLE_P" rss_before_kib)
rss1=$(field "$IDLE_P" rss_after_kib)
verdict() { awk "BEGIN {print ($1) ? \"met\" : \"MISSED\"}"; }
v_noop=$(verdict "$add_med <= 50")
v_fetch=$(verdict "$ratio >= 0.95")
v_idle=$(verdict "$per_sess <= 16")
mb=$(calc %.0f "$WANT_BYTES / 1e6")
pinned=unpinned
[ "$PIN" = 1 ] && pinned="pinned: client CPU 1, Dovecot and qresyncd CPU 0"

say "noop median direct $nd_med us proxy $np_med us added $add_med us (target <= 50: $v_noop; $pinned)"
say "noop p99    direct $nd_p99 us proxy $np_p99 us added $add_p99 us"
say "fetch direct $fd_med MB/s proxy $fp_med MB/s ratio $ratio (target >= 0.95: $v_fetch)"
say "idle rss $per_sess KiB/session ($rss0 -> $rss1 KiB for $IDLE_N sessions; target <= 16: $v_idle)"
say "total $(($(date +%s) - T0)) s"

cat >"$OUT/results.md" <<EOF
| measurement | direct (Dovecot) | through qresyncd | proxy cost | target |
| --- | ---: | ---: | ---: | --- |
| NOOP round trip, median ($NOOP_N trips; $pinned) | $nd_med µs | $np_med µs | +$add_med µs | ≤ +50 µs ($v_noop) |
| NOOP round trip, p99 | $nd_p99 µs | $np_p99 µs | +$add_p99 µs | |
| \`UID FETCH 1:* BODY.PEEK[]\`, $MSGS msgs / $mb MB (median of $FETCH_RUNS) | $fd_med MB/s | $fp_med MB/s | ratio $ratio | ≥ 0.95 ($v_fetch) |
| RSS per idle logged-in session ($IDLE_N sessions) | | $per_sess KiB | | ≤ 16 KiB ($v_idle) |

Measured $(date -u +%Y-%m-%d) on $(nproc) cores, $(uname -m), Dovecot $(dovecot --version | cut -d' ' -f1), loopback; \`make bench\`.
EOF
say "wrote build/bench/results.md"
