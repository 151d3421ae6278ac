/* x86-64 path: AVX2 + FMA + F16C.  This unit alone is compiled with -mavx2 -mfma -mf16c; it is
 * only called after dispatch.c has seen those features in cpuid.
 *
 * One row at a time, contiguous loads only (a row of a row-major matrix is one stream; two rows
 * at once were measured slower here).  Float formats: 8 independent 8-lane FMA accumulators.
 * Integer formats: exact int32 lanes per 32-element block (maddubs/madd, no saturation: see
 * dot_i8, q4_pair), converted and scaled in float, 4 accumulators.  Float-format tails (columns
 * past the last whole vector) and the int8 tail block use the scalar reference's arithmetic. */
#include <float.h>
#include <immintrin.h>
#include <math.h>

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

/* Non-temporal prefetch of the weight stream, one per cache line of a step, `ahead` bytes ahead:
 * the weights are read once, and NTA keeps them from evicting x from L1.  The hardware prefetcher
 * alone leaves a loop with more than a few instructions per cache line well short of DRAM speed
 * (measured on Zen 3, 4864x896 on one thread, % of the streaming read: f16 70, int8 65-69, int4
 * 43-46); how far ahead pays differs by format (below).  F32 uses none: measured 85-97 % without,
 * 63-72 % with it. */
#define PREFETCH_NTA(p, bytes, ahead)                                                             \
    for (unsigned line_ = 0; line_ < (bytes); line_ += 64)                                        \
    _mm_prefetch((const char *)(p) + (ahead) + line_, _MM_HINT_NTA)
#define PREFETCH_WIDE 1024  /* f16, bf16: 512 B ahead 77 %, 1 KiB 80-82 %, 2 KiB 70-71 %, 4 KiB 67 % */
#define PREFETCH_INT 2048   /* int8, int4: 1 KiB 84 %, 2 KiB 85-88 %, 4 KiB 84 % (int8) */

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
            if (sizeof(TYPE) == 2) /* f16, bf16 only (above) */                                 \
                PREFETCH_NTA(a + i, 128, PREFETCH_WIDE);                                        \
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

/* ---- activation quantisation (spec/kernels.md §3) ---- */

/* The bytes of d2m_act_prepare_portable (quant_act.c), a block of 32 columns a step: the same float
 * operations (|x| on the bits, 127/amax, x·inv, amax/127) and the same rounding, since VCVTPS2DQ
 * rounds in the MXCSR mode (to nearest, ties to even) as the portable 1.5·2^23 addition does.
 * Measured here (Zen 3): the portable quantisation and quad split of 4864 columns took 7-9 µs a
 * call, about 5 % of a 896×4864 Q4G GEMV from DRAM.  A partial last block takes the portable code. */
static inline void quantize_block(int8_t *q, float *d, const float *x) {
    const __m256i abs_bits = _mm256_set1_epi32(0x7fffffff), finite_max = _mm256_set1_epi32(0x7f7fffff);
    __m256 v[4];
    __m256i amax = _mm256_setzero_si256(), bad = _mm256_setzero_si256();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        const __m256i a = _mm256_and_si256(_mm256_castps_si256(v[i]), abs_bits);
        bad = _mm256_or_si256(bad, _mm256_cmpgt_epi32(a, finite_max));  /* inf or NaN */
        amax = _mm256_max_epi32(amax, a);
    }
    if (!_mm256_testz_si256(bad, bad)) {
        memset(q, 0, D2M_QBLOCK);
        *d = NAN;
        return;
    }
    __m128i m = _mm_max_epi32(_mm256_castsi256_si128(amax), _mm256_extracti128_si256(amax, 1));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4e));
    m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xb1));
    const float amax_f = d2m_bits_to_f32((uint32_t)_mm_cvtsi128_si32(m));
    const float inv = 127.0f / amax_f;
    if (!(inv <= FLT_MAX)) {
        memset(q, 0, D2M_QBLOCK);
        *d = 0.0f;
        return;
    }
    *d = amax_f / 127.0f;
    const __m256 scale = _mm256_set1_ps(inv);
    __m256i r[4];
    for (int i = 0; i < 4; i++)
        r[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], scale));  /* in [-127, 127]: packing never saturates */
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
    /* the packs work within 128-bit halves: 4-byte groups come out as r0 r1 r2 r3 (columns 0-3 of
     * each) then columns 4-7 of each */
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* q4x and q4neg of one quad (d2m_act_q4_split): blocks [4] of 32 quantised columns (0 past the row) */
static inline void q4_split_quad(int8_t *q4x, int32_t *q4neg, const __m256i blocks[4]) {
    _mm256_storeu_si256((__m256i *)q4x, _mm256_permute2x128_si256(blocks[0], blocks[1], 0x20));
    _mm256_storeu_si256((__m256i *)(q4x + 32), _mm256_permute2x128_si256(blocks[2], blocks[3], 0x20));
    _mm256_storeu_si256((__m256i *)(q4x + 64), _mm256_permute2x128_si256(blocks[0], blocks[1], 0x31));
    _mm256_storeu_si256((__m256i *)(q4x + 96), _mm256_permute2x128_si256(blocks[2], blocks[3], 0x31));
    for (int i = 0; i < 4; i++) {  /* lane l: columns 4l..4l+3 (first half) + 16+4l..16+4l+3 */
        const __m256i sums4 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), blocks[i]), _mm256_set1_epi16(1));
        const __m128i lanes = _mm_add_epi32(_mm256_castsi256_si128(sums4), _mm256_extracti128_si256(sums4, 1));
        _mm_storeu_si128((__m128i *)(q4neg + 4 * i), _mm_sub_epi32(_mm_setzero_si128(), _mm_slli_epi32(lanes, 3)));
    }
}

void d2m_act_prepare_avx2(const d2m_act_buf *out, const float *x, int cols, unsigned reads) {
    d2m_quantize_act_blocks(out->q, out->d, x, cols, quantize_block);
    if (reads & D2M_ACT_PAIRS8)  /* read by no AVX2 kernel */
        d2m_act_pairs8(out->pairs8, out->q, cols);
    if (reads & D2M_ACT_Q4) {
        const int nblk = d2m_act_blocks(cols), nquad = d2m_act_quads(cols);
        for (int k = 0; k < nquad; k++) {
            __m256i blocks[4];
            for (int i = 0; i < 4; i++)
                blocks[i] = 4 * k + i < nblk ? _mm256_loadu_si256((const __m256i *)(out->q + (size_t)(4 * k + i) * D2M_QBLOCK))
                                             : _mm256_setzero_si256();
            q4_split_quad(out->q4x + (size_t)k * 128, out->q4neg + (size_t)k * 16, blocks);
        }
    }
}

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
        PREFETCH_NTA(q + (size_t)b * D2M_QBLOCK, 128, PREFETCH_INT);
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

/* Q4G, a pair of blocks (32 packed bytes, 64 columns) per step.  AND 0x0f gives the low nibbles of
 * both blocks (columns 0..15 of each), a shift and an AND the high ones (16..31), lined up with the
 * activation in its quad order (q4x, d2m_act_q4_split: a pair's first halves, and 64 bytes on its
 * second halves), so unpacking needs no shuffle.  The two maddubs (n unsigned 0..15 times q, pair
 * sums |.| <= 2·15·127) are added in int16 (|.| <= 7620), summed to int32 by madd and started
 * from q4neg, −8·(the x sum of the lane's 8 columns): lane l of a block is the exact partial sum
 * Σ (n − 8)·x of its columns 4l..4l+3 and 16+4l..16+4l+3, the lanes of the AVX-512 kernel.
 * Measured here (Zen 3, hot in L2): 3.2 cycles a block, where one block a step (a 128-bit load
 * widened by an insert, a pairs8 offset per column pair) took 5.0. */
static inline __m256 q4_pair(__m256i raw, const int8_t *xlo, const int8_t *xhi, const int32_t *neg) {
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_and_si256(raw, low4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
    const __m256i sums16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, load_i8(xlo)), _mm256_maddubs_epi16(hi, load_i8(xhi)));
    const __m256i lanes = _mm256_add_epi32(_mm256_madd_epi16(sums16, _mm256_set1_epi16(1)),
                                           _mm256_loadu_si256((const __m256i *)neg));
    return _mm256_cvtepi32_ps(lanes);
}

/* float32 [8]: lane i the scale of block b0 + i, for n = 8 or 4 blocks from a multiple of n (their
 * n >> shift groups: 8, 4, 2 or 1 binary16 scales, exactly those read; lanes past n are 0, as the
 * loads leave the rest of h zero) */
static inline __m256 q4_scales(const uint16_t *p, int n, int shift) {
    __m128i h;
    switch (n >> shift) {
    case 8:
        h = _mm_loadu_si128((const __m128i *)p);
        break;
    case 4:
        h = _mm_loadl_epi64((const __m128i *)p);
        break;
    case 2: {
        int32_t two;
        memcpy(&two, p, sizeof two);
        h = _mm_cvtsi32_si128(two);
        break;
    }
    default:
        h = _mm_cvtsi32_si128(p[0]);
    }
    const __m256i group_of = _mm256_srlv_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(shift));
    return _mm256_permutevar8x32_ps(_mm256_cvtph_ps(h), group_of);
}

/* lanes 0-3: block 2k's scale·d, lanes 4-7: block 2k+1's (sd: 8 blocks' scale·d) */
static inline __m256 q4_pick(__m256 sd, int k) {
    return _mm256_permutevar8x32_ps(sd, _mm256_setr_epi32(2 * k, 2 * k, 2 * k, 2 * k, 2 * k + 1, 2 * k + 1, 2 * k + 1, 2 * k + 1));
}

/* acc + pair k (blocks 2k, 2k+1 from a step's start) times its scale·d: raw its 32 packed bytes,
 * xq and neg the step's activation (pair k is half k%2 of quad k/2), sd the step's scale·d */
static inline __m256 q4_acc(__m256 acc, __m256i raw, const int8_t *xq, const int32_t *neg, __m256 sd, int k) {
    const int8_t *xl = xq + (k / 2) * 128 + (k % 2) * 32;
    return _mm256_fmadd_ps(q4_pair(raw, xl, xl + 64, neg + 8 * k), q4_pick(sd, k), acc);
}

static inline __m256i load_pair(const uint8_t *p) {
    return _mm256_loadu_si256((const __m256i *)p);
}

/* a lone last block's 16 packed bytes, its pair's second block 0 */
static inline __m256i load_lone(const uint8_t *p) {
    return _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p));
}

static inline float q4g_row(const d2m_q4g_row q4, const d2m_act *x) {
    const int nblk = q4.nblk, shift = q4.shift;  /* block >> shift = group */
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    __m256 acc2 = _mm256_setzero_ps(), acc3 = _mm256_setzero_ps();
    const int8_t *xq = x->q4x;      /* a step's activation (32 bytes a block) */
    const int32_t *neg = x->q4neg;  /* its q4neg (4 lanes a block) */
    const uint8_t *wq = q4.packed;  /* its weights (16 bytes a block) */
    int b0 = 0;
    for (; b0 + 8 <= nblk; b0 += 8, xq += 256, neg += 32, wq += 128) {  /* two quads a step */
        PREFETCH_NTA(wq, 128, PREFETCH_INT);
        const __m256 sd = _mm256_mul_ps(q4_scales(q4.scales + (b0 >> shift), 8, shift), _mm256_loadu_ps(x->d + b0));
        acc0 = q4_acc(acc0, load_pair(wq), xq, neg, sd, 0);
        acc1 = q4_acc(acc1, load_pair(wq + 32), xq, neg, sd, 1);
        acc2 = q4_acc(acc2, load_pair(wq + 64), xq, neg, sd, 2);
        acc3 = q4_acc(acc3, load_pair(wq + 96), xq, neg, sd, 3);
    }
    if (b0 + 4 <= nblk) {  /* a last whole quad (896 columns: 3 steps and a quad) */
        const __m256 d = _mm256_zextps128_ps256(_mm_loadu_ps(x->d + b0));
        const __m256 sd = _mm256_mul_ps(q4_scales(q4.scales + (b0 >> shift), 4, shift), d);
        acc0 = q4_acc(acc0, load_pair(wq), xq, neg, sd, 0);
        acc1 = q4_acc(acc1, load_pair(wq + 32), xq, neg, sd, 1);
        b0 += 4;
        xq += 128, neg += 16, wq += 64;
    }
    if (b0 < nblk) {  /* the row's last 1..3 blocks: scale·d 0 past its end, a lone last block loaded alone */
        const int nb = nblk - b0;
        float t[8] = {0};
        for (int i = 0; i < nb; i++)
            t[i] = _cvtsh_ss(q4.scales[(b0 + i) >> shift]) * x->d[b0 + i];
        const __m256 sd = _mm256_loadu_ps(t);
        acc2 = q4_acc(acc2, nb >= 2 ? load_pair(wq) : load_lone(wq), xq, neg, sd, 0);
        if (nb == 3)
            acc3 = q4_acc(acc3, load_lone(wq + 32), xq, neg, sd, 1);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(acc0, acc1), _mm256_add_ps(acc2, acc3)));
}

/* The layout once per range, not per row: on 896-column rows (28 blocks) its division and call
 * cost about 20 cycles a row, a quarter of the row's arithmetic. */
void d2m_dot_q4g_avx2(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x) {
    d2m_q4g_row q4 = d2m_q4g_row_at(w, r0);
    for (int r = r0; r < r1; r++, d2m_q4g_row_next(&q4))
        out[r - r0] = q4g_row(q4, x);
}

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
