/* Q8 weights (int8, one float32 scale per output row; spec/quant.md §2): the scalar reference.
 *
 * The activation is quantised per 32-element block (spec/kernels.md §3): x ~ d_b * xq.  Then
 *     dot(W[r], x) = s_r * sum_b d_b * isum_b,   isum_b = sum_{c in b} q[r][c] * xq[c]
 * isum_b is an exact int32 (|isum_b| <= 32 * 128 * 127), the same on every path; only the float
 * sum over blocks may be ordered differently by the SIMD paths. */
#include "internal.h"

static float row_dot(const d2m_matrix *w, int row, const d2m_act *x) {
    const int cols = w->cols;
    const int8_t *q = (const int8_t *)w->data + (size_t)row * (size_t)cols;
    const int nblk = d2m_act_blocks(cols);
    float acc = 0.0f;
    for (int b = 0; b < nblk; b++) {
        const int lo = b * D2M_QBLOCK;
        const int hi = lo + D2M_QBLOCK < cols ? lo + D2M_QBLOCK : cols;
        acc += (float)d2m_isum_i8(q + lo, x->q + lo, hi - lo) * x->d[b];
    }
    return acc * ((const float *)w->scales)[row];
}

void d2m_dot_q8_scalar(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x) {
    for (int r = r0; r < r1; r++)
        out[r - r0] = row_dot(w, r, x);
}
