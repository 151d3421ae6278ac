#!/usr/bin/env bash
# The C kernels under AddressSanitizer + UndefinedBehaviorSanitizer and ThreadSanitizer (x86-64 host):
#   1. tests/c/test_kernels.c linked with every c_src unit of this target (scalar, AVX2, AVX-512), built with
#      -fsanitize=address,undefined and no recovery: any out-of-bounds access, misaligned load,
#      overflow or data race-free UB aborts the run;
#   2. the same driver under ThreadSanitizer (the thread pool claims chunks lock-free);
#   3. the Python kernel tests against an extension built with ASan + UBSan (libasan preloaded).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
SAN="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1"
COMMON="-std=c11 -ffp-contract=off -fno-fast-math -pthread -Wall -Wextra -Werror"
arch=$(cc -dumpmachine | cut -d- -f1)
simd=()
defs=()
if [ "$arch" = x86_64 ]; then
    cc $COMMON $SAN -mavx2 -mfma -mf16c -c c_src/simd_avx2.c -o "$out/simd_avx2.o"
    cc $COMMON $SAN -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512vnni \
        -c c_src/simd_avx512.c -o "$out/simd_avx512.o"
    simd=("$out/simd_avx2.o" "$out/simd_avx512.o"); defs=(-DD2M_HAVE_AVX2 -DD2M_HAVE_AVX512)
fi
portable=(c_src/gemv_f32.c c_src/gemv_f16.c c_src/gemv_bf16.c c_src/gemv_q8.c c_src/gemv_q4.c c_src/quant_act.c
          c_src/gemv.c c_src/expert.c c_src/threads.c c_src/stream.c c_src/dispatch.c)
cc $COMMON $SAN "${defs[@]}" -Ic_src "${portable[@]}" tests/c/test_kernels.c "${simd[@]}" -lm -o "$out/test_kernels"
echo "== C driver, ASan + UBSan ($arch)"
ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 "$out/test_kernels" 200

# The same driver under ThreadSanitizer: the pool's lock-free chunk claiming (threads.c).
TSAN="-fsanitize=thread -fno-omit-frame-pointer -g -O1"
mkdir -p "$out/tsan"
tsan_simd=()
for o in "${simd[@]}"; do
    unit=$(basename "$o" .o)
    flags="-mavx2 -mfma -mf16c"
    [ "$unit" = simd_avx512 ] && flags="$flags -mavx512f -mavx512bw -mavx512vl -mavx512vnni"
    cc $COMMON $TSAN $flags -c "c_src/$unit.c" -o "$out/tsan/$unit.o"
    tsan_simd+=("$out/tsan/$unit.o")
done
cc $COMMON $TSAN "${defs[@]}" -Ic_src "${portable[@]}" tests/c/test_kernels.c "${tsan_simd[@]}" -lm -o "$out/tsan/test_kernels"
echo "== C driver, ThreadSanitizer ($arch)"
TSAN_OPTIONS=halt_on_error=1 "$out/tsan/test_kernels" 60

echo "== Python kernel tests on an ASan + UBSan build of the extension"
tree="$out/tree"
mkdir -p "$tree"
cp -r setup.py pyproject.toml README.md c_src d2m_ref tests "$tree/"
rm -f "$tree"/d2m_ref/_d2m_kernels*.so
(cd "$tree" && D2M_EXTRA_CFLAGS="$SAN" D2M_EXTRA_LDFLAGS="-fsanitize=address,undefined" \
    python setup.py -q build_ext --inplace >"$out/build.log" 2>&1) || { cat "$out/build.log"; exit 1; }
ls "$tree"/d2m_ref/_d2m_kernels*.so >/dev/null
cd "$tree"
# An editable install of the CI clone would answer `import d2m_ref`: drop it so the ASan tree is used.
LD_PRELOAD="$(cc -print-file-name=libasan.so)" ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 D2M_TEST_EXAMPLES=40 python - <<'PY'
import sys
sys.meta_path = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path.insert(0, ".")
import d2m_ref, d2m_ref.ckernels as ck
import os
assert d2m_ref.__file__.startswith(os.getcwd()), d2m_ref.__file__
assert ck.available(), ck.IMPORT_ERROR
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_kernels.py"]))
PY
