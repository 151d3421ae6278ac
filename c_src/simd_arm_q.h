/* The Q8 and Q4G row kernels of the two aarch64 units, written once: included by simd_neon.c and
 * simd_dotprod.c, each defining D2M_Q_INT_DOT (their exact 32-element int8 dot) and
 * D2M_Q_SUFFIX.  Compiled inside those units only, with their own -march. */

/* Q8: per whole block, int32x4 partials -> float, times the activation block scale; the partial
 * last block uses the scalar reference's arithmetic. */
static inline float q8_row(const d2m_matrix *w, int row, const d2m_act *x) {
    const int cols = w->cols;
    const int8_t *q = (const int8_t *)w->data + (size_t)row * (size_t)cols;
    const int full = cols / D2M_QBLOCK;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int b = 0;
    for (; b + 2 <= full; b += 2) {
        const int8_t *wq = q + (size_t)b * 32, *xq = x->q + (size_t)b * 32;
        const int32x4_t p0 = D2M_Q_INT_DOT(vld1q_s8(wq), vld1q_s8(wq + 16), vld1q_s8(xq), vld1q_s8(xq + 16));
        const int32x4_t p1 = D2M_Q_INT_DOT(vld1q_s8(wq + 32), vld1q_s8(wq + 48), vld1q_s8(xq + 32), vld1q_s8(xq + 48));
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(p0), x->d[b]);
        acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(p1), x->d[b + 1]);
    }
    if (b < full) {
        const int8_t *wq = q + (size_t)b * 32, *xq = x->q + (size_t)b * 32;
        const int32x4_t p0 = D2M_Q_INT_DOT(vld1q_s8(wq), vld1q_s8(wq + 16), vld1q_s8(xq), vld1q_s8(xq + 16));
        acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(p0), x->d[b]);
    }
    float sum = vaddvq_f32(vaddq_f32(acc0, acc1));
    if (full * D2M_QBLOCK < cols) {
        const int lo = full * D2M_QBLOCK;
        sum += (float)d2m_isum_i8(q + lo, x->q + lo, cols - lo) * x->d[full];
    }
    return sum * ((const float *)w->scales)[row];
}

D2M_RANGE(D2M_Q_SUFFIX(d2m_dot_q8), q8_row)

/* Q4G: 16 packed bytes are 32 weights, low nibbles columns 0..15, high nibbles 16..31, n - 8. */
static inline float q4g_row(const d2m_matrix *w, int row, const d2m_act *x) {
    const d2m_q4g_row q4 = d2m_q4g_row_at(w, row);
    const int nblk = q4.nblk, ngroups = q4.ngroups, per_group = 1 << q4.shift;
    const uint8_t *packed = q4.packed;
    const uint16_t *scales = q4.scales;
    const uint8x16_t low4 = vdupq_n_u8(0x0f);
    const int8x16_t eight = vdupq_n_s8(8);
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int b = 0;
    for (int g = 0; g < ngroups; g++) {
        const float scale = d2m_f16_to_f32(scales[g]);
        const int end = b + per_group < nblk ? b + per_group : nblk;
        for (; b < end; b++) {
            const uint8x16_t raw = vld1q_u8(packed + (size_t)b * 16);
            const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, low4)), eight);
            const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), eight);
            const int8_t *xq = x->q + (size_t)b * 32;
            const int32x4_t p = D2M_Q_INT_DOT(lo, hi, vld1q_s8(xq), vld1q_s8(xq + 16));
            if (b & 1)
                acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(p), scale * x->d[b]);
            else
                acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(p), scale * x->d[b]);
        }
    }
    return vaddvq_f32(vaddq_f32(acc0, acc1));
}

D2M_RANGE(D2M_Q_SUFFIX(d2m_dot_q4g), q4g_row)
