/* Activation quantisation for the integer kernels (spec/kernels.md §3): the portable definition.
 * A path may quantise with its own SIMD code (d2m_path.prepare) only if it writes these bytes
 * exactly, so that every path multiplies the same integers (tests/c/test_kernels.c checks it).
 *
 * Per block of 32 elements (the last may be shorter): amax = max |x|;
 *   - a non-finite element: d = NaN, q = 0 (every dot reading the block becomes NaN);
 *   - amax = 0, or 127/amax overflows float32 (amax < ~3.7e-37): d = 0, q = 0;
 *   - else q = clamp(rint(x * (127/amax)), -127, 127), d = amax / 127, all in float32 and
 *     round-half-even (d2m_ref/quant.py quantize_activations is the NumPy twin, bit for bit).
 * The output is zero-padded to a whole number of blocks. */
#include <float.h>
#include <math.h>

#include "internal.h"

/* rint for |v| <= 127 in the default rounding mode (to nearest, ties to even), what nearbyintf
 * does, inline: adding 1.5·2^23 leaves no fraction bits, so the sum is v rounded to an integer, and
 * subtracting gives it back exactly.  nearbyintf is a libm call on baseline x86-64 (no SSE4.1
 * ROUNDSS) and cost more than a whole GEMV row block of 4864 columns. */
static inline float round_half_even(float v) {
    const float magic = 12582912.0f;  /* 1.5 * 2^23 */
    return (v + magic) - magic;
}

int d2m_act_blocks(int cols) {
    return (cols + D2M_QBLOCK - 1) / D2M_QBLOCK;
}

void d2m_quantize_act_row(int8_t *xq, float *xd, const float *x, int cols) {
    const int nblk = d2m_act_blocks(cols);
    for (int b = 0; b < nblk; b++) {
        const int lo = b * D2M_QBLOCK;
        const int n = cols - lo < D2M_QBLOCK ? cols - lo : D2M_QBLOCK;
        int8_t *q = xq + lo;
        /* The block zero padded, so that every loop runs 32 times without branches and the
         * compiler vectorises them (padding zeros change neither amax nor q).  amax on the bits:
         * for non-negative finite floats the integer order is the float order. */
        uint32_t bits[D2M_QBLOCK];
        if (n == D2M_QBLOCK) {
            memcpy(bits, x + lo, sizeof bits);  /* a constant size: inlined, no call per block */
        } else {
            memset(bits, 0, sizeof bits);
            memcpy(bits, x + lo, (size_t)n * sizeof(float));
        }
        int32_t amax_bits = 0, bad = 0;
        for (int j = 0; j < D2M_QBLOCK; j++) {
            const int32_t a = (int32_t)(bits[j] & 0x7fffffffu);
            bad |= a >= 0x7f800000;  /* inf or NaN */
            amax_bits = a > amax_bits ? a : amax_bits;
        }
        memset(q, 0, D2M_QBLOCK);
        if (bad) {
            xd[b] = NAN;
            continue;
        }
        const float amax = d2m_bits_to_f32((uint32_t)amax_bits);
        const float inv = 127.0f / amax;  /* inf when amax == 0 or tiny */
        if (!(inv <= FLT_MAX)) {
            xd[b] = 0.0f;
            continue;
        }
        xd[b] = amax / 127.0f;
        /* No clamp needed: |x| <= amax, so |x·inv| <= 127·(1 + 2^-24)^2 < 127.5 rounds into
         * [-127, 127]. */
        for (int j = 0; j < D2M_QBLOCK; j++)
            q[j] = (int8_t)(int)round_half_even(d2m_bits_to_f32(bits[j]) * inv);
    }
}

void d2m_act_pairs8(int16_t *pairs8, const int8_t *xq, int cols) {
    const int n = d2m_act_blocks(cols) * D2M_QBLOCK / 2;
    for (int i = 0; i < n; i++)
        pairs8[i] = (int16_t)(8 * ((int)xq[2 * i] + (int)xq[2 * i + 1]));
}

int d2m_act_quads(int cols) {
    return (cols + 4 * D2M_QBLOCK - 1) / (4 * D2M_QBLOCK);
}

void d2m_act_q4_split(int8_t *q4x, int32_t *q4neg, const int8_t *xq, int cols) {
    const int nblk = d2m_act_blocks(cols), nquad = d2m_act_quads(cols);
    memset(q4x, 0, (size_t)nquad * 128);
    memset(q4neg, 0, (size_t)nquad * 16 * sizeof(int32_t));
    for (int b = 0; b < nblk; b++) {
        const int k = b / 4, i = b % 4;
        const int8_t *src = xq + (size_t)b * D2M_QBLOCK;
        memcpy(q4x + (size_t)k * 128 + 16 * i, src, 16);
        memcpy(q4x + (size_t)k * 128 + 64 + 16 * i, src + 16, 16);
        for (int l = 0; l < 4; l++) {
            int32_t sum = 0;
            for (int m = 0; m < 4; m++)
                sum += (int32_t)src[4 * l + m] + (int32_t)src[16 + 4 * l + m];
            q4neg[(size_t)k * 16 + 4 * i + l] = -8 * sum;
        }
    }
}

void d2m_act_prepare_portable(const d2m_act_buf *out, const float *x, int cols, unsigned reads) {
    d2m_quantize_act_row(out->q, out->d, x, cols);
    if (reads & D2M_ACT_PAIRS8)
        d2m_act_pairs8(out->pairs8, out->q, cols);
    if (reads & D2M_ACT_Q4)
        d2m_act_q4_split(out->q4x, out->q4neg, out->q, cols);
}

int d2m_quantize_act(int8_t *xq, float *xd, const float *x, int cols) {
    if (!xq || !xd || !x)
        return D2M_ERR_NULL;
    if (cols <= 0 || cols > D2M_MAX_DIM)
        return D2M_ERR_SIZE;
    d2m_quantize_act_row(xq, xd, x, cols);
    return D2M_OK;
}
