#!/usr/bin/env bash
# State store integration tests: real redis-server processes on private
# loopback ports (standalone over TCP and a unix socket, AUTH and ACL,
# Sentinel, Cluster), started and stopped by PID by the test programs.
#
#   tests/integration/state/run.sh [release|asan] [TEST...]
#
# Builds build/<variant>/libqr.a through the Makefile (or takes QR_LIBQR),
# then the programs in this directory with the same flags, into
# build/<variant>/tests/state/. Ends with one line "N passed, M failed";
# exits 1 when M > 0.
set -uo pipefail
cd "$(dirname "$0")/../../.."

VARIANT=${1:-release}
shift || true
BUILD=build/$VARIANT
OUT=$BUILD/tests/state
WARN="-std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes
      -Wmissing-prototypes -Wformat=2 -Wundef -Wvla"
if [ "$VARIANT" = asan ]; then
    OPT="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
else
    OPT="-O2 -g -fstack-protector-strong -D_FORTIFY_SOURCE=2"
fi
LIBS="-luv -lhiredis -linih -lmbedtls -lmbedx509 -lmbedcrypto -lm"

fail_build() {
    echo "state integration: build failed: $*" >&2
    echo "0 passed, 1 failed"
    exit 1
}

LIBQR=${QR_LIBQR:-$BUILD/libqr.a}
if [ -z "${QR_LIBQR:-}" ]; then
    make -s VARIANT="$VARIANT" "$LIBQR" >/dev/null || fail_build "libqr.a"
fi
mkdir -p "$OUT"
IT=tests/integration/state
# shellcheck disable=SC2086
for prog in store_it lease_it deploy_it; do
    cc -I. $WARN $OPT -D_DEFAULT_SOURCE -o "$OUT/$prog" "$IT/$prog.c" "$IT/it.c" "$IT/store_it_lib.c" \
        "$IT/gai_hook.c" "$LIBQR" $LIBS ||
        fail_build "$prog"
done

T=$(mktemp -d /tmp/qr-state-it.XXXXXX)
# Servers are children of the test programs, stopped by PID there; this
# trap stops any a crashed program left, by the PIDs in their pidfiles.
cleanup() {
    for f in "$T"/*/*/redis.pid; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
    done
    [ -n "${QR_KEEP_TMP:-}" ] || rm -rf "$T"
}
trap cleanup EXIT

passed=0
failed=0
# run NAME CMD...: counts the program's last "N passed, M failed" line.
run() {
    local name=$1 line p f
    shift
    "$@" 2>&1 | tee "$T/$name.log"
    line=$(grep -E '^[0-9]+ passed, [0-9]+ failed$' "$T/$name.log" | tail -n 1)
    if [ -z "$line" ]; then
        echo "FAIL $name: no summary (crashed?)"
        failed=$((failed + 1))
        return
    fi
    p=${line%% passed*}
    f=${line#*, }
    f=${f%% failed}
    passed=$((passed + p))
    failed=$((failed + f))
}

mkdir -p "$T/tcp" "$T/unix" "$T/auth" "$T/acl" "$T/unixauth"
if [ $# -gt 0 ]; then
    QR_IT_MODE=tcp run tcp "$OUT/store_it" "$T/tcp" "$@"
else
    QR_IT_MODE=tcp run tcp "$OUT/store_it" "$T/tcp"
    QR_IT_MODE=unix run unix "$OUT/store_it" "$T/unix" basic inv1_flushall inv6_restart_reconnect
    QR_IT_MODE=auth run auth "$OUT/store_it" "$T/auth" basic pubsub inv6_restart_reconnect \
        auth_wrong_password
    QR_IT_MODE=acl run acl "$OUT/store_it" "$T/acl" basic pubsub auth_wrong_password dns_name_off_loop
    QR_IT_MODE=unixauth run unixauth "$OUT/store_it" "$T/unixauth" basic pubsub
    mkdir -p "$T/lease" "$T/sentinel" "$T/cluster"
    run lease "$OUT/lease_it" "$T/lease"
    run sentinel "$OUT/deploy_it" "$T/sentinel" sentinel
    run cluster "$OUT/deploy_it" "$T/cluster" cluster
fi

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
