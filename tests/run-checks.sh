#!/usr/bin/env bash
# Runs every test of `make check` after the Makefile built both variants:
# format check, unit tests (release and ASan+UBSan), fuzz corpus replay,
# integration suites against real servers. Any sanitizer log fails the run,
# since criterion alone lets a leaking test pass (STYLE.md §9).
# Ends with one line "checks: N passed, M failed" counting individual tests.
set -uo pipefail
cd "$(dirname "$0")/.."

T=$(mktemp -d /tmp/qresyncd-check.XXXXXX)
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/san"
SAN_ENV=(ASAN_OPTIONS="log_path=$T/san/asan:detect_leaks=1:abort_on_error=1"
         UBSAN_OPTIONS="log_path=$T/san/ubsan:print_stacktrace=1:halt_on_error=1")

passed=0
failed=0
failures=()

# count NAME PASSED FAILED
count() {
    passed=$((passed + $2))
    failed=$((failed + $3))
    if [ "$3" -gt 0 ]; then
        failures+=("$1")
    fi
}

# Runs a criterion binary; counts its Synthesis line, or one failure when the
# binary died without one.
run_criterion() {
    local name=$1 bin=$2 out
    out="$T/$(echo "$name" | tr '/ ' '__').log"
    env "${SAN_ENV[@]}" "$bin" --jobs 2 >"$out" 2>&1
    local rc=$?
    cat "$out"
    local line
    line=$(grep -E 'Synthesis: Tested: [0-9]+' "$out" | tail -n 1)
    if [ -z "$line" ]; then
        count "$name" 0 1
        return
    fi
    local p f c
    p=$(echo "$line" | sed -E 's/.*Passing: ([0-9]+).*/\1/')
    f=$(echo "$line" | sed -E 's/.*Failing: ([0-9]+).*/\1/')
    c=$(echo "$line" | sed -E 's/.*Crashing: ([0-9]+).*/\1/')
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ] && [ "$c" -eq 0 ]; then
        f=1
    fi
    count "$name" "$p" $((f + c))
}

# Runs a script or program whose last "N passed, M failed" line is counted.
run_suite() {
    local name=$1
    shift
    local out
    out="$T/$(echo "$name" | tr '/ ' '__').log"
    env "${SAN_ENV[@]}" "$@" 2>&1 | tee "$out"
    local rc=${PIPESTATUS[0]}
    local line
    line=$(grep -E '(^|: )[0-9]+ passed, [0-9]+ failed' "$out" | tail -n 1)
    if [ -z "$line" ]; then
        count "$name" 0 1
        return
    fi
    local p f
    p=$(echo "$line" | sed -E 's/.*\b([0-9]+) passed.*/\1/')
    f=$(echo "$line" | sed -E 's/.* ([0-9]+) failed.*/\1/')
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then
        f=1
    fi
    count "$name" "$p" "$f"
}

echo "== format"
if make -s format-check; then
    count format 1 0
else
    count format 0 1
fi

for v in release asan; do
    for bin in build/$v/tests/test_*; do
        [ -x "$bin" ] || continue
        echo "== unit $v $(basename "$bin")"
        run_criterion "unit/$v/$(basename "$bin")" "$bin"
    done
    for bin in build/$v/tests/fuzz_*; do
        [ -x "$bin" ] || continue
        target=$(basename "$bin")
        target=${target#fuzz_}
        echo "== fuzz replay $v $target"
        if env "${SAN_ENV[@]}" "$bin" "tests/fuzz/corpus/$target"; then
            count "fuzz/$v/$target" 1 0
        else
            count "fuzz/$v/$target" 0 1
        fi
    done
done

# Integration suites run the ASan build of qresyncd, so a leak or undefined
# behaviour in a real session fails the check too.
for suite in tests/integration/run.sh tests/integration/proxy.sh tests/integration/condstore.sh \
    tests/integration/tls.sh tests/integration/differential.sh tests/integration/imapflow.sh \
    tests/integration/mutt_qresync.sh; do
    [ -x "$suite" ] || continue
    echo "== integration $suite"
    run_suite "$suite" env QRESYNCD="$PWD/build/asan/qresyncd" "$suite"
done
# The state store against real Redis servers (standalone, ACL, unix socket,
# Sentinel, Cluster), in the ASan build.
echo "== integration tests/integration/state/run.sh asan"
run_suite state/asan tests/integration/state/run.sh asan

san_logs=$(find "$T/san" -type f 2>/dev/null)
if [ -n "$san_logs" ]; then
    echo "== sanitizer reports"
    for f in $san_logs; do
        echo "--- $f"
        head -n 60 "$f"
    done
    count sanitizers 0 "$(echo "$san_logs" | wc -l)"
fi

if [ ${#failures[@]} -gt 0 ]; then
    echo "failed: ${failures[*]}"
fi
echo "checks: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
