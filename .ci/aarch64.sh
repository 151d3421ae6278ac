#!/usr/bin/env bash
# Emulated aarch64 lane: the C kernels built by the x86 cross-compiler and tested under qemu-user
# on two CPU models:
#   cortex-a76  ARMv8.2-A with dotprod and fp16, like Jetson Orin's Cortex-A78AE: dispatch must pick
#               neon_dotprod;
#   cortex-a53  ARMv8.0-A without them: dispatch must pick neon, and never execute an SDOT (which
#               dies with SIGILL there: the canary below proves qemu enforces that).
# Steps: Debian's cross gcc + qemu-user-static; an arm64 CPython from Debian's own packages
# (debootstrap --download-only, unpacked with dpkg -x); a venv with numpy, cffi, pytest,
# hypothesis from PyPI; the extension built by setup.py under the emulated Python with
# CC=aarch64-linux-gnu-gcc; then the C driver and the Python kernel tests on each CPU model.
# Emulated timings mean nothing; the tests are kept small (D2M_TEST_EXAMPLES).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
export DEBIAN_FRONTEND=noninteractive

need=()
for tool in aarch64-linux-gnu-gcc qemu-aarch64-static debootstrap; do
    command -v "$tool" >/dev/null || need+=(1)
done
if [ ${#need[@]} -gt 0 ] || [ ! -e /usr/aarch64-linux-gnu/lib/libc.so.6 ]; then
    apt-get update -qq
    apt-get install -y -qq gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static debootstrap >/dev/null
fi

# The arm64 root (Debian's python3.11) is cached between runs on this machine.
suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
cache=${D2M_ARM64_CACHE:-/var/cache/d2m_ref-arm64-$suite}
root=$cache/root
mirror=$(sed -n 's/^URIs: *\([^ ]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
if [ ! -x "$root/usr/bin/python3.11" ] || [ ! -e "$root/usr/include/python3.11/Python.h" ]; then
    rm -rf "$cache"
    mkdir -p "$cache"
    debootstrap --arch=arm64 --download-only --variant=minbase \
        --include=python3,python3-venv,libpython3.11-dev "$suite" "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { tail -20 "$cache/debootstrap.log"; exit 1; }
    for deb in "$root"/var/cache/apt/archives/*.deb; do dpkg -x "$deb" "$root"; done
fi
export QEMU_LD_PREFIX=$root
emulate() { qemu-aarch64-static "$@"; }

venv=$cache/venv
if ! QEMU_CPU=cortex-a76 emulate "$venv/bin/python3.11" -c "import numpy, cffi, pytest, hypothesis, setuptools" 2>/dev/null; then
    rm -rf "$venv"
    QEMU_CPU=cortex-a76 emulate "$root/usr/bin/python3.11" -m venv --without-pip --copies "$venv"
    pip_wheel=$(ls "$root"/usr/share/python-wheels/pip-*.whl | head -1)
    QEMU_CPU=cortex-a76 emulate "$venv/bin/python3.11" "$pip_wheel/pip" install -q --disable-pip-version-check \
        "numpy>=1.26" "cffi>=1.15" pytest hypothesis "setuptools>=69" >"$cache/pip.log" 2>&1 \
        || { tail -20 "$cache/pip.log"; exit 1; }
fi
py() { emulate "$venv/bin/python3.11" "$@"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tree=$work/tree
mkdir -p "$tree"
cp -r setup.py pyproject.toml README.md c_src d2m_ref tests "$tree/"
rm -f "$tree"/d2m_ref/_d2m_kernels*.so

echo "== building the extension with aarch64-linux-gnu-gcc under the emulated Python"
(cd "$tree" && QEMU_CPU=cortex-a76 CC=aarch64-linux-gnu-gcc LDSHARED="aarch64-linux-gnu-gcc -shared" \
    CFLAGS="-I$root/usr/include/python3.11 -I$root/usr/include" \
    emulate "$venv/bin/python3.11" setup.py -q build_ext --inplace >"$work/build.log" 2>&1) \
    || { tail -30 "$work/build.log"; exit 1; }
if grep -q "C kernels were not built" "$work/build.log"; then tail -30 "$work/build.log"; exit 1; fi

echo "== C driver and the dotprod canary, cross-compiled"
CFLAGS_ARM="-O2 -std=c11 -ffp-contract=off -fno-fast-math -pthread -Wall -Wextra -Werror -static"
aarch64-linux-gnu-gcc $CFLAGS_ARM -march=armv8-a -c c_src/simd_neon.c -o "$work/neon.o"
aarch64-linux-gnu-gcc $CFLAGS_ARM -march=armv8.2-a+dotprod+fp16 -c c_src/simd_dotprod.c -o "$work/dotprod.o"
aarch64-linux-gnu-gcc $CFLAGS_ARM -DD2M_HAVE_NEON -DD2M_HAVE_DOTPROD -Ic_src \
    c_src/gemv_f32.c c_src/gemv_f16.c c_src/gemv_bf16.c c_src/gemv_q8.c c_src/gemv_q4.c c_src/quant_act.c \
    c_src/gemv.c c_src/expert.c c_src/threads.c c_src/stream.c c_src/dispatch.c tests/c/test_kernels.c \
    "$work/neon.o" "$work/dotprod.o" -lm -o "$work/test_kernels"
cat >"$work/canary.c" <<'C'
#include <arm_neon.h>
#include <stdio.h>
int main(void) {
    volatile int8_t a = 3;
    int32x4_t s = vdotq_s32(vdupq_n_s32(0), vdupq_n_s8(a), vdupq_n_s8(a));
    printf("%d\n", vgetq_lane_s32(s, 0));
    return 0;
}
C
aarch64-linux-gnu-gcc -O1 -static -march=armv8.2-a+dotprod "$work/canary.c" -o "$work/canary"

status=0
for cpu in cortex-a76 cortex-a53; do
    expect=$([ "$cpu" = cortex-a76 ] && echo neon_dotprod || echo neon)
    echo "== QEMU_CPU=$cpu (dispatch must pick $expect)"
    canary=0
    QEMU_CPU=$cpu emulate "$work/canary" >/dev/null 2>&1 || canary=$?
    if [ "$cpu" = cortex-a76 ] && [ "$canary" != 0 ]; then echo "canary: SDOT failed on $cpu ($canary)"; status=1; fi
    if [ "$cpu" = cortex-a53 ] && [ "$canary" != 132 ]; then
        echo "canary: SDOT on $cpu exited $canary, expected SIGILL (132)"; status=1
    else
        echo "canary: SDOT $([ "$canary" = 132 ] && echo "dies with SIGILL" || echo runs) on $cpu"
    fi
    QEMU_CPU=$cpu emulate "$work/test_kernels" "${D2M_ARM_C_CASES:-150}" | tail -4 || status=1
    (cd "$tree" && QEMU_CPU=$cpu D2M_EXPECT_PATH=$expect D2M_TEST_EXAMPLES=${D2M_ARM_EXAMPLES:-30} \
        PYTHONPATH="$tree" py -m pytest -q -p no:cacheprovider tests/test_kernels.py) || status=1
done
exit $status
