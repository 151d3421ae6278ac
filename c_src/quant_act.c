/* Activation quantisation for the integer kernels (spec/kernels.md §3), shared by every path so
 * that all of them multiply the same integers.
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

int d2m_act_blocks(int cols) {
    return (cols + D2M_QBLOCK - 1) / D2M_QBLOCK;
}

void d2m_quantize_act_row(int8_t *xq, float *xd, const float *x, int cols) {
    const int nblk = d2m_act_blocks(cols);
    for (int b = 0; b < nblk; b++) {
        const int lo = b * D2M_QBLOCK;
        const int n = cols - lo < D2M_QBLOCK ? cols - lo : D2M_QBLOCK;
        int8_t *q = xq + lo;
        float amax = 0.0f;
        int finite = 1;
        for (int j = 0; j < n; j++) {
            const float a = fabsf(x[lo + j]);
            if (!(a <= FLT_MAX))
                finite = 0;  /* inf or NaN */
            else if (a > amax)
                amax = a;
        }
        memset(q, 0, D2M_QBLOCK);
        if (!finite) {
            xd[b] = NAN;
            continue;
        }
        const float inv = 127.0f / amax;  /* inf when amax == 0 or tiny */
        if (!(inv <= FLT_MAX)) {
            xd[b] = 0.0f;
            continue;
        }
        xd[b] = amax / 127.0f;
        for (int j = 0; j < n; j++) {
            float v = nearbyintf(x[lo + j] * inv);
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            q[j] = (int8_t)v;
        }
    }
}

void d2m_act_pairs8(int16_t *pairs8, const int8_t *xq, int cols) {
    const int n = d2m_act_blocks(cols) * D2M_QBLOCK / 2;
    for (int i = 0; i < n; i++)
        pairs8[i] = (int16_t)(8 * ((int)xq[2 * i] + (int)xq[2 * i + 1]));
}

int d2m_quantize_act(int8_t *xq, float *xd, const float *x, int cols) {
    if (!xq || !xd || !x)
        return D2M_ERR_NULL;
    if (cols <= 0 || cols > D2M_MAX_DIM)
        return D2M_ERR_SIZE;
    d2m_quantize_act_row(xq, xd, x, cols);
    return D2M_OK;
}
