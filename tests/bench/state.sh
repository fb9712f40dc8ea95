#!/usr/bin/env bash
# State store benchmark (tests/bench/state_bench.c): builds it against
# build/release/libqr.a (or QR_LIBQR) and runs it against a private
# redis-server on loopback, which the program starts and stops by PID.
#   tests/bench/state.sh [N_MESSAGES]
set -uo pipefail
cd "$(dirname "$0")/../.."
BUILD=build/release
LIBQR=${QR_LIBQR:-$BUILD/libqr.a}
if [ -z "${QR_LIBQR:-}" ]; then
    make -s VARIANT=release "$LIBQR" >/dev/null || { echo "state bench: build failed" >&2; exit 1; }
fi
mkdir -p "$BUILD/tests/state"
cc -I. -std=c11 -D_POSIX_C_SOURCE=200809L -D_DEFAULT_SOURCE -Wall -Wextra -Werror -Wshadow \
    -Wstrict-prototypes -Wmissing-prototypes -Wformat=2 -Wundef -Wvla \
    -O2 -g -fstack-protector-strong -D_FORTIFY_SOURCE=2 \
    -o "$BUILD/tests/state/state_bench" tests/bench/state_bench.c \
    tests/integration/state/it.c tests/integration/state/store_it_lib.c "$LIBQR" \
    -luv -lhiredis -linih -lmbedtls -lmbedx509 -lmbedcrypto -lm || exit 1
T=$(mktemp -d /tmp/qr-state-bench.XXXXXX)
trap 'for f in "$T"/*/redis.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null; done; rm -rf "$T"' EXIT
"$BUILD/tests/state/state_bench" "$T" "$@"
