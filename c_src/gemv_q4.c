/* Q4G weights (4-bit, symmetric, one f16 scale per group of 32/64/128 columns; spec/quant.md §3):
 * the scalar reference.
 *
 * A row is ceil(C/32) blocks of 16 bytes; byte j of block b holds column 32b+j in its low nibble
 * and column 32b+j+16 in its high nibble; a nibble n means the integer n - 8.  Columns past C
 * are padding: the quantised activation is zero there, so their nibbles never count.
 *     dot(W[r], x) = sum_b (s_{r,g(b)} * d_b) * isum_b,   isum_b = sum_{c in b} (n_c - 8) * xq[c]
 * with isum_b an exact int32, as for Q8. */
#include "internal.h"

static float row_dot(const d2m_matrix *w, int row, const d2m_act *x) {
    const d2m_q4g_row q4 = d2m_q4g_row_at(w, row);
    const int nblk = q4.nblk, blocks_per_group = 1 << q4.shift;
    const uint8_t *packed = q4.packed;
    const uint16_t *scales = q4.scales;
    float acc = 0.0f;
    for (int b = 0; b < nblk; b++) {
        const uint8_t *block = packed + (size_t)b * 16;
        const int8_t *xq = x->q + (size_t)b * D2M_QBLOCK;
        int32_t isum = 0;
        for (int j = 0; j < 16; j++) {
            isum += ((int32_t)(block[j] & 0x0f) - 8) * (int32_t)xq[j];
            isum += ((int32_t)(block[j] >> 4) - 8) * (int32_t)xq[j + 16];
        }
        const float scale = d2m_f16_to_f32(scales[b / blocks_per_group]);
        acc += (float)isum * (scale * x->d[b]);
    }
    return acc;
}

void d2m_dot_q4g_scalar(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x) {
    for (int r = r0; r < r1; r++)
        out[r - r0] = row_dot(w, r, x);
}
