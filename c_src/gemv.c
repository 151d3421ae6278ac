/* The GEMV entry point: checks every argument, quantises the activation once for the integer
 * formats, and splits the rows over the context's threads.  Each output row is computed whole by
 * one thread with the path's row kernel, so the result does not depend on the thread count. */
#include "internal.h"

int d2m_is_quantized(int format) {
    return format == D2M_Q8 || format == D2M_Q4G;
}

int d2m_check_matrix(const d2m_matrix *w) {
    if (!w || !w->data)
        return D2M_ERR_NULL;
    if (w->format < D2M_F32 || w->format > D2M_Q4G)
        return D2M_ERR_FORMAT;
    if (w->rows <= 0 || w->cols <= 0 || w->rows > D2M_MAX_DIM || w->cols > D2M_MAX_DIM)
        return D2M_ERR_SIZE;
    if (w->format == D2M_Q4G) {
        if (w->group != 32 && w->group != 64 && w->group != 128)
            return D2M_ERR_FORMAT;
    } else if (w->group != 0) {
        return D2M_ERR_FORMAT;
    }
    if (d2m_is_quantized(w->format) != (w->scales != NULL))
        return w->scales ? D2M_ERR_FORMAT : D2M_ERR_NULL;
    return D2M_OK;
}

static size_t round64(size_t n) {
    return (n + 63) & ~(size_t)63;
}

void *d2m_align64(void *p) {
    return (void *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

size_t d2m_matrix_bytes(const d2m_matrix *w) {
    const size_t rows = (size_t)w->rows, cols = (size_t)w->cols;
    switch (w->format) {
    case D2M_F32:
        return rows * cols * 4;
    case D2M_F16:
    case D2M_BF16:
        return rows * cols * 2;
    case D2M_Q8:
        return rows * cols + rows * 4;
    default: {
        const size_t nblk = (size_t)d2m_act_blocks(w->cols);
        const size_t ngroups = (cols + (size_t)w->group - 1) / (size_t)w->group;
        return rows * (nblk * 16 + ngroups * 2);
    }
    }
}

int d2m_chunk_rows(const d2m_ctx *ctx, const d2m_matrix *w) {
    const size_t bytes = d2m_matrix_bytes(w), rows = (size_t)w->rows;
    if (ctx->chunk_bytes == 0) {  /* each thread's share in k equal chunks (internal.h) */
        const size_t share = bytes / (size_t)ctx->threads;
        size_t k = share / D2M_CHUNK_MIN_BYTES;
        k = k < 1 ? 1 : k > D2M_CHUNKS_PER_THREAD ? D2M_CHUNKS_PER_THREAD : k;
        const size_t k_max = (share + D2M_CHUNK_MAX_BYTES - 1) / D2M_CHUNK_MAX_BYTES;
        k = k < k_max ? k_max : k;
        const size_t chunks = k * (size_t)ctx->threads;
        return (int)((rows + chunks - 1) / chunks);
    }
    const size_t row_bytes = bytes / rows;
    const size_t n = ctx->chunk_bytes / (row_bytes ? row_bytes : 1);
    return n < 1 ? 1 : n > rows ? w->rows : (int)n;
}

/* Activations of n_tok tokens [n_tok][cols]; for the integer formats quantised into scratch, in
 * the layouts `reads` names (the others are left NULL, so a kernel reading one would fail loudly). */
void d2m_acts_prepare(d2m_acts *acts, const float *x, int cols, int n_tok, unsigned reads,
                      const d2m_path *path, void **scratch) {
    acts->x = x;
    acts->ldx = cols;
    acts->n_tok = n_tok;
    acts->q = NULL;
    acts->d = NULL;
    acts->pairs8 = NULL;
    acts->q4x = NULL;
    acts->q4neg = NULL;
    acts->ldq = acts->ldd = acts->ldp = acts->ldq4x = acts->ldq4n = 0;
    if (!reads)
        return;
    const int nblk = d2m_act_blocks(cols);
    int8_t *q = (int8_t *)*scratch;
    float *d = (float *)((char *)q + round64((size_t)n_tok * (size_t)nblk * D2M_QBLOCK));
    int16_t *p = (int16_t *)((char *)d + round64((size_t)n_tok * (size_t)nblk * sizeof(float)));
    const int nquad = d2m_act_quads(cols);
    int8_t *q4x = (int8_t *)((char *)p + round64((size_t)n_tok * (size_t)nblk * 16 * sizeof(int16_t)));
    int32_t *q4neg = (int32_t *)((char *)q4x + round64((size_t)n_tok * (size_t)nquad * 128));
    for (int t = 0; t < n_tok; t++) {
        const d2m_act_buf buf = {q + (size_t)t * nblk * D2M_QBLOCK, d + (size_t)t * nblk, p + (size_t)t * nblk * 16,
                                 q4x + (size_t)t * nquad * 128, q4neg + (size_t)t * nquad * 16};
        path->prepare(&buf, x + (size_t)t * cols, cols, reads);
    }
    acts->q = q;
    acts->d = d;
    acts->ldq = nblk * D2M_QBLOCK;
    acts->ldd = nblk;
    if (reads & D2M_ACT_PAIRS8) {
        acts->pairs8 = p;
        acts->ldp = nblk * 16;
    }
    if (reads & D2M_ACT_Q4) {
        acts->q4x = q4x;
        acts->q4neg = q4neg;
        acts->ldq4x = nquad * 128;
        acts->ldq4n = nquad * 16;
    }
    *scratch = (char *)q4neg + round64((size_t)n_tok * (size_t)nquad * 16 * sizeof(int32_t));
}

size_t d2m_acts_bytes(int cols, int n_tok) {
    const size_t nblk = (size_t)d2m_act_blocks(cols);
    return round64((size_t)n_tok * nblk * D2M_QBLOCK) + round64((size_t)n_tok * nblk * sizeof(float)) +
           round64((size_t)n_tok * nblk * 16 * sizeof(int16_t)) +
           round64((size_t)n_tok * (size_t)d2m_act_quads(cols) * 128) +
           round64((size_t)n_tok * (size_t)d2m_act_quads(cols) * 16 * sizeof(int32_t));
}

#define TILE_ROWS 64  /* rows whose dots are formed together; a tile is re-read from cache per token */

void d2m_rows(float *y, int ldy, const d2m_matrix *w, d2m_dot_fn dot, int r0, int r1,
              const d2m_acts *acts, float alpha, const float *alphas, int accumulate) {
    float v[TILE_ROWS];
    for (int lo = r0; lo < r1; lo += TILE_ROWS) {
        const int hi = lo + TILE_ROWS < r1 ? lo + TILE_ROWS : r1;
        for (int t = 0; t < acts->n_tok; t++) {
            d2m_act a;
            a.x = acts->x + (size_t)t * (size_t)acts->ldx;
            a.q = acts->q ? acts->q + (size_t)t * (size_t)acts->ldq : NULL;
            a.d = acts->d ? acts->d + (size_t)t * (size_t)acts->ldd : NULL;
            a.pairs8 = acts->pairs8 ? acts->pairs8 + (size_t)t * (size_t)acts->ldp : NULL;
            a.q4x = acts->q4x ? acts->q4x + (size_t)t * (size_t)acts->ldq4x : NULL;
            a.q4neg = acts->q4neg ? acts->q4neg + (size_t)t * (size_t)acts->ldq4n : NULL;
            dot(v, w, lo, hi, &a);
            const float scale = alphas ? alphas[t] : alpha;
            float *out = y + (size_t)t * (size_t)ldy;
            /* two roundings (product, then sum): -ffp-contract=off keeps them apart, which is
             * what NumPy's y + w * v does */
            for (int r = lo; r < hi; r++)
                out[r] = accumulate ? out[r] + scale * v[r - lo] : scale * v[r - lo];
        }
    }
}

void d2m_run(d2m_ctx *ctx, d2m_task_fn fn, void *arg, int n_chunks, size_t work_bytes) {
    if (ctx->pool && n_chunks > 1 && work_bytes >= ctx->parallel_min_bytes) {
        d2m_pool_run(ctx->pool, fn, arg, n_chunks);
        return;
    }
    for (int c = 0; c < n_chunks; c++)
        fn(arg, c);
}

typedef struct gemv_job {
    float *y;
    const d2m_matrix *w;
    d2m_dot_fn dot;
    const d2m_acts *acts;
    float alpha;
    int accumulate;
    int chunk_rows;
} gemv_job;

static void gemv_task(void *arg, int chunk) {
    const gemv_job *job = (const gemv_job *)arg;
    const int r0 = chunk * job->chunk_rows;
    const int r1 = r0 + job->chunk_rows < job->w->rows ? r0 + job->chunk_rows : job->w->rows;
    d2m_rows(job->y, job->w->rows, job->w, job->dot, r0, r1, job->acts, job->alpha, NULL, job->accumulate);
}

size_t d2m_gemv_scratch_bytes(const d2m_matrix *w, int n_tok) {
    if (d2m_check_matrix(w) != D2M_OK || n_tok <= 0 || n_tok > D2M_MAX_TOKENS)
        return 0;
    return d2m_is_quantized(w->format) ? 64 + d2m_acts_bytes(w->cols, n_tok) : 0;
}

int d2m_gemv(float *y, const d2m_matrix *w, const float *x, int n_tok, float alpha, int accumulate,
             void *scratch, size_t scratch_bytes, d2m_ctx *ctx) {
    if (!y || !x || !ctx)
        return D2M_ERR_NULL;
    const int status = d2m_check_matrix(w);
    if (status != D2M_OK)
        return status;
    if (n_tok <= 0 || n_tok > D2M_MAX_TOKENS)
        return D2M_ERR_SIZE;
    const size_t need = d2m_gemv_scratch_bytes(w, n_tok);
    if (need && !scratch)
        return D2M_ERR_NULL;
    if (scratch_bytes < need)
        return D2M_ERR_SCRATCH;
    void *cursor = scratch ? d2m_align64(scratch) : NULL;
    d2m_acts acts;
    d2m_acts_prepare(&acts, x, w->cols, n_tok, ctx->path->reads[w->format], ctx->path, &cursor);
    gemv_job job = {y, w, ctx->path->dot[w->format], &acts, alpha, accumulate != 0, d2m_chunk_rows(ctx, w)};
    const int n_chunks = (w->rows + job.chunk_rows - 1) / job.chunk_rows;
    d2m_run(ctx, gemv_task, &job, n_chunks, d2m_matrix_bytes(w));
    return D2M_OK;
}
