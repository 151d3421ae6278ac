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
#include <float.h>
#include <immintrin.h>
#include <math.h>

#include "internal.h"

static inline float hsum512(__m512 a, __m512 b, __m512 c, __m512 d) {
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a, b), _mm512_add_ps(c, d)));
}

static inline __mmask16 first16(int n) {
    return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1u);
}

/* ---- activation quantisation (spec/kernels.md §3) ---- */

/* The bytes of d2m_act_prepare_portable (quant_act.c), a block of 32 columns per step: the same
 * float operations (|x| on the bits, 127/amax, x·inv, amax/127) and the same rounding, since
 * VCVTPS2DQ rounds in the MXCSR mode (to nearest, ties to even) as the portable 1.5·2^23 addition
 * does.  The portable loop, compiled for baseline x86-64, cost 3 µs for 4864 columns: more than
 * the DRAM time of a 896×4864 Q4G matrix's last 5 %.  A partial last block takes the portable
 * code itself. */
static inline void quantize_block(int8_t *q, float *d, const float *x) {
    const __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
    const __m512i abs_bits = _mm512_set1_epi32(0x7fffffff), inf_bits = _mm512_set1_epi32(0x7f800000);
    const __m512i a0 = _mm512_and_si512(_mm512_castps_si512(v0), abs_bits);
    const __m512i a1 = _mm512_and_si512(_mm512_castps_si512(v1), abs_bits);
    if (_mm512_cmpge_epi32_mask(a0, inf_bits) | _mm512_cmpge_epi32_mask(a1, inf_bits)) {
        memset(q, 0, D2M_QBLOCK);
        *d = NAN;
        return;
    }
    const float amax = d2m_bits_to_f32((uint32_t)_mm512_reduce_max_epi32(_mm512_max_epi32(a0, a1)));
    const float inv = 127.0f / amax;
    if (!(inv <= FLT_MAX)) {
        memset(q, 0, D2M_QBLOCK);
        *d = 0.0f;
        return;
    }
    *d = amax / 127.0f;
    const __m512 scale = _mm512_set1_ps(inv);
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, scale))));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, scale))));
}

/* mask of the first n (< 64: some, else all) of 64 bytes */
static inline __mmask64 first64(size_t n) {
    return n >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << n) - 1;
}

void d2m_act_prepare_avx512(const d2m_act_buf *out, const float *x, int cols, unsigned reads) {
    d2m_quantize_act_blocks(out->q, out->d, x, cols, quantize_block);
    const int nblk = d2m_act_blocks(cols);
    const size_t nbytes = (size_t)nblk * D2M_QBLOCK;
    const __m512i ones = _mm512_set1_epi8(1);
    if (reads & D2M_ACT_PAIRS8) {  /* 8·(q[2i] + q[2i+1]): u8 ones × s8 q, pairs summed */
        for (size_t i = 0; i < nbytes; i += 64) {
            const __m512i v = _mm512_maskz_loadu_epi8(first64(nbytes - i), out->q + i);
            const __m512i p = _mm512_slli_epi16(_mm512_maddubs_epi16(ones, v), 3);
            _mm512_mask_storeu_epi16(out->pairs8 + i / 2, (__mmask32)first64((nbytes - i) / 2), p);
        }
    }
    if (reads & D2M_ACT_Q4) {  /* d2m_act_q4_split: 16-byte halves regrouped, 4-byte sums · −8 */
        const int nquad = d2m_act_quads(cols);
        for (int k = 0; k < nquad; k++) {
            const size_t at = (size_t)k * 128;
            const __m512i z0 = _mm512_maskz_loadu_epi8(first64(nbytes - at), out->q + at);
            const __m512i z1 = nbytes > at + 64 ? _mm512_maskz_loadu_epi8(first64(nbytes - at - 64), out->q + at + 64)
                                                : _mm512_setzero_si512();
            const __m512i lo = _mm512_shuffle_i32x4(z0, z1, 0x88);  /* first halves of blocks 0..3 */
            const __m512i hi = _mm512_shuffle_i32x4(z0, z1, 0xdd);  /* second halves */
            _mm512_storeu_si512((void *)(out->q4x + at), lo);
            _mm512_storeu_si512((void *)(out->q4x + at + 64), hi);
            const __m512i sums = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, lo), ones, hi);
            _mm512_storeu_si512((void *)(out->q4neg + (size_t)k * 16), _mm512_mullo_epi32(sums, _mm512_set1_epi32(-8)));
        }
    }
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
 * from q4neg = −8·(their x sum): the exact partial sum Σ (n − 8)·x of those columns.
 *
 * Q4_ROWS rows are formed together: they share the activation loads (q4x, q4neg, d: three of a
 * step's four loads) and the per-segment work, which on 896-column rows cost as much as the
 * quads (hot in L1, measured here: 6.9 → 4.7 cycles per quad and row).  Each row's arithmetic is
 * the same instruction sequence whether it is formed alone (a range's last rows) or in a group,
 * so results do not depend on where a range starts.
 * Memory: the group's rows are adjacent, so the prefetches walk them as one stream, a cache line
 * per row and step, PREFETCH_Q4 bytes ahead (the hardware prefetcher alone left 896×4864 at 45 %
 * of DRAM bandwidth; 4 KiB ahead measured 65 %, 8 KiB 90 %, 16 KiB 88 %), and each row's scales
 * as far ahead in weight terms (two threads: +4 to +8 points of bandwidth, one thread: +2).  The
 * weight vector is loaded once and kept in a register (the empty asm): folded into both the AND
 * and the shift, it was read twice, and on rows not 64-byte aligned every read splits over two
 * cache lines (a NumPy array's data starts 16 bytes into a line): 33 → 41 GB/s on such rows. */
#define Q4_ROWS 2
#define Q4_PAIR_MAX_BLOCKS 64  /* rows of at most 2048 columns are formed in pairs */
#define PREFETCH_Q4 8192

static inline __attribute__((always_inline)) void q4g_rows(float *out, const d2m_matrix *w, int row,
                                                           const d2m_act *x, const int nr) {
    const uint8_t *packed[Q4_ROWS];
    const uint16_t *scales[Q4_ROWS];
    int nblk = 0, ngroups = 0, shift = 0;  /* the same for every row; block >> shift = group */
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++) {
        const d2m_q4g_row q4 = d2m_q4g_row_at(w, row + i);
        packed[i] = q4.packed;
        scales[i] = q4.scales;
        nblk = q4.nblk, ngroups = q4.ngroups, shift = q4.shift;
    }
    const __m512i low4 = _mm512_set1_epi8(0x0f);
    const __m512i iota = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    /* lane i of 16 blocks starting at a multiple of 16 belongs to group (b0 >> shift) + (i >> shift) */
    const __m512i group_of = _mm512_srlv_epi32(iota, _mm512_set1_epi32(shift));
    const __m512i block_of = _mm512_srli_epi32(iota, 2);  /* lane -> block of a quad */
    __m512 acc[Q4_ROWS][4];
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++)
        acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = _mm512_setzero_ps();
    __m512 sd[Q4_ROWS];
/* quad K of the segment at block b0 (block K of sd's 16) into accumulator A, weight bytes WMASK */
#define Q4_QUAD(A, K, WMASK)                                                                       \
    do {                                                                                           \
        const size_t b_ = (size_t)b0 + 4 * (size_t)(K);                                            \
        const __m512i xlo_ = _mm512_load_si512((const void *)(x->q4x + b_ * 32));                  \
        const __m512i xhi_ = _mm512_load_si512((const void *)(x->q4x + b_ * 32 + 64));             \
        const __m512i neg_ = _mm512_load_si512((const void *)(x->q4neg + b_ * 4));                 \
        const __m512i pick_ = _mm512_add_epi32(block_of, _mm512_set1_epi32(4 * (K)));             \
        _Pragma("GCC unroll 4")                                                                    \
        for (int i = 0; i < nr; i++) {                                                             \
            _mm_prefetch((const char *)(packed[0] + b_ * 16 * (size_t)nr + 64 * (size_t)i) + PREFETCH_Q4, _MM_HINT_T0);          \
            __m512i raw_ = _mm512_maskz_loadu_epi8(WMASK, packed[i] + b_ * 16);                    \
            __asm__("" : "+v"(raw_)); /* one load, not one per use */                              \
            __m512i lanes_ = _mm512_dpbusd_epi32(neg_, _mm512_and_si512(raw_, low4), xlo_);        \
            lanes_ = _mm512_dpbusd_epi32(lanes_, _mm512_and_si512(_mm512_srli_epi16(raw_, 4), low4), xhi_); \
            acc[i][A] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lanes_), _mm512_permutexvar_ps(pick_, sd[i]), acc[i][A]); \
        }                                                                                          \
    } while (0)
    for (int b0 = 0; b0 < nblk; b0 += 16) {
        const int nb = nblk - b0 < 16 ? nblk - b0 : 16;
        const int g0 = b0 >> shift;
        const int ng = ngroups - g0 < 16 ? ngroups - g0 : 16;
        /* scale(block) · d(block) for these 16 blocks (0 past the row); plain loads of exactly
         * what a whole segment needs (masked loads measured much slower here) */
        const __m512 dv = nb == 16 ? _mm512_loadu_ps(x->d + b0) : _mm512_maskz_loadu_ps(first16(nb), x->d + b0);
#pragma GCC unroll 4
        for (int i = 0; i < nr; i++) {
            /* the scales are a second stream, 8 << shift times thinner than the weights: prefetched
             * the same distance ahead in weight terms */
            _mm_prefetch((const char *)(scales[i] + g0) + (PREFETCH_Q4 >> (3 + shift)), _MM_HINT_T0);
            const __m512 s = nb == 16 ? load_scales(scales[i] + g0, shift)
                                      : _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first16(ng), scales[i] + g0));
            sd[i] = _mm512_mul_ps(_mm512_permutexvar_ps(group_of, s), dv);
        }
        if (nb == 16) {
            Q4_QUAD(0, 0, ~(__mmask64)0);
            Q4_QUAD(1, 1, ~(__mmask64)0);
            Q4_QUAD(2, 2, ~(__mmask64)0);
            Q4_QUAD(3, 3, ~(__mmask64)0);
        } else {  /* the row's last 1..15 blocks: whole quads, then a partial one (16 bytes a block) */
            const int nq = nb / 4;
            if (nq > 0)
                Q4_QUAD(0, 0, ~(__mmask64)0);
            if (nq > 1)
                Q4_QUAD(1, 1, ~(__mmask64)0);
            if (nq > 2)
                Q4_QUAD(2, 2, ~(__mmask64)0);
            if (nb % 4)
                Q4_QUAD(3, nq, ((__mmask64)1 << (16 * (nb % 4))) - 1);
        }
    }
#undef Q4_QUAD
#pragma GCC unroll 4
    for (int i = 0; i < nr; i++)
        out[i] = hsum512(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
}

void d2m_dot_q4g_avx512(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x) {
    int r = r0;
    if (d2m_act_blocks(w->cols) <= Q4_PAIR_MAX_BLOCKS)
        for (; r + Q4_ROWS <= r1; r += Q4_ROWS)
            q4g_rows(out + (r - r0), w, r, x, Q4_ROWS);
    for (; r < r1; r++)
        q4g_rows(out + (r - r0), w, r, x, 1);
}

/* ---- F16, BF16 ---- */

/* 16-lane FMA over 4 accumulators (64 columns a step).  With 512-bit vectors the widening
 * (VCVTPH2PS / zero extension and shift) costs half the instructions of the AVX2 unit's loop, which
 * was close to compute-bound at DRAM speed.  Non-temporal prefetch PREFETCH_WIDE bytes ahead
 * (weights are read once; meant to leave x in L1, which holds on short rows: on 4864-column rows
 * the 19 KB x row is still evicted, README): measured here, on a cold set of 256 MiB, 2 KiB ahead
 * 34.8-38.3 GB/s on 1 thread, 8 KiB 41.1-44.2 (the streaming read: 42-44). */
#define PREFETCH_WIDE 8192

/* float32 [16] from 16 f16 / bf16 weights */
static inline __m512 load16_f16(const uint16_t *p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
}

static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

#define WIDE_DOT(NAME, TYPE, LOAD16, WIDEN)                                                       \
    static inline float NAME##_row(const d2m_matrix *w, int row, const d2m_act *x) {            \
        const int n = w->cols;                                                                  \
        const TYPE *a = (const TYPE *)w->data + (size_t)row * (size_t)n;                        \
        const float *b = x->x;                                                                  \
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();                              \
        __m512 s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();                              \
        int i = 0;                                                                              \
        for (; i + 64 <= n; i += 64) {                                                          \
            for (unsigned line_ = 0; line_ < 64 * sizeof(TYPE); line_ += 64)                    \
                _mm_prefetch((const char *)(a + i) + PREFETCH_WIDE + line_, _MM_HINT_NTA);      \
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

WIDE_DOT(d2m_dot_f16_avx512, uint16_t, load16_f16, d2m_f16_to_f32)
WIDE_DOT(d2m_dot_bf16_avx512, uint16_t, load16_bf16, d2m_bf16_to_f32)

/* ---- Q8 ---- */

/* d[0], d[1] in lanes 0, 1 (a plain unaligned 8-byte load: a masked load measured much slower) */
static inline __m512 load2(const float *d) {
    double two;
    memcpy(&two, d, sizeof two);
    return _mm512_castps128_ps512(_mm_castpd_ps(_mm_set_sd(two)));
}

/* the weight stream prefetched into L1 this far ahead (8 KiB measured 43-46 GB/s on 1 thread,
 * without 34-37, 4 KiB 40-41; the streaming read: 42-44) */
#define PREFETCH_Q8 8192

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
        _mm_prefetch((const char *)(q + (size_t)(B) * 32) + PREFETCH_Q8, _MM_HINT_T0);                  \
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
