/* float32 weights: the scalar reference row kernel (every other path is tested against it). */
#include "internal.h"

/* dot(W[row], x), summed left to right in float32 (no fused multiply-add: the build uses
 * -ffp-contract=off, so this is the same sum on every machine). */
static float row_dot(const d2m_matrix *w, int row, const d2m_act *x) {
    const float *wr = (const float *)w->data + (size_t)row * (size_t)w->cols;
    float sum = 0.0f;
    for (int c = 0; c < w->cols; c++)
        sum += wr[c] * x->x[c];
    return sum;
}

void d2m_dot_f32_scalar(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x) {
    for (int r = r0; r < r1; r++)
        out[r - r0] = row_dot(w, r, x);
}
