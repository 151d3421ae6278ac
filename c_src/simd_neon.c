/* aarch64 path for any ARMv8-A core (AdvSIMD is part of the base architecture): compiled with
 * -march=armv8-a.  f16 weights are widened with FCVTL (vcvt_f32_f16: a base ARMv8 conversion,
 * no FEAT_FP16 needed), bf16 by a 16-bit left shift; accumulation in float32 with FMLA.
 * The integer formats multiply int8 by int8 into int16 (SMULL/SMLAL, two products per lane:
 * |sum| <= 2 * 128 * 127 < 2^15) and widen pairwise into int32 (SADALP): exact, as the scalar
 * reference.  simd_dotprod.c replaces the integer kernels where the CPU has SDOT. */
#include <arm_neon.h>

#include "internal.h"

#define FLOAT_DOT(NAME, TYPE, LOAD_LO, LOAD_HI, WIDEN)                                            \
    static inline float NAME##_row(const d2m_matrix *w, int row, const d2m_act *x) {            \
        const int n = w->cols;                                                                  \
        const TYPE *a = (const TYPE *)w->data + (size_t)row * (size_t)n;                        \
        const float *b = x->x;                                                                  \
        float32x4_t s0 = vdupq_n_f32(0.0f), s1 = vdupq_n_f32(0.0f);                             \
        float32x4_t s2 = vdupq_n_f32(0.0f), s3 = vdupq_n_f32(0.0f);                             \
        int i = 0;                                                                              \
        for (; i + 16 <= n; i += 16) {                                                          \
            s0 = vfmaq_f32(s0, LOAD_LO(a + i), vld1q_f32(b + i));                               \
            s1 = vfmaq_f32(s1, LOAD_HI(a + i), vld1q_f32(b + i + 4));                           \
            s2 = vfmaq_f32(s2, LOAD_LO(a + i + 8), vld1q_f32(b + i + 8));                       \
            s3 = vfmaq_f32(s3, LOAD_HI(a + i + 8), vld1q_f32(b + i + 12));                      \
        }                                                                                       \
        for (; i + 8 <= n; i += 8) {                                                            \
            s0 = vfmaq_f32(s0, LOAD_LO(a + i), vld1q_f32(b + i));                               \
            s1 = vfmaq_f32(s1, LOAD_HI(a + i), vld1q_f32(b + i + 4));                           \
        }                                                                                       \
        float sum = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));                \
        for (; i < n; i++)                                                                      \
            sum += WIDEN(a[i]) * b[i];                                                          \
        return sum;                                                                             \
    }                                                                                           \
    D2M_RANGE(NAME, NAME##_row)

/* columns [i, i+4) and [i+4, i+8) as float32x4 */
#define F32_LO(p) vld1q_f32(p)
#define F32_HI(p) vld1q_f32((p) + 4)
#define F16_LO(p) vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)))
#define F16_HI(p) vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((p) + 4)))
#define BF16_LO(p) vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16))
#define BF16_HI(p) vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((p) + 4), 16))
#define WIDEN_F32(v) (v)

FLOAT_DOT(d2m_dot_f32_neon, float, F32_LO, F32_HI, WIDEN_F32)
FLOAT_DOT(d2m_dot_f16_neon, uint16_t, F16_LO, F16_HI, d2m_f16_to_f32)
FLOAT_DOT(d2m_dot_bf16_neon, uint16_t, BF16_LO, BF16_HI, d2m_bf16_to_f32)

/* exact int32x4 partial sums of 32 int8 products: w0, x0 columns 0..15; w1, x1 columns 16..31 */
static inline int32x4_t dot32(int8x16_t w0, int8x16_t w1, int8x16_t x0, int8x16_t x1) {
    int16x8_t p0 = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
    p0 = vmlal_high_s8(p0, w0, x0);
    int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
    p1 = vmlal_high_s8(p1, w1, x1);
    return vpadalq_s16(vpaddlq_s16(p0), p1);
}

#define D2M_Q_INT_DOT dot32
#define D2M_Q_SUFFIX(name) name##_neon
#include "simd_arm_q.h"

uint64_t d2m_stream_neon(const uint64_t *p, size_t n) {
    uint64x2_t s0 = vdupq_n_u64(0), s1 = vdupq_n_u64(0), s2 = vdupq_n_u64(0), s3 = vdupq_n_u64(0);
    for (size_t i = 0; i < n; i += 8) {
        s0 = vaddq_u64(s0, vld1q_u64(p + i));
        s1 = vaddq_u64(s1, vld1q_u64(p + i + 2));
        s2 = vaddq_u64(s2, vld1q_u64(p + i + 4));
        s3 = vaddq_u64(s3, vld1q_u64(p + i + 6));
    }
    const uint64x2_t s = vaddq_u64(vaddq_u64(s0, s1), vaddq_u64(s2, s3));
    return vgetq_lane_u64(s, 0) + vgetq_lane_u64(s, 1);
}
