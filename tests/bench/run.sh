#!/usr/bin/env bash
# make bench: qresyncd in front of a legacy Dovecot, against the same
# Dovecot directly, in one run (STYLE.md §9: ratios against a baseline from
# the same run). Benchmarks are not tests: timing never fails the run. A
# broken session, a wrong message or byte count, FETCH bytes that differ from
# the direct ones, or a proxy that dies makes it exit non-zero.
#
#   1. NOOP round trip on one logged-in connection: median, p99, added median.
#   2. UID FETCH 1:* BODY.PEEK[] of a generated 2000-message (~200 MB)
#      mailbox: MB/s, rounds alternated, medians, ratio proxy/direct.
#   3. RSS of a fresh qresyncd holding 1000 logged-in idle sessions.
#
# A third path, tests/bench/relay.c (a minimal byte relay that understands
# nothing), is measured beside direct and qresyncd: direct vs relay is what
# any user-space hop costs on this host, relay vs qresyncd what qresyncd
# itself adds.
#
# Prints "bench: ..." lines (details, then a summary) and writes
# build/bench/results.md. qresyncd's and Dovecot's logs stay in build/bench/.
# Knobs (environment):
#   BENCH_NOOP_N=2000 BENCH_NOOP_WARMUP=200 BENCH_FETCH_RUNS=7 BENCH_MSGS=2000
#   BENCH_MSG_BYTES=100000 BENCH_IDLE_N=1000 BENCH_IDLE_HOLD=3
#   BENCH_IDLE_WORK=0     skip the second RSS figure (sessions that fetched first)
#   BENCH_PIN=0           no CPU pinning in the NOOP phase (see there)
#   BENCH_RELAY=0         leave out the reference relay
#   BENCH_DIRECT_ONLY=1   Dovecot (and relay) only; no ./qresyncd needed
#   BENCH_QRESYNCD=PATH   the proxy binary to measure (default ./qresyncd)
#   BENCH_QRESYNCD_ARGS   extra qresyncd arguments, e.g. "--buffer-size 64k"
#   BENCH_PERF=1          perf record -g on qresyncd during its fetches
#                         (build/bench/perf.data, perf-report.txt)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)

NOOP_N=${BENCH_NOOP_N:-2000}
NOOP_WARMUP=${BENCH_NOOP_WARMUP:-200}
FETCH_RUNS=${BENCH_FETCH_RUNS:-7}
MSGS=${BENCH_MSGS:-2000}
MSG_BYTES=${BENCH_MSG_BYTES:-100000}
IDLE_N=${BENCH_IDLE_N:-1000}
IDLE_HOLD=${BENCH_IDLE_HOLD:-3}
IDLE_WORK=${BENCH_IDLE_WORK:-1}
PIN=${BENCH_PIN:-1}
RELAY=${BENCH_RELAY:-1}
DIRECT_ONLY=${BENCH_DIRECT_ONLY:-0}
QRESYNCD=${BENCH_QRESYNCD:-./qresyncd}
read -r -a QRESYNCD_ARGS <<<"${BENCH_QRESYNCD_ARGS:-}"
PERF=${BENCH_PERF:-0}
NCPU=$(nproc)
[ "$NCPU" -ge 2 ] || PIN=0

OUT=$ROOT/build/bench
mkdir -p "$OUT"
rm -f "$OUT/results.md" "$OUT"/*.log "$OUT/perf-report.txt"

say() { printf 'bench: %s\n' "$*"; }
fail() {
    printf 'bench: FAILED: %s\n' "$*" >&2
    exit 1
}

# 1000 client sockets + 1000 upstream sockets in qresyncd, 1000 in the load
# tool, 2000 in Dovecot's login process: raise the descriptor limit for
# everything started from here.
hard=$(ulimit -Hn)
if [ "$hard" = unlimited ] || [ "$hard" -gt 65536 ]; then
    hard=65536
fi
ulimit -n "$hard"
if [ "$hard" -lt $((2 * IDLE_N + 200)) ]; then
    fail "ulimit -n is $hard (hard limit); $((2 * IDLE_N + 200)) needed for $IDLE_N sessions"
fi

# ------------------------------------------------------------- the tools ----
CFLAGS_BENCH=(-O2 -std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -Wshadow
    -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 -Wundef -Wvla)
cc "${CFLAGS_BENCH[@]}" -o "$OUT/imapbench" tests/bench/imapbench.c
cc "${CFLAGS_BENCH[@]}" -o "$OUT/relay" tests/bench/relay.c

if [ "$DIRECT_ONLY" != 1 ] && [ ! -x "$QRESYNCD" ]; then
    fail "$QRESYNCD not built (make VARIANT=release all)"
fi

# shellcheck source=tests/integration/servers.sh
source tests/integration/servers.sh
# shellcheck source=tests/bench/dovecot.sh
source tests/bench/dovecot.sh

# --------------------------------------------------------------- helpers ----
# The measured paths: direct, relay, proxy (each a port, the last two a PID).
PATHS=(direct)
declare -A PORT=() PID=()
PROXY_LOG=
PROXY_N=0

start_proxy() {
    PROXY_N=$((PROXY_N + 1))
    PROXY_LOG=$OUT/qresyncd.$PROXY_N.log
    PORT[proxy]=$(qr_free_port)
    "$QRESYNCD" --listen "127.0.0.1:${PORT[proxy]}" --upstream "127.0.0.1:$DOVECOT_PORT" \
        --log-level warn "${QRESYNCD_ARGS[@]}" >"$PROXY_LOG" 2>&1 </dev/null &
    PID[proxy]=$!
    if ! qr_wait_ready "${PORT[proxy]}" "${PID[proxy]}" "* OK"; then
        tail -20 "$PROXY_LOG" >&2
        fail "qresyncd did not start (log $PROXY_LOG)"
    fi
}
start_relay() {
    PORT[relay]=$(qr_free_port)
    "$OUT/relay" "${PORT[relay]}" "$DOVECOT_PORT" >"$OUT/relay.log" 2>&1 </dev/null &
    PID[relay]=$!
    qr_wait_ready "${PORT[relay]}" "${PID[relay]}" "* OK" || fail "relay did not start"
}
stop_path() { # stop_path relay|proxy
    local pid=${PID[$1]:-}
    [ -n "$pid" ] || return 0
    PID[$1]=
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
check_paths() { # check_paths PHASE: fails when the proxy or the relay died
    local p rc
    for p in proxy relay; do
        if [ -n "${PID[$p]:-}" ] && ! kill -0 "${PID[$p]}" 2>/dev/null; then
            wait "${PID[$p]}" 2>/dev/null && rc=0 || rc=$?
            PID[$p]=
            if [ "$p" = proxy ]; then
                tail -20 "$PROXY_LOG" >&2
                fail "qresyncd exited (status $rc) during $1; log $PROXY_LOG"
            fi
            fail "relay exited (status $rc) during $1"
        fi
    done
}
stop_all_paths() {
    stop_path proxy
    stop_path relay
}
keep_logs() {
    [ -n "${DOVECOT_DIR:-}" ] && cp "$DOVECOT_DIR/dovecot.log" "$OUT/dovecot.log" 2>/dev/null
    return 0
}
QR_CLEANUP_HOOKS="stop_all_paths keep_logs $QR_CLEANUP_HOOKS"

# Runs the tool (under BENCH_CMD); its figures go to stdout. On failure,
# shows what the tool said and fails the bench.
BENCH_CMD=("$OUT/imapbench")
run_tool() {
    local what=$1 out
    shift
    if ! out=$("${BENCH_CMD[@]}" "$@" 2>"$OUT/tool.err"); then
        cat "$OUT/tool.err" >&2
        check_paths "$what"
        fail "$what: imapbench $*"
    fi
    printf '%s\n' "$out"
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
median() {
    printf '%s\n' "$@" | sort -g |
        awk '{v[NR] = $1} END {if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2}'
}
calc() { awk "BEGIN {printf \"$1\n\", $2}"; }
# CPU time (ns) a process has used so far, all its threads (schedstat is
# exact, unlike the 10 ms ticks of /proc/PID/stat). 0 when there is none.
cpu_ns() {
    if [ -z "${1:-}" ]; then
        echo 0
        return
    fi
    cat /proc/"$1"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%.0f\n", s}'
}
# Busy and idle jiffies of the whole machine.
machine_jiffies() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $5 + $6; exit}' /proc/stat; }
pin() { # pin CPULIST PID...: every thread of each PID
    local cpus=$1 pid
    shift
    for pid in "$@"; do
        [ -n "$pid" ] || continue
        taskset -a -p -c "$cpus" "$pid" >/dev/null || fail "taskset $cpus $pid"
    done
}

# ----------------------------------------------------------------- setup ----
T0=$(date +%s)
say "generating $MSGS messages (~$((MSGS * MSG_BYTES / 1000000)) MB) ..."
GEN=$(python3 tests/bench/genmaildir.py "$QR_TMP/Maildir" "$MSGS" "$MSG_BYTES")
WANT_BYTES=$(field "$GEN" bytes)
if [ "${BENCH_TLS:-1}" = 1 ]; then # for the TLS section: a throwaway PKI; Dovecot speaks TLS too
    tests/integration/make_pki.sh "$QR_TMP/pki"
    export QR_DOVECOT_SSL_CERT=$QR_TMP/pki/dovecot.pem QR_DOVECOT_SSL_KEY=$QR_TMP/pki/dovecot.key
fi
bench_start_dovecot
mv "$QR_TMP/Maildir" "$DOVECOT_MAILDIR"
chown -R "$QR_MAIL_UID:$QR_MAIL_GID" "$DOVECOT_DIR/home"
PORT[direct]=$DOVECOT_PORT
say "dovecot $(dovecot --version | cut -d' ' -f1) on 127.0.0.1:$DOVECOT_PORT (pid $DOVECOT_PID)"
if [ "$RELAY" = 1 ]; then
    start_relay
    PATHS+=(relay)
    say "relay on 127.0.0.1:${PORT[relay]} (pid ${PID[relay]})"
fi
if [ "$DIRECT_ONLY" != 1 ]; then
    start_proxy
    PATHS+=(proxy)
    say "qresyncd on 127.0.0.1:${PORT[proxy]} (pid ${PID[proxy]}) $QRESYNCD ${QRESYNCD_ARGS[*]}"
fi
H=127.0.0.1
U=$QR_USER
P=$QR_PASS
ports_csv() {
    local p out=
    for p in "${PATHS[@]}"; do out+=${out:+,}${PORT[$p]}; done
    printf '%s\n' "$out"
}

# ------------------------------------------------------------------ noop ----
# On this kind of host (2 vCPUs) a NOOP round trip is ~20 us when the client
# and the upstream's imap process share a CPU and ~50-85 us when they do
# not; the scheduler decides per process, so an unpinned median jumps
# between the two from one connection to the next. The reported figures
# are therefore taken pinned: the client on CPU 1; Dovecot (its master, so
# the imap processes forked for these connections), the relay and qresyncd
# on CPU 0: a remote client, a proxy next to its server. The trips of all
# paths are interleaved (one connection each, one client process), so they
# share the machine's state over time. An unpinned pass follows, for the
# record. Affinity is restored before the fetch phase.
declare -A NOOP=()
noop_pass() { # noop_pass LABEL: sets NOOP[path]
    local out p line
    out=$(run_tool "noop" noop $H "$(ports_csv)" "$U" "$P" "$NOOP_N" "$NOOP_WARMUP")
    for p in "${PATHS[@]}"; do
        line=$(printf '%s\n' "$out" | grep " port=${PORT[$p]} ") || fail "noop: no line for $p"
        NOOP[$p]=$line
        say "  noop $(printf '%-6s' "$p") $1: ${line#noop }"
    done
    check_paths "noop"
}
if [ "$PIN" = 1 ]; then
    pin 0 "$DOVECOT_PID" "${PID[relay]:-}" "${PID[proxy]:-}"
    BENCH_CMD=(taskset -c 1 "$OUT/imapbench")
fi
c0=$(cpu_ns "${PID[proxy]:-}")
r0=$(cpu_ns "${PID[relay]:-}")
noop_pass "$([ "$PIN" = 1 ] && echo '(pinned)  ' || echo '(unpinned)')"
NOOP_CPU_US=$(calc %.1f "($(cpu_ns "${PID[proxy]:-}") - $c0) / 1000 / ($NOOP_N + $NOOP_WARMUP)")
NOOP_CPU_RELAY_US=$(calc %.1f "($(cpu_ns "${PID[relay]:-}") - $r0) / 1000 / ($NOOP_N + $NOOP_WARMUP)")
declare -A NOOP_MAIN=() NOOP_FREE=()
for p in "${PATHS[@]}"; do NOOP_MAIN[$p]=${NOOP[$p]}; done
if [ "$PIN" = 1 ]; then
    pin "0-$((NCPU - 1))" "$DOVECOT_PID" "${PID[relay]:-}" "${PID[proxy]:-}"
    BENCH_CMD=("$OUT/imapbench")
    noop_pass "(unpinned)"
    for p in "${PATHS[@]}"; do NOOP_FREE[$p]=${NOOP[$p]}; done
fi

# ----------------------------------------------------------------- fetch ----
# One untimed direct fetch first: Dovecot indexes the new Maildir and the
# page cache fills. Then rounds of direct, relay, proxy; every run must
# return the same bytes (hash) as the warm-up. Each run also records the
# machine's CPU use (all CPUs, /proc/stat, other processes included) and the
# relay's and qresyncd's own CPU time: where the direct path already keeps
# both CPUs busy, a hop's CPU cost comes out of the throughput.
W=$(run_tool "fetch warm-up" fetch $H "$DOVECOT_PORT" "$U" "$P" INBOX "$MSGS" "$WANT_BYTES")
HASH=$(field "$W" hash)
say "  fetch warm-up: ${W#fetch }"
if [ "$PERF" = 1 ] && [ -n "${PID[proxy]:-}" ]; then
    perf record -g -o "$OUT/perf.data" -p "${PID[proxy]}" >"$OUT/perf.log" 2>&1 &
    PERF_PID=$!
    sleep 1
fi
declare -A MBS=() HOP_CPU=() MACH=()
fetch_run() { # fetch_run PATH ROUND
    local p=$1 c0 line b0 i0 b1 i1 pct
    c0=$(cpu_ns "${PID[$p]:-}")
    read -r b0 i0 < <(machine_jiffies)
    line=$(run_tool "fetch $p" fetch $H "${PORT[$p]}" "$U" "$P" INBOX "$MSGS" "$WANT_BYTES")
    read -r b1 i1 < <(machine_jiffies)
    [ "$(field "$line" hash)" = "$HASH" ] ||
        fail "fetch $p run $2 returned other bytes than the direct warm-up: $line"
    check_paths "fetch"
    pct=$(calc %.0f "100 * ($b1 - $b0) / ($b1 - $b0 + $i1 - $i0 + 0.001)")
    MBS[$p]="${MBS[$p]:-} $(field "$line" mb_s)"
    MACH[$p]=$((${MACH[$p]:-0} + b1 - b0))
    HOP_CPU[$p]=$((${HOP_CPU[$p]:-0} + $(cpu_ns "${PID[$p]:-}") - c0))
    say "  fetch $(printf '%-6s' "$p") run $2: ${line#fetch } machine_busy=$pct%"
}
for ((i = 1; i <= FETCH_RUNS; i++)); do
    for p in "${PATHS[@]}"; do fetch_run "$p" "$i"; done
done
if [ -n "${PERF_PID:-}" ]; then
    kill -INT "$PERF_PID" 2>/dev/null || true
    wait "$PERF_PID" 2>/dev/null || true
    {
        perf report -i "$OUT/perf.data" --no-children --stdio -g none --sort dso
        perf report -i "$OUT/perf.data" --no-children --stdio -g none --percent-limit 0.5
        perf report -i "$OUT/perf.data" --no-children --stdio --percent-limit 2
    } >"$OUT/perf-report.txt" 2>/dev/null || true
    say "  perf profile of qresyncd: $OUT/perf-report.txt"
fi

# ------------------------------------------------------------------ idle ----
# Direct first (the upstream holds IDLE_N sessions of one user at all), then
# a fresh qresyncd, so its RSS holds nothing but startup and the sessions.
# The relay is stopped: its sockets would only add noise.
stop_path relay
IDLE_D=$(run_tool "idle direct" idle $H "$DOVECOT_PORT" "$U" "$P" "$IDLE_N" 1)
say "  idle direct: ${IDLE_D#idle }"
if [ "$DIRECT_ONLY" != 1 ]; then
    stop_path proxy
    start_proxy
    IDLE_P=$(run_tool "idle proxy" idle $H "${PORT[proxy]}" "$U" "$P" "$IDLE_N" "$IDLE_HOLD" \
        "${PID[proxy]}")
    say "  idle proxy: ${IDLE_P#idle }"
    check_paths "idle"
    stop_path proxy
    # The same after each session fetched two messages (~200 KB), as a
    # client syncs before it idles: what an idle session keeps of its buffers.
    if [ "$IDLE_WORK" = 1 ]; then
        start_proxy
        IDLE_W=$(run_tool "idle proxy after fetch" idle $H "${PORT[proxy]}" "$U" "$P" "$IDLE_N" \
            "$IDLE_HOLD" "${PID[proxy]}" INBOX 1:2)
        say "  idle proxy after FETCH 1:2: ${IDLE_W#idle }"
        check_paths "idle"
        stop_path proxy
    fi
fi

# ---------------------------------------------------------------- report ----
declare -A MED=() P99=() FMED=() HOPMS=() MACHMS=()
jiffy=$(getconf CLK_TCK)
per100=$(calc %.6f "$FETCH_RUNS * $WANT_BYTES / 1e8") # units of 100 MB fetched per path
for p in "${PATHS[@]}"; do
    MED[$p]=$(field "${NOOP_MAIN[$p]}" median_us)
    P99[$p]=$(field "${NOOP_MAIN[$p]}" p99_us)
    # shellcheck disable=SC2086 # a list of figures
    FMED[$p]=$(median ${MBS[$p]})
    HOPMS[$p]=$(calc %.1f "${HOP_CPU[$p]} / 1e6 / $per100")
    MACHMS[$p]=$(calc %.0f "${MACH[$p]} * 1000 / $jiffy / $per100")
done
pinned=unpinned
[ "$PIN" = 1 ] && pinned="pinned: client on CPU 1, servers on CPU 0"
mb=$(calc %.0f "$WANT_BYTES / 1e6")
echo
if [ "$DIRECT_ONLY" = 1 ]; then
    for p in "${PATHS[@]}"; do
        say "noop median $p ${MED[$p]} us, p99 ${P99[$p]} us ($pinned)"
        say "fetch $p ${FMED[$p]} MB/s (median of $FETCH_RUNS)"
    done
    say "(BENCH_DIRECT_ONLY=1: no qresyncd figures)"
    exit 0
fi
add_med=$(calc %+.1f "${MED[proxy]} - ${MED[direct]}")
add_p99=$(calc %+.1f "${P99[proxy]} - ${P99[direct]}")
ratio=$(calc %.3f "${FMED[proxy]} / ${FMED[direct]}")
per_sess=$(field "$IDLE_P" per_session_kib)
rss0=$(field "$IDLE_P" rss_before_kib)
rss1=$(field "$IDLE_P" rss_after_kib)
verdict() { awk "BEGIN {print ($1) ? \"met\" : \"MISSED\"}"; }
v_noop=$(verdict "$add_med <= 50")
v_fetch=$(verdict "$ratio >= 0.95")
v_idle=$(verdict "$per_sess <= 16")
relay_noop=
relay_fetch=
relay_md=
if [ "$RELAY" = 1 ]; then
    add_relay=$(calc %+.1f "${MED[relay]} - ${MED[direct]}")
    ratio_relay=$(calc %.3f "${FMED[relay]} / ${FMED[direct]}")
    ratio_pr=$(calc %.3f "${FMED[proxy]} / ${FMED[relay]}")
    relay_noop="; bare relay ${MED[relay]} us ($add_relay)"
    relay_fetch="; bare relay ${FMED[relay]} MB/s (ratio $ratio_relay), qresyncd/relay $ratio_pr"
    relay_md="| reference: a bare byte relay (tests/bench/relay.c) instead of qresyncd | | NOOP ${MED[relay]} µs ($add_relay), p99 ${P99[relay]} µs; fetch ${FMED[relay]} MB/s (ratio $ratio_relay), CPU ${HOPMS[relay]} ms per 100 MB | | qresyncd/relay throughput $ratio_pr |"
fi

say "noop median direct ${MED[direct]} us proxy ${MED[proxy]} us added $add_med us (target <= 50: $v_noop; $pinned)$relay_noop"
say "noop p99    direct ${P99[direct]} us proxy ${P99[proxy]} us added $add_p99 us"
if [ "$PIN" = 1 ]; then
    fd=$(field "${NOOP_FREE[direct]}" median_us)
    fp=$(field "${NOOP_FREE[proxy]}" median_us)
    say "noop unpinned: median direct $fd us proxy $fp us added $(calc %+.1f "$fp - $fd") us; p99 direct $(field "${NOOP_FREE[direct]}" p99_us) us proxy $(field "${NOOP_FREE[proxy]}" p99_us) us"
fi
say "fetch direct ${FMED[direct]} MB/s proxy ${FMED[proxy]} MB/s ratio $ratio (target >= 0.95: $v_fetch; median of $FETCH_RUNS)$relay_fetch"
relay_cpu=
[ "$RELAY" = 1 ] && relay_cpu=" (bare relay: $NOOP_CPU_RELAY_US us, ${HOPMS[relay]} ms)"
say "cpu: qresyncd $NOOP_CPU_US us per NOOP, ${HOPMS[proxy]} ms per 100 MB fetched$relay_cpu; whole machine per 100 MB fetched: direct ${MACHMS[direct]} ms, proxy ${MACHMS[proxy]} ms"
say "idle rss $per_sess KiB/session ($rss0 -> $rss1 KiB for $IDLE_N sessions; target <= 16: $v_idle)"
work_md=
if [ -n "${IDLE_W:-}" ]; then
    per_sess_w=$(field "$IDLE_W" per_session_kib)
    say "idle rss after each session fetched ~200 KB: $per_sess_w KiB/session ($(field "$IDLE_W" rss_before_kib) -> $(field "$IDLE_W" rss_after_kib) KiB)"
    work_md="| RSS per idle session that first fetched 2 messages (~200 KB), $IDLE_N sessions | | $per_sess_w KiB | | (informational) |"
fi
say "total $(($(date +%s) - T0)) s"

{
    echo "| measurement | direct (Dovecot) | through qresyncd | qresyncd's cost | target |"
    echo "| --- | ---: | ---: | ---: | --- |"
    echo "| NOOP round trip, median of $NOOP_N ($pinned) | ${MED[direct]} µs | ${MED[proxy]} µs | $add_med µs | ≤ +50 µs ($v_noop) |"
    echo "| NOOP round trip, p99 | ${P99[direct]} µs | ${P99[proxy]} µs | $add_p99 µs | |"
    echo "| \`UID FETCH 1:* BODY.PEEK[]\`, $MSGS messages, $mb MB (median of $FETCH_RUNS) | ${FMED[direct]} MB/s | ${FMED[proxy]} MB/s | ratio $ratio | ≥ 0.95 ($v_fetch) |"
    echo "| CPU time per 100 MB fetched: whole machine / qresyncd alone | ${MACHMS[direct]} ms | ${MACHMS[proxy]} ms / ${HOPMS[proxy]} ms | | |"
    echo "| RSS per logged-in idle session, $IDLE_N sessions | | $per_sess KiB | | ≤ 16 KiB ($v_idle) |"
    [ -z "$work_md" ] || echo "$work_md"
    [ -z "$relay_md" ] || echo "$relay_md"
    echo
    echo "Measured $(date -u +%Y-%m-%d) with \`make bench\` (tests/bench/run.sh): $NCPU CPUs ($(uname -m)), loopback, Dovecot $(dovecot --version | cut -d' ' -f1) without CONDSTORE/QRESYNC, qresyncd in legacy mode (no Redis)."
} >"$OUT/results.md"
say "wrote build/bench/results.md"

# ------------------------------------------------------------------ tls ----
# Issue 4: TLS on both sides. The same bulk FETCH with a TLS client
# (tests/bench/tlsbench.c, OpenSSL, certificate verified), directly against
# Dovecot's implicit-TLS port and through a qresyncd that terminates TLS
# from the client and speaks implicit TLS to Dovecot (certificate verified
# against the bench's throwaway CA), rounds alternated, medians; then the
# RSS of IDLE_N logged-in idle sessions with TLS on both sides and with TLS
# towards the client only. Rows are appended to build/bench/results.md.
# BENCH_TLS=0 leaves it out.
if [ "${BENCH_TLS:-1}" = 1 ] && [ "$DIRECT_ONLY" != 1 ]; then
    cc "${CFLAGS_BENCH[@]}" -o "$OUT/tlsbench" tests/bench/tlsbench.c -lssl -lcrypto
    K=$QR_TMP/pki
    TLSB=("$OUT/tlsbench")
    start_tls_proxy() { # start_tls_proxy UPSTREAM-TLS-MODE: PORT[tls], PID[tls]
        local up=("--upstream" "127.0.0.1:$DOVECOT_TLS_PORT" "--upstream-tls" implicit)
        [ "$1" = none ] && up=("--upstream" "127.0.0.1:$DOVECOT_PORT")
        PROXY_N=$((PROXY_N + 1))
        PROXY_LOG=$OUT/qresyncd.$PROXY_N.log
        PORT[tls]=$(qr_free_port)
        "$QRESYNCD" --listen-tls "127.0.0.1:${PORT[tls]}" --tls-cert "$K/proxy.pem" \
            --tls-key "$K/proxy.key" "${up[@]}" --upstream-ca "$K/ca.pem" \
            --upstream-name localhost --log-level warn "${QRESYNCD_ARGS[@]}" \
            >"$PROXY_LOG" 2>&1 </dev/null &
        PID[tls]=$!
        local i fd
        for ((i = 0; i < 100; i++)); do
            kill -0 "${PID[tls]}" 2>/dev/null || break
            if { exec {fd}<>"/dev/tcp/127.0.0.1/${PORT[tls]}"; } 2>/dev/null; then
                exec {fd}>&- # listening (this probe session just ends)
                return 0
            fi
            sleep 0.05
        done
        tail -20 "$PROXY_LOG" >&2
        fail "qresyncd (TLS) did not start (log $PROXY_LOG)"
    }
    stop_tls_proxy() { stop_path tls; }
    QR_CLEANUP_HOOKS="stop_tls_proxy $QR_CLEANUP_HOOKS"
    tls_fetch() { # tls_fetch PORT NAME
        local out
        out=$("${TLSB[@]}" fetch $H "$1" "$2" "$K/ca.pem" "$U" "$P" INBOX "$MSGS" "$WANT_BYTES" \
            2>"$OUT/tool.err") || {
            cat "$OUT/tool.err" >&2
            fail "tlsbench fetch $1 $2"
        }
        printf '%s\n' "$out"
    }
    start_tls_proxy implicit
    say "qresyncd (TLS both sides) on 127.0.0.1:${PORT[tls]} (pid ${PID[tls]})"
    W=$(tls_fetch "$DOVECOT_TLS_PORT" localhost)
    TLS_HASH=$(field "$W" hash)
    say "  tls fetch warm-up: ${W#fetch }"
    declare -A TMBS=()
    TCPU=0
    for ((i = 1; i <= FETCH_RUNS; i++)); do
        for p in direct proxy; do
            if [ "$p" = direct ]; then
                line=$(tls_fetch "$DOVECOT_TLS_PORT" localhost)
            else
                c0=$(cpu_ns "${PID[tls]}")
                line=$(tls_fetch "${PORT[tls]}" imap.proxy.test)
                TCPU=$((TCPU + $(cpu_ns "${PID[tls]}") - c0))
            fi
            [ "$(field "$line" hash)" = "$TLS_HASH" ] ||
                fail "tls fetch $p run $i returned other bytes: $line"
            kill -0 "${PID[tls]}" 2>/dev/null || fail "qresyncd (TLS) exited; log $PROXY_LOG"
            TMBS[$p]="${TMBS[$p]:-} $(field "$line" mb_s)"
            say "  tls fetch $(printf '%-6s' "$p") run $i: ${line#fetch }"
        done
    done
    # shellcheck disable=SC2086 # lists of figures
    tls_d=$(median ${TMBS[direct]})
    # shellcheck disable=SC2086
    tls_p=$(median ${TMBS[proxy]})
    tls_ratio=$(calc %.3f "$tls_p / $tls_d")
    tls_cpu=$(calc %.1f "$TCPU / 1e6 / ($FETCH_RUNS * $WANT_BYTES / 1e8)")
    tls_v=$(verdict "$tls_ratio >= 0.90")
    stop_path tls
    # Idle sessions: a fresh qresyncd each, TLS on both sides, then client only.
    declare -A TIDLE=()
    for mode in implicit none; do
        start_tls_proxy "$mode"
        line=$("${TLSB[@]}" idle $H "${PORT[tls]}" imap.proxy.test "$K/ca.pem" "$U" "$P" \
            "$IDLE_N" "$IDLE_HOLD" "${PID[tls]}" 2>"$OUT/tool.err") || {
            cat "$OUT/tool.err" >&2
            fail "tlsbench idle ($mode)"
        }
        TIDLE[$mode]=$line
        say "  tls idle (upstream $mode): ${line#idle }"
        stop_path tls
    done
    tls_idle2=$(field "${TIDLE[implicit]}" per_session_kib)
    tls_idle1=$(field "${TIDLE[none]}" per_session_kib)
    say "tls fetch direct $tls_d MB/s proxy $tls_p MB/s ratio $tls_ratio (target >= 0.90: $tls_v; median of $FETCH_RUNS; qresyncd CPU $tls_cpu ms per 100 MB)"
    say "tls idle rss $tls_idle2 KiB/session with TLS on both sides, $tls_idle1 KiB/session with TLS to the client only ($IDLE_N sessions)"
    {
        echo
        echo "TLS on both sides (issue 4): client \`tests/bench/tlsbench.c\` (OpenSSL, certificate verified); direct = Dovecot's implicit-TLS port; through qresyncd = listen-tls, upstream-tls implicit, both certificates verified."
        echo
        echo "| measurement | direct TLS (Dovecot) | through qresyncd, TLS both sides | qresyncd's cost | target |"
        echo "| --- | ---: | ---: | ---: | --- |"
        echo "| \`UID FETCH 1:* BODY.PEEK[]\`, $MSGS messages, $mb MB (median of $FETCH_RUNS) | $tls_d MB/s | $tls_p MB/s | ratio $tls_ratio, qresyncd CPU $tls_cpu ms per 100 MB | ≥ 0.90 ($tls_v) |"
        echo "| RSS per logged-in idle session, $IDLE_N sessions: TLS both sides / TLS to the client only | | $tls_idle2 KiB / $tls_idle1 KiB | | (reported; plain target 16 KiB) |"
    } >>"$OUT/results.md"
fi

# ------------------------------------------------------------ condstore ----
# Issue 5: CONDSTORE resync of a 100 000-message mailbox, through qresyncd
# against the legacy full flag fetch and Dovecot's native CONDSTORE. Its own
# servers, "bench: condstore ..." lines and build/bench/condstore.md; see
# tests/bench/condstore.sh. BENCH_CONDSTORE=0 leaves it out.
if [ "${BENCH_CONDSTORE:-1}" = 1 ]; then
    tests/bench/condstore.sh || fail "condstore bench (tests/bench/condstore.sh)"
fi

# -------------------------------------------------------------- qresync ----
# Issue 6: QRESYNC resync of a 100 000-message mailbox on Courier (1% of the
# flags changed, 0.1% expunged out of band), through qresyncd against the
# legacy full resync, Dovecot's imapc backend in front of the same Courier
# and Dovecot's native QRESYNC. Its own servers, "bench: qresync ..." lines
# and build/bench/qresync.md; see tests/bench/qresync.sh. BENCH_QRESYNC=0
# leaves it out.
if [ "${BENCH_QRESYNC:-1}" = 1 ]; then
    tests/bench/qresync.sh || fail "qresync bench (tests/bench/qresync.sh)"
fi

# ----------------------------------------------------------------- push ----
# Issue 7: latency from an out-of-band flag change on a legacy upstream
# (Courier) to the FETCH at a client idling through qresyncd (poll-interval
# 2 s and 10 s, and the pub/sub path between processes), and the internal
# upstream commands per minute of 100 idle CONDSTORE sessions. Its own
# servers, "bench: push ..." lines and build/bench/push.md; see
# tests/bench/push.sh. BENCH_PUSH=0 leaves it out.
if [ "${BENCH_PUSH:-1}" = 1 ]; then
    tests/bench/push.sh || fail "push bench (tests/bench/push.sh)"
fi
