/* x86-64 path: AVX-512 (F, BW, VL) and VNNI.  This unit alone is compiled with -mavx512f
 * -mavx512bw -mavx512vl -mavx512vnni (+ AVX2, FMA, F16C); it is only called after dispatch.c has
 * seen those features in cpuid and opmask/ZMM state enabled in XCR0.  F32 on this path is the AVX2
 * unit's (it already streams at DRAM speed).
 *
 * The integer formats were compute-bound with AVX2 (maddubs + madd per 32 weights).  VPDPBUSD
 * (u8 × s8, four products summed into an int32 lane, no saturation) does the multiply and the
 * quad sums in one instruction; it wants unsigned weights, so each lane starts from a correction
 * that depends only on the activation:
 *   Q8:  u = w xor 0x80 = w + 128,  lane = −128·Σx + Σ u·x = Σ w·x   (correction from pairs8)
 *   Q4G: u = n, the nibble 0..15,   lane = −8·Σx   + Σ n·x = Σ (n − 8)·x   (q4neg)
 * so every int32 lane is the exact partial sum of its columns' products, as on the other paths,
 * which is what the bound of spec/kernels.md §4 needs (|Σ u·x| <= 8·255·127, far from overflow).
 * Lanes are converted to float and scaled per block (scale·d), 4 float accumulators.  Tails use
 * masked loads (Q4G) or the scalar reference's arithmetic (Q8, float formats): no read passes a
 * row. */
#include <immintrin.h>

#include "internal.h"

static inline float hsum512(__m512 a, __m512 b, __m512 c, __m512 d) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

static inline __mmask16 first16(int n) {
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
}

/* ---- Q4G ---- */

/* the 16 >> shift scales of 16 blocks as float (lanes past them undefined) */
static inline __m512 load_scales(const uint16_t *p, int shift) {
    if (shift == 0)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    if (shift == 1)
        return _mm512_cvtph_ps(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)p)));
    uint64_t four;
    memcpy(&four, p, sizeof four);
    return _mm512_cvtph_ps(_mm256_castsi128_si256(_mm_cvtsi64_si128((long long)four)));
}

/* Q4G reads a quad of 4 blocks (64 packed bytes, 128 columns) per step: AND 0x0f gives the low
 * nibbles of the 4 blocks, a shift the high ones, each lined up with the activation in its quad
 * order (q4x, portable C: d2m_act_q4_split), so unpacking costs three instructions and no shuffle.
 * Lane l of block i (4 lanes per block) sums the 8 columns 4l..4l+3 and 16+4l..16+4l+3, started
 * from q4neg = −8·(their x sum): the exact partial sum Σ (n − 8)·x of those columns. */
static inline float q4g_row(const d2m_matrix *w, int row, const d2m_act *x) {
    const d2m_q4g_row q4 = d2m_q4g_row_at(w, row);
    const int nblk = q4.nblk, ngroups = q4.ngroups, shift = q4.shift;  /* block >> shift = group */
    const uint8_t *packed = q4.packed;
    const uint16_t *scales = q4.scales;
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    /* lane i of 16 blocks starting at a multiple of 16 belongs to group (b0 >> shift) + (i >> shift) */
    const __m512i group_of = _mm512_srlv_epi32(iota, _mm512_set1_epi32(shift));
    const __m512i block_of = _mm512_srli_epi32(iota, 2);  /* lane -> block of a quad */
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
#define Q4_QUAD(ACC, B, K, WMASK)                                                                 \
    do {                                                                                          \
        const __m512i raw_ = _mm512_maskz_loadu_epi8(WMASK, packed + (size_t)(B) * 16);          \
        const int8_t *xq_ = x->q4x + (size_t)(B) * 32;                                            \
        __m512i lanes_ = _mm512_load_si512((const void *)(x->q4neg + (size_t)(B) * 4));           \
        lanes_ = _mm512_dpbusd_epi32(lanes_, _mm512_and_si512(raw_, low4), _mm512_load_si512((const void *)xq_)); \
        lanes_ = _mm512_dpbusd_epi32(lanes_, _mm512_and_si512(_mm512_srli_epi16(raw_, 4), low4), \
                                     _mm512_load_si512((const void *)(xq_ + 64)));               \
        ACC = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes_),                                         \
                              _mm512_permutexvar_ps(_mm512_add_epi32(block_of, _mm512_set1_epi32(4 * (K))), sd), ACC); \
    } while (0)
    for (int b0 = 0; b0 < nblk; b0 += 16) {
        const int nb = nblk - b0 < 16 ? nblk - b0 : 16;
        const int g0 = b0 >> shift;
        const int ng = ngroups - g0 < 16 ? ngroups - g0 : 16;
        /* scale(block) · d(block) for these 16 blocks (0 past the row); plain loads of exactly
         * what a whole segment needs (masked loads measured much slower here) */
        __m512 s, dv;
        if (nb == 16) {
            s = load_scales(scales + g0, shift);
            dv = _mm512_loadu_ps(x->d + b0);
        } else {
            s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first16(ng), scales + g0));
            dv = _mm512_maskz_loadu_ps(first16(nb), x->d + b0);
        }
        const __m512 sd = _mm512_mul_ps(_mm512_permutexvar_ps(group_of, s), dv);
        if (nb == 16) {
            Q4_QUAD(acc0, b0, 0, ~(__mmask64)0);
            Q4_QUAD(acc1, b0 + 4, 1, ~(__mmask64)0);
            Q4_QUAD(acc2, b0 + 8, 2, ~(__mmask64)0);
            Q4_QUAD(acc3, b0 + 12, 3, ~(__mmask64)0);
        } else {  /* the row's last 1..15 blocks: whole quads, then a partial one (16 bytes a block) */
            const int nq = nb / 4;
            if (nq > 0)
                Q4_QUAD(acc0, b0, 0, ~(__mmask64)0);
            if (nq > 1)
                Q4_QUAD(acc1, b0 + 4, 1, ~(__mmask64)0);
            if (nq > 2)
                Q4_QUAD(acc2, b0 + 8, 2, ~(__mmask64)0);
            if (nb % 4)
                Q4_QUAD(acc3, b0 + 4 * nq, nq, ((__mmask64)1 << (16 * (nb % 4))) - 1);
        }
    }
#undef Q4_QUAD
    return hsum512(acc0, acc1, acc2, acc3);
}

D2M_RANGE(d2m_dot_q4g_avx512, q4g_row)

/* ---- F16, BF16 ---- */

/* 16-lane FMA over 4 accumulators (64 columns a step).  With 512-bit vectors the widening
 * (VCVTPH2PS / zero extension and shift) costs half the instructions of the AVX2 unit's loop, which
 * was close to compute-bound at DRAM speed.  The non-temporal prefetch 2 KiB ahead is the AVX2
 * unit's (weights are read once; NTA keeps x in L1): measured here neutral on 1 thread and +5-15 %
 * on 2 threads, where the two threads share a core's L1. */
/* float32 [16] from 16 f16 / bf16 weights */
static inline __m512 load16_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#define WIDE_DOT(NAME, LOAD16, WIDEN)                                                             \
    static inline float NAME##_row(const d2m_matrix *w, int row, const d2m_act *x) {            \
        const int n = w->cols;                                                                  \
        const uint16_t *a = (const uint16_t *)w->data + (size_t)row * (size_t)n;                \
        const float *b = x->x;                                                                  \
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();                              \
        __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();                              \
        int i = 0;                                                                              \
        for (; i + 64 <= n; i += 64) {                                                          \
            _mm_prefetch((const char *)(a + i) + 2048, _MM_HINT_NTA);                           \
            _mm_prefetch((const char *)(a + i) + 2048 + 64, _MM_HINT_NTA);                      \
            s0 = _mm512_fmadd_ps(LOAD16(a + i), _mm512_loadu_ps(b + i), s0);                    \
            s1 = _mm512_fmadd_ps(LOAD16(a + i + 16), _mm512_loadu_ps(b + i + 16), s1);          \
            s2 = _mm512_fmadd_ps(LOAD16(a + i + 32), _mm512_loadu_ps(b + i + 32), s2);          \
            s3 = _mm512_fmadd_ps(LOAD16(a + i + 48), _mm512_loadu_ps(b + i + 48), s3);          \
        }                                                                                       \
        for (; i + 16 <= n; i += 16)                                                            \
            s0 = _mm512_fmadd_ps(LOAD16(a + i), _mm512_loadu_ps(b + i), s0);                    \
        float sum = hsum512(s0, s1, s2, s3);                                                    \
        for (; i < n; i++)                                                                      \
            sum += WIDEN(a[i]) * b[i];                                                          \
        return sum;                                                                             \
    }                                                                                           \
    D2M_RANGE(NAME, NAME##_row)

WIDE_DOT(d2m_dot_f16_avx512, load16_f16, d2m_f16_to_f32)
WIDE_DOT(d2m_dot_bf16_avx512, load16_bf16, d2m_bf16_to_f32)

/* ---- Q8 ---- */

/* d[0], d[1] in lanes 0, 1 (a plain unaligned 8-byte load: a masked load measured much slower) */
static inline __m512 load2(const float *d) {
    double two;
    memcpy(&two, d, sizeof two);
    return _mm512_castps128_ps512(_mm_castpd_ps(_mm_set_sd(two)));
}

static inline float q8_row(const d2m_matrix *w, int row, const d2m_act *x) {
    const int cols = w->cols;
    const int8_t *q = (const int8_t *)w->data + (size_t)row * (size_t)cols;
    const int full = cols / D2M_QBLOCK;
    const __m512i bias = _mm512_set1_epi8((char)0x80), minus16 = _mm512_set1_epi16(-16);
    /* lanes 0-7 take d[b], lanes 8-15 d[b + 1] */
    const __m512i half = _mm512_srli_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 3);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 acc2 = _mm512_setzero_ps(), acc3 = _mm512_setzero_ps();
    int b = 0;
#define Q8_PAIR(ACC, B)                                                                           \
    do {                                                                                          \
        const __m512i u_ = _mm512_xor_si512(_mm512_loadu_si512((const void *)(q + (size_t)(B) * 32)), bias); \
        const __m512i c_ = _mm512_madd_epi16(_mm512_loadu_si512((const void *)(x->pairs8 + (size_t)(B) * 16)), minus16); \
        const __m512i lanes_ = _mm512_dpbusd_epi32(c_, u_, _mm512_loadu_si512((const void *)(x->q + (size_t)(B) * 32))); \
        const __m512 d_ = _mm512_permutexvar_ps(half, load2(x->d + (B))); \
        ACC = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes_), d_, ACC);                               \
    } while (0)
    for (; b + 8 <= full; b += 8) {
        Q8_PAIR(acc0, b);
        Q8_PAIR(acc1, b + 2);
        Q8_PAIR(acc2, b + 4);
        Q8_PAIR(acc3, b + 6);
    }
    for (; b + 2 <= full; b += 2)
        Q8_PAIR(acc0, b);
#undef Q8_PAIR
    float sum = hsum512(acc0, acc1, acc2, acc3);
    for (; b < full; b++)
        sum += (float)d2m_isum_i8(q + (size_t)b * 32, x->q + (size_t)b * 32, 32) * x->d[b];
    if (full * D2M_QBLOCK < cols) {
        const int lo = full * D2M_QBLOCK;
        sum += (float)d2m_isum_i8(q + lo, x->q + lo, cols - lo) * x->d[full];
    }
    return sum * ((const float *)w->scales)[row];
}

D2M_RANGE(d2m_dot_q8_avx512, q8_row)
