#!/usr/bin/env bash
# Builds fuzz_tok with clang's libFuzzer, ASan and UBSan into build/fuzz/
# and runs it for $1 seconds (default 60) on its corpus. New inputs go to
# build/fuzz/corpus/tok (tests/fuzz/corpus/tok is only read; copy a finding
# there by hand once it is fixed), crash inputs to build/fuzz/.
# Needs clang and its libFuzzer runtime (Debian: libclang-rt-14-dev, which
# clang-14 usually brings along).
set -euo pipefail
cd "$(dirname "$0")/../.."

secs=${1:-60}
cc=${FUZZ_CC:-clang}
out=build/fuzz
warn=(-std=c11 -D_POSIX_C_SOURCE=200809L -Wall -Wextra -Werror -Wshadow -Wstrict-prototypes
      -Wmissing-prototypes -Wformat=2 -Wundef -Wvla)
san=(-O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)

mkdir -p "$out/corpus/tok"
"$cc" "${warn[@]}" "${san[@]}" -I. -o "$out/fuzz_tok" tests/fuzz/fuzz_tok.c common/tok.c
echo "built $out/fuzz_tok; fuzzing for ${secs}s"
"$out/fuzz_tok" -max_total_time="$secs" -max_len=4096 -timeout=10 -print_final_stats=1 \
    -dict=tests/fuzz/tok.dict -artifact_prefix="$out/" "$out/corpus/tok" tests/fuzz/corpus/tok
