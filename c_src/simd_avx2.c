/* x86-64 path: AVX2 + FMA + F16C.  This unit alone is compiled with -mavx2 -mfma -mf16c; it is
 * only called after dispatch.c has seen those features in cpuid.
 *
 * One row at a time, contiguous loads only (a row of a row-major matrix is one stream; two rows
 * at once were measured slower here).  Float formats: 8 independent 8-lane FMA accumulators.
 * Integer formats: per 32-element block an exact int32 dot (maddubs/madd, no saturation: see
 * dot_i8, dot_q4), converted and scaled in float, 4 accumulators.  Tails (columns past the last
 * whole vector or block) use the scalar reference's arithmetic. */
#include <immintrin.h>

#include "internal.h"

static inline float hsum(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    __m128 sh = _mm_movehdup_ps(lo);
    lo = _mm_add_ps(lo, sh);
    sh = _mm_movehl_ps(sh, lo);
    return _mm_cvtss_f32(_mm_add_ss(lo, sh));
}

/* float32 [8] from 8 f16 / bf16 weights */
static inline __m256 load_f16(const uint16_t *p) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}

static inline __m256 load_bf16(const uint16_t *p) {
    const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Non-temporal prefetch of the weight stream PREFETCH_AHEAD bytes ahead, one per cache line of
 * the step: the weights are read once, and NTA keeps them from evicting x (up to 19 KB of float32
 * for a 4864-wide row) from L1.  Measured here: +10-15 % for f16/bf16 on 4864-wide rows, -10 %
 * for f32, so only the 16-bit formats use it. */
#define PREFETCH_AHEAD 2048
#define PREFETCH_NTA(p, bytes)                                                                    \
    for (unsigned line_ = 0; line_ < (bytes); line_ += 64)                                        \
    _mm_prefetch((const char *)(p) + PREFETCH_AHEAD + line_, _MM_HINT_NTA)

/* 8 accumulators: an FMA has 4 cycles of latency and 2 issue per cycle, so fewer chains would
 * leave the FMA units idle and make the loop compute-bound below DRAM speed. */
#define FLOAT_DOT(NAME, TYPE, LOAD, WIDEN)                                                        \
    static inline float NAME##_row(const d2m_matrix *w, int row, const d2m_act *x) {            \
        const int n = w->cols;                                                                  \
        const TYPE *a = (const TYPE *)w->data + (size_t)row * (size_t)n;                        \
        const float *b = x->x;                                                                  \
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps();   \
        __m256 s3 = _mm256_setzero_ps(), s4 = _mm256_setzero_ps(), s5 = _mm256_setzero_ps();   \
        __m256 s6 = _mm256_setzero_ps(), s7 = _mm256_setzero_ps();                              \
        int i = 0;                                                                              \
        for (; i + 64 <= n; i += 64) {                                                          \
            if (sizeof(TYPE) == 2) /* f16, bf16 only: measured to slow f32 down */              \
                PREFETCH_NTA(a + i, 128);                                                       \
            s0 = _mm256_fmadd_ps(LOAD(a + i), _mm256_loadu_ps(b + i), s0);                      \
            s1 = _mm256_fmadd_ps(LOAD(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);              \
            s2 = _mm256_fmadd_ps(LOAD(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);            \
            s3 = _mm256_fmadd_ps(LOAD(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);            \
            s4 = _mm256_fmadd_ps(LOAD(a + i + 32), _mm256_loadu_ps(b + i + 32), s4);            \
            s5 = _mm256_fmadd_ps(LOAD(a + i + 40), _mm256_loadu_ps(b + i + 40), s5);            \
            s6 = _mm256_fmadd_ps(LOAD(a + i + 48), _mm256_loadu_ps(b + i + 48), s6);            \
            s7 = _mm256_fmadd_ps(LOAD(a + i + 56), _mm256_loadu_ps(b + i + 56), s7);            \
        }                                                                                       \
        for (; i + 8 <= n; i += 8)                                                              \
            s0 = _mm256_fmadd_ps(LOAD(a + i), _mm256_loadu_ps(b + i), s0);                      \
        const __m256 s01 = _mm256_add_ps(s0, s1), s23 = _mm256_add_ps(s2, s3);                  \
        const __m256 s45 = _mm256_add_ps(s4, s5), s67 = _mm256_add_ps(s6, s7);                  \
        float sum = hsum(_mm256_add_ps(_mm256_add_ps(s01, s23), _mm256_add_ps(s45, s67)));      \
        for (; i < n; i++)                                                                      \
            sum += WIDEN(a[i]) * b[i];                                                          \
        return sum;                                                                             \
    }                                                                                           \
    D2M_RANGE(NAME, NAME##_row)

#define LOAD_F32(p) _mm256_loadu_ps(p)
#define WIDEN_F32(v) (v)

FLOAT_DOT(d2m_dot_f32_avx2, float, LOAD_F32, WIDEN_F32)
FLOAT_DOT(d2m_dot_f16_avx2, uint16_t, load_f16, d2m_f16_to_f32)
FLOAT_DOT(d2m_dot_bf16_avx2, uint16_t, load_bf16, d2m_bf16_to_f32)

/* Exact dot of 32 int8 weights (any int8, -128 included) with 32 activations in [-127, 127],
 * as 8 int32 partial sums converted to float (each |partial| <= 4 * 128 * 127, exact).
 * maddubs wants unsigned * signed: |w| * (x with w's sign), pair sums <= 2 * 128 * 127 < 2^15. */
static inline __m256 dot_i8(__m256i w, __m256i x) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

static inline __m256i load_i8(const int8_t *p) {
    return _mm256_loadu_si256((const __m256i *)p);
}

static inline float q8_row(const d2m_matrix *w, int row, const d2m_act *x) {
    const int cols = w->cols;
    const int8_t *q = (const int8_t *)w->data + (size_t)row * (size_t)cols;
    const int full = cols / D2M_QBLOCK;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    int b = 0;
#define Q8_STEP(ACC, K)                                                                           \
    ACC = _mm256_fmadd_ps(dot_i8(load_i8(q + (b + K) * D2M_QBLOCK), load_i8(x->q + (b + K) * D2M_QBLOCK)), \
                          _mm256_set1_ps(x->d[b + K]), ACC)
    for (; b + 4 <= full; b += 4) {
        Q8_STEP(acc0, 0);
        Q8_STEP(acc1, 1);
        Q8_STEP(acc2, 2);
        Q8_STEP(acc3, 3);
    }
    for (; b < full; b++)
        Q8_STEP(acc0, 0);
#undef Q8_STEP
    float sum = hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
    if (full * D2M_QBLOCK < cols) {
        const int lo = full * D2M_QBLOCK;
        sum += (float)d2m_isum_i8(q + lo, x->q + lo, cols - lo) * x->d[full];
    }
    return sum * ((const float *)w->scales)[row];
}

D2M_RANGE(d2m_dot_q8_avx2, q8_row)

/* 16 packed bytes -> the 32 nibbles n (0..15) in column order: low nibbles are columns 0..15,
 * high nibbles 16..31 (spec/quant.md §3). */
static inline __m256i unpack_nibbles(const uint8_t *p) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
}

/* Exact dot of one Q4 block with its activation block, as 8 int32 partials converted to float:
 * maddubs(n, x) sums n·x over column pairs (n unsigned 0..15, |pair| <= 2·15·127), and subtracting
 * pairs8 = 8·(x + x') of each pair makes it (n − 8)·x exactly — the same per-lane partial sums
 * as the scalar reference's, with one subtraction instead of an offset, abs and sign per block. */
static inline __m256 dot_q4(const uint8_t *packed, const int8_t *xq, const int16_t *pairs8) {
    const __m256i pairs = _mm256_sub_epi16(_mm256_maddubs_epi16(unpack_nibbles(packed), load_i8(xq)),
                                           _mm256_loadu_si256((const __m256i *)pairs8));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

#define Q4_SEGMENT 64  /* groups whose scales are widened to float at a time */

static inline float q4g_row(const d2m_matrix *w, int row, const d2m_act *x) {
    const d2m_q4g_row q4 = d2m_q4g_row_at(w, row);
    const int nblk = q4.nblk, ngroups = q4.ngroups, shift = q4.shift;  /* block >> shift = group */
    const uint8_t *packed = q4.packed;
    const uint16_t *scales = q4.scales;
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    float sc[Q4_SEGMENT];
    for (int g0 = 0; g0 < ngroups; g0 += Q4_SEGMENT) {
        const int g1 = g0 + Q4_SEGMENT < ngroups ? g0 + Q4_SEGMENT : ngroups;
        int g = g0;
        for (; g + 8 <= g1; g += 8)
            _mm256_storeu_ps(sc + (g - g0), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + g))));
        for (; g < g1; g++)
            sc[g - g0] = _cvtsh_ss(scales[g]);
        const int b1 = (g1 << shift) < nblk ? g1 << shift : nblk;
        int b = g0 << shift;
#define Q4_STEP(ACC, K)                                                                           \
    ACC = _mm256_fmadd_ps(dot_q4(packed + (size_t)(b + K) * 16, x->q + (size_t)(b + K) * 32,           \
                                 x->pairs8 + (size_t)(b + K) * 16),                                 \
                          _mm256_set1_ps(sc[((b + K) >> shift) - g0] * x->d[b + K]), ACC)
        for (; b + 4 <= b1; b += 4) {
            Q4_STEP(acc0, 0);
            Q4_STEP(acc1, 1);
            Q4_STEP(acc2, 2);
            Q4_STEP(acc3, 3);
        }
        for (; b < b1; b++)
            Q4_STEP(acc0, 0);
#undef Q4_STEP
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

D2M_RANGE(d2m_dot_q4g_avx2, q4g_row)

uint64_t d2m_stream_avx2(const uint64_t *p, size_t n) {
    __m256i s0 = _mm256_setzero_si256(), s1 = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_add_epi64(s0, _mm256_add_epi64(_mm256_load_si256((const __m256i *)(p + i)),
                                                   _mm256_load_si256((const __m256i *)(p + i + 4))));
        s1 = _mm256_add_epi64(s1, _mm256_add_epi64(_mm256_load_si256((const __m256i *)(p + i + 8)),
                                                   _mm256_load_si256((const __m256i *)(p + i + 12))));
    }
    for (; i < n; i += 4)
        s0 = _mm256_add_epi64(s0, _mm256_load_si256((const __m256i *)(p + i)));
    s0 = _mm256_add_epi64(s0, s1);
    uint64_t out[4];
    _mm256_storeu_si256((__m256i *)out, s0);
    return out[0] + out[1] + out[2] + out[3];
}
