/* aarch64 path for ARMv8.2-A cores with the dot-product extension (Jetson Orin's Cortex-A78AE):
 * compiled with -march=armv8.2-a+dotprod+fp16, called only when getauxval(AT_HWCAP) shows
 * ASIMDDP, FPHP and ASIMDHP.  Only the integer formats differ from simd_neon.c: SDOT
 * (vdotq_s32) sums four int8 products per int32 lane, exactly. */
#include <arm_neon.h>

#include "internal.h"

static inline int32x4_t dot32(int8x16_t w0, int8x16_t w1, int8x16_t x0, int8x16_t x1) {
    return vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, x0), w1, x1);
}

#define D2M_Q_INT_DOT dot32
#define D2M_Q_SUFFIX(name) name##_dotprod
#include "simd_arm_q.h"
