#!/usr/bin/env bash
# The whole test suite: installs dependencies, builds (plain and ASan+UBSan),
# runs every test through ctest, then each libFuzzer target for a short while
# over a copy of its corpus. Usage: scripts/test.sh [--quick]
#   --quick   skip the sanitizer build and the fuzz run
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
jobs=$(nproc)
start=$(date +%s)

cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$jobs"
echo "build: $(( $(date +%s) - start )) s"
(cd build && ctest --output-on-failure -j"$jobs")

if [ "${1:-}" != "--quick" ]; then
  cmake -S . -B build-asan -DKR_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug >/dev/null
  cmake --build build-asan -j"$jobs"
  # No leak suppressions: keyraftd joins libuv's threads before exit, so
  # OpenSSL frees every thread's DRBG (a fast unwinder could not tell those
  # apart from a real leak, and the slow one made this pass 3x longer).
  (cd build-asan && ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
     UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
     ctest --output-on-failure -j"$jobs")
fi
if [ "${1:-}" != "--quick" ]; then
  CC=clang cmake -S . -B build-fuzz -DKR_FUZZ=ON -DKR_WERROR=OFF -DCMAKE_BUILD_TYPE=Debug >/dev/null
  cmake --build build-fuzz -j"$jobs" --target fuzz_frame fuzz_command fuzz_request fuzz_response
  for t in fuzz_frame fuzz_command fuzz_request fuzz_response; do
    corpus=$(mktemp -d)
    cp tests/fuzz/corpus/$t/* "$corpus"/
    # A crash, leak or sanitizer report fails the suite.
    rc=0
    ASAN_OPTIONS=detect_leaks=1 build-fuzz/$t -max_total_time="${KR_FUZZ_SECONDS:-20}" \
      -print_final_stats=1 "$corpus" > build-fuzz/$t.log 2>&1 || rc=$?
    rm -rf "$corpus"
    if [ "$rc" -ne 0 ]; then
      tail -40 build-fuzz/$t.log
      echo "fuzz: $t failed ($rc)"
      exit 1
    fi
    echo "fuzz: $t ok, $(grep -E '^stat::number_of_executed_units' build-fuzz/$t.log | awk '{print $2}') inputs"
  done
fi
echo "tests: $(( $(date +%s) - start )) s in all"
