#!/usr/bin/env bash
# The emulated CUDA tests once more, against the ASan + UBSan build of the CUDA emulator
# (torchfast/_emulator_sanitized, built with TORCHFAST_EMULATOR=1 TORCHFAST_EMULATOR_SANITIZERS=1).
# Python and torch are not instrumented, so the sanitizer runtimes are preloaded; any report fails
# the run. Extra arguments go to pytest (e.g. -k attention).
set -euo pipefail
cd "$(dirname "$0")/.."

CXX="${CXX:-g++}"
ASAN_LIB="$("$CXX" -print-file-name=libasan.so)"
UBSAN_LIB="$("$CXX" -print-file-name=libubsan.so)"
for lib in "$ASAN_LIB" "$UBSAN_LIB"; do
  [ -e "$lib" ] || { echo "emulator_sanitized_tests: $lib not found (install the compiler's sanitizer runtimes)" >&2; exit 1; }
done

# detect_leaks=0: CPython and torch keep allocations alive until exit by design.
# alloc_dealloc_mismatch=0: uninstrumented libraries may pair allocators in ways ASan cannot see.
export ASAN_OPTIONS="detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:halt_on_error=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export TORCHFAST_EMULATOR_LIBRARY=sanitized TORCHFAST_REQUIRE_EMULATOR=1
LD_PRELOAD="$ASAN_LIB $UBSAN_LIB${LD_PRELOAD:+ $LD_PRELOAD}" \
  pytest -q -p no:cacheprovider tests/test_emulator.py tests/test_emulated_*.py "$@"
