/* float16 weights: the scalar reference row kernel.  Each weight is widened exactly to float32
 * (d2m_f16_to_f32) and accumulated in float32. */
#include "internal.h"

static float row_dot(const d2m_matrix *w, int row, const d2m_act *x) {
    const uint16_t *wr = (const uint16_t *)w->data + (size_t)row * (size_t)w->cols;
    float sum = 0.0f;
    for (int c = 0; c < w->cols; c++)
        sum += d2m_f16_to_f32(wr[c]) * x->x[c];
    return sum;
}

void d2m_dot_f16_scalar(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x) {
    for (int r = r0; r < r1; r++)
        out[r - r0] = row_dot(w, r, x);
}
