/* Internal declarations shared by the C kernel units: the activation a dot product reads, the
 * per-path table of row kernels, the thread pool.  Nothing here is part of the public API. */
#ifndef D2M_INTERNAL_H
#define D2M_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "d2m_kernels.h"

/* One token's activation as the row kernels read it: the float vector, and for the integer
 * formats its quantised form (spec/kernels.md §3): q [nblk*32] zero padded, d [nblk]. */
typedef struct d2m_act {
    const float *x;
    const int8_t *q;
    const float *d;
    const int16_t *pairs8;  /* [nblk*16]: 8 * (q[2i] + q[2i+1]) of each column pair (AVX-512 Q8) */
    /* q in the order of a Q4 quad (4 blocks, 128 columns) split into nibbles (d2m_act_q4_split):
     * [nquad*128], and the Q4 offset of each 8-column lane [nquad*16]; nquad = ceil(nblk/4) */
    const int8_t *q4x;
    const int32_t *q4neg;
} d2m_act;

/* out[i] = dot(W[r0 + i], x) for the rows [r0, r1) of one format: the unit every path implements
 * (one function call for many rows keeps per-row overhead out of short rows).  Each row's dot is
 * computed the same way wherever the range starts, so results never depend on how rows are split.
 * Sizes were checked by the caller (gemv.c); a kernel never fails. */
typedef void (*d2m_dot_fn)(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);

/* Sum modulo 2^64 of the 64-bit words of [p, p + n) (n a multiple of 8 words), read as fast as the
 * path can. */
typedef uint64_t (*d2m_stream_fn)(const uint64_t *p, size_t n);

/* What a dot kernel reads of a token's activation besides x: bits of d2m_path.reads. */
#define D2M_ACT_Q 1u       /* q, d: the quantised activation (spec/kernels.md §3) */
#define D2M_ACT_PAIRS8 2u  /* pairs8 */
#define D2M_ACT_Q4 4u      /* q4x, q4neg */

/* Where one token's quantised activation is written; each array as d2m_act describes it. */
typedef struct d2m_act_buf {
    int8_t *q;
    float *d;
    int16_t *pairs8;
    int8_t *q4x;
    int32_t *q4neg;
} d2m_act_buf;

/* Quantise x [cols] into q, d and the layouts `reads` names (D2M_ACT_* bits; buffers of layouts
 * not named are left alone).  Every path's function writes the same bytes as the portable one
 * (d2m_act_prepare_portable, quant_act.c): only the speed differs. */
typedef void (*d2m_prepare_fn)(const d2m_act_buf *out, const float *x, int cols, unsigned reads);

typedef struct d2m_path {
    const char *name;
    int (*supported)(void);     /* compiled without special flags: safe to call on any CPU */
    d2m_dot_fn dot[5];          /* indexed by D2M_F32 ... D2M_Q4G */
    unsigned char reads[5];     /* D2M_ACT_* bits each dot kernel reads (0: x only) */
    d2m_prepare_fn prepare;
    d2m_stream_fn stream;
} d2m_path;

struct d2m_pool;

struct d2m_ctx {
    const d2m_path *path;
    struct d2m_pool *pool;      /* NULL when threads == 1 */
    int threads;
    size_t parallel_min_bytes;  /* d2m_ctx_tune */
    size_t chunk_bytes;         /* 0: by matrix size (D2M_CHUNK_MIN_BYTES ... _MAX_BYTES) */
};

#define D2M_DEFAULT_PARALLEL_MIN_BYTES ((size_t)1 << 20)
/* Default chunks: each thread's share of a matrix cut into k equal runs of rows, k = share / 1 MiB
 * within 1..D2M_CHUNKS_PER_THREAD, raised until a chunk is at most 2 MiB (a share under 1 MiB is
 * one chunk, however small).  Long runs keep each thread's stream sequential (every chunk
 * restarts the prefetch): 64 KiB chunks measured 42-46 GB/s for f32 on 2 threads, 256 KiB 52-61
 * (the streaming read: 49-56); a 2.25 MB int4 expert matrix on 2 threads went from 78-81 % of the
 * read in 280 KB chunks to 90-91 % in one chunk per thread (paired, in one process).  Several
 * chunks per thread on big matrices keep threads busy to the end when one is slowed. */
#define D2M_CHUNK_MIN_BYTES ((size_t)1 << 20)
#define D2M_CHUNK_MAX_BYTES ((size_t)1 << 21)
#define D2M_CHUNKS_PER_THREAD 4

/* ---- scalar reference row kernels (gemv_f32.c ... gemv_q4.c) ---- */
void d2m_dot_f32_scalar(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_f16_scalar(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_bf16_scalar(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_q8_scalar(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_q4g_scalar(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
uint64_t d2m_stream_scalar(const uint64_t *p, size_t n);

/* ---- SIMD units, each compiled with its own -march (simd_*.c) ---- */
#ifdef D2M_HAVE_AVX2
void d2m_dot_f32_avx2(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_f16_avx2(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_bf16_avx2(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_q8_avx2(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_q4g_avx2(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
uint64_t d2m_stream_avx2(const uint64_t *p, size_t n);
void d2m_act_prepare_avx2(const d2m_act_buf *out, const float *x, int cols, unsigned reads);
#endif
#ifdef D2M_HAVE_AVX512
void d2m_act_prepare_avx512(const d2m_act_buf *out, const float *x, int cols, unsigned reads);
void d2m_dot_f16_avx512(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_bf16_avx512(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_q8_avx512(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_q4g_avx512(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
#endif
#ifdef D2M_HAVE_NEON
void d2m_dot_f32_neon(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_f16_neon(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_bf16_neon(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_q8_neon(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_q4g_neon(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
uint64_t d2m_stream_neon(const uint64_t *p, size_t n);
#endif
#ifdef D2M_HAVE_DOTPROD
void d2m_dot_q8_dotprod(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
void d2m_dot_q4g_dotprod(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x);
#endif

/* ---- dispatch.c ---- */
const d2m_path *d2m_find_path(const char *name, int *status);

/* ---- quant_act.c ---- */
int d2m_act_blocks(int cols);   /* ceil(cols / 32) */

/* Where row `row` of a Q4G matrix lives (spec/quant.md §3): 16 packed bytes per 32-column block,
 * then one binary16 scale per group of `group` columns.  Every path reads rows through this, so
 * the layout is written once. */
typedef struct d2m_q4g_row {
    const uint8_t *packed;    /* [nblk][16] */
    const uint16_t *scales;   /* [ceil(cols / group)] */
    int nblk;                 /* 32-column blocks */
    int ngroups;              /* scale groups */
    int shift;                /* log2(group / 32): block index >> shift = group index */
} d2m_q4g_row;

static inline d2m_q4g_row d2m_q4g_row_at(const d2m_matrix *w, int row) {
    const int nblk = d2m_act_blocks(w->cols);
    const int ngroups = (w->cols + w->group - 1) / w->group;
    d2m_q4g_row r;
    r.packed = (const uint8_t *)w->data + (size_t)row * (size_t)nblk * 16;
    r.scales = (const uint16_t *)w->scales + (size_t)row * (size_t)ngroups;
    r.nblk = nblk;
    r.ngroups = ngroups;
    r.shift = w->group == 32 ? 0 : w->group == 64 ? 1 : 2;
    return r;
}

/* r moved to the next row of its matrix (a range's rows without recomputing the layout per row) */
static inline void d2m_q4g_row_next(d2m_q4g_row *r) {
    r->packed += (size_t)r->nblk * 16;
    r->scales += r->ngroups;
}
void d2m_quantize_act_row(int8_t *xq, float *xd, const float *x, int cols);
/* The quantised activation of x [cols] with a path's whole-block quantiser (32 columns, the
 * portable bytes); a partial last block takes the portable code.  Inline, so each SIMD unit's
 * block function is inlined into its own copy. */
static inline void d2m_quantize_act_blocks(int8_t *xq, float *xd, const float *x, int cols,
                                           void (*block)(int8_t *q, float *d, const float *x)) {
    const int nblk = d2m_act_blocks(cols), full = cols / D2M_QBLOCK;
    for (int b = 0; b < full; b++)
        block(xq + (size_t)b * D2M_QBLOCK, xd + b, x + (size_t)b * D2M_QBLOCK);
    if (full < nblk)
        d2m_quantize_act_row(xq + (size_t)full * D2M_QBLOCK, xd + full, x + (size_t)full * D2M_QBLOCK,
                             cols - full * D2M_QBLOCK);
}
void d2m_act_prepare_portable(const d2m_act_buf *out, const float *x, int cols, unsigned reads);
/* pairs8[i] = 8 * (xq[2i] + xq[2i+1]) for the nblk*16 column pairs of a quantised row */
void d2m_act_pairs8(int16_t *pairs8, const int8_t *xq, int cols);
int d2m_act_quads(int cols);    /* ceil(cols / 128) */
/* For each quad k of 4 blocks (128 columns, zero padded): q4x[128k + 16i + j] = xq[32(4k+i) + j]
 * (i < 4: the columns of the blocks' low nibbles), q4x[128k + 64 + 16i + j] = xq[32(4k+i) + 16 + j]
 * (the high nibbles); q4neg[16k + 4i + l] = -8 * (sum of the 8 columns 32(4k+i) + 4l + {0..3} and
 * + 16 + 4l + {0..3}): the layout in which AND and a shift of 64 packed bytes line up with q. */
void d2m_act_q4_split(int8_t *q4x, int32_t *q4neg, const int8_t *xq, int cols);

/* ---- gemv.c: checks and helpers shared by the entry points ---- */
/* The activations of n_tok tokens: x [n_tok][ldx]; quantised q [n_tok][ldq], d [n_tok][ldd]. */
typedef struct d2m_acts {
    const float *x;
    const int8_t *q;
    const float *d;
    const int16_t *pairs8;
    const int8_t *q4x;
    const int32_t *q4neg;
    int ldx, ldq, ldd, ldp, ldq4x, ldq4n, n_tok;
} d2m_acts;

int d2m_check_matrix(const d2m_matrix *w);
int d2m_is_quantized(int format);
void *d2m_align64(void *p);
/* scratch bytes of the quantised activations of n_tok tokens of `cols` features */
size_t d2m_acts_bytes(int cols, int n_tok);
/* Fill acts for x [n_tok][cols]; reads != 0 (D2M_ACT_* bits of the kernels that will read it):
 * quantise with path->prepare into *scratch (64-aligned, d2m_acts_bytes) and advance it. */
void d2m_acts_prepare(d2m_acts *acts, const float *x, int cols, int n_tok, unsigned reads,
                      const d2m_path *path, void **scratch);
/* y[t*ldy + r] = (accumulate ? y : 0) + alpha_t * dot(W[r], x_t) for rows [r0, r1), every token;
 * alpha_t = alphas[t], or alpha when alphas is NULL.  The one place a dot becomes an output. */
void d2m_rows(float *y, int ldy, const d2m_matrix *w, d2m_dot_fn dot, int r0, int r1,
              const d2m_acts *acts, float alpha, const float *alphas, int accumulate);
/* rows per parallel chunk, so that a chunk reads about ctx->chunk_bytes of weights (0: equal
 * chunks per thread, see D2M_CHUNK_MIN_BYTES) */
int d2m_chunk_rows(const d2m_ctx *ctx, const d2m_matrix *w);
size_t d2m_matrix_bytes(const d2m_matrix *w);

/* ---- threads.c ---- */
typedef void (*d2m_task_fn)(void *arg, int chunk);
int d2m_pool_create(struct d2m_pool **out, int threads);
void d2m_pool_destroy(struct d2m_pool *pool);
/* Run fn(arg, c) for every c < n_chunks, on the pool's threads and the caller; returns when all
 * are done.  pool NULL or small work: the caller runs them in order. */
void d2m_pool_run(struct d2m_pool *pool, d2m_task_fn fn, void *arg, int n_chunks);
/* d2m_pool_run on the context's pool when the job is big enough to pay for it, else in order on
 * the calling thread (gemv.c) */
void d2m_run(d2m_ctx *ctx, d2m_task_fn fn, void *arg, int n_chunks, size_t work_bytes);

/* ---- conversions shared by every path (portable C, exact) ---- */
static inline float d2m_bits_to_f32(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* IEEE binary16 -> binary32, exact (subnormals, infinities; NaNs stay NaN, made quiet as the
 * hardware conversions do). */
static inline float d2m_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {
        /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        float v = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -v : v;
    }
    if (exponent == 31)
        return d2m_bits_to_f32(sign | 0x7f800000u | (mantissa << 13) | (mantissa ? 0x00400000u : 0));
    return d2m_bits_to_f32(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

static inline float d2m_bf16_to_f32(uint16_t b) {
    return d2m_bits_to_f32((uint32_t)b << 16);
}

/* Exact sum of n int8 products: the Q8 arithmetic of the scalar reference, and every path's
 * partial last block. */
static inline int32_t d2m_isum_i8(const int8_t *a, const int8_t *b, int n) {
    int32_t sum = 0;
    for (int i = 0; i < n; i++)
        sum += (int32_t)a[i] * (int32_t)b[i];
    return sum;
}

/* A path's row-range kernel from its per-row function: out[i] = ROW(w, r0 + i, x). */
#define D2M_RANGE(NAME, ROW)                                                                      \
    void NAME(float *out, const d2m_matrix *w, int r0, int r1, const d2m_act *x) {              \
        for (int r = r0; r < r1; r++)                                                           \
            out[r - r0] = ROW(w, r, x);                                                         \
    }

#endif /* D2M_INTERNAL_H */
