/* C-level test driver for the kernels: built by .ci/sanitize.sh with ASan + UBSan and by
 * .ci/aarch64.sh for emulated aarch64, linked with every c_src unit of the target.
 *
 * For every path this CPU supports, random cases over every format, odd shapes, token counts and
 * thread counts check that:
 *   - each path is within gamma(C+4) * sum |w^||x^| of the exact dot product (spec/kernels.md §4),
 *     and bit-identical across thread counts;
 *   - y += a.W.x is y + a*(W.x); the top-k call equals k single expert calls bit for bit;
 *   - every path quantises an activation into the same bytes as the portable code;
 *   - every entry point refuses NULL pointers, bad sizes, formats and short scratch with a status;
 *   - the thread pool runs every chunk of every job exactly once (many short jobs, 1-2 callers).
 * Prints one line per failure and closes with "N passed, M failed"; exit status 1 on any failure.
 * Usage: test_kernels [cases per path]   (default 300) */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../c_src/internal.h"

static int passed, failed;

#define CHECK(cond, ...)                                                     \
    do {                                                                     \
        if (cond) {                                                          \
            passed++;                                                        \
        } else {                                                             \
            failed++;                                                        \
            printf("FAIL %s:%d: ", __FILE__, __LINE__);                      \
            printf(__VA_ARGS__);                                             \
            printf("\n");                                                    \
        }                                                                    \
    } while (0)

/* ---- deterministic random numbers (xorshift64*) ---- */
static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t next_u64(void) {
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ull;
}
static int uniform_int(int lo, int hi) { /* [lo, hi] */
    return lo + (int)(next_u64() % (uint64_t)(hi - lo + 1));
}
static float uniform(void) { /* [-1, 1) */
    return (float)((double)(next_u64() >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static uint16_t f32_to_f16_bits(float f) { /* round to nearest even; test values are small and normal */
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    int exponent = (int)((x >> 23) & 0xff) - 127 + 15;
    uint32_t mantissa = x & 0x7fffffu;
    if (exponent <= 0)
        return (uint16_t)sign;
    uint32_t h = sign | ((uint32_t)exponent << 10) | (mantissa >> 13);
    const uint32_t rest = mantissa & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)h;
}

/* ---- a random weight matrix of any format, and its exact values ---- */
typedef struct weight {
    d2m_matrix m;
    void *data, *scales;
    double *exact; /* [rows][cols]: the dequantised value of every weight */
} weight;

static void make_weight(weight *w, int format, int rows, int cols) {
    const size_t n = (size_t)rows * (size_t)cols;
    const int nblk = d2m_act_blocks(cols);
    const int groups[3] = {32, 64, 128};
    const int group = format == D2M_Q4G ? groups[uniform_int(0, 2)] : 0;
    const int ngroups = group ? (cols + group - 1) / group : 0;
    memset(w, 0, sizeof *w);
    w->exact = (double *)calloc(n, sizeof(double));
    switch (format) {
    case D2M_F32: {
        float *d = (float *)malloc(n * 4);
        for (size_t i = 0; i < n; i++)
            w->exact[i] = d[i] = uniform();
        w->data = d;
        break;
    }
    case D2M_F16:
    case D2M_BF16: {
        uint16_t *d = (uint16_t *)malloc(n * 2);
        for (size_t i = 0; i < n; i++) {
            const float v = uniform();
            uint32_t bits;
            memcpy(&bits, &v, 4);
            d[i] = format == D2M_F16 ? f32_to_f16_bits(v) : (uint16_t)(bits >> 16);
            w->exact[i] = format == D2M_F16 ? d2m_f16_to_f32(d[i]) : d2m_bf16_to_f32(d[i]);
        }
        w->data = d;
        break;
    }
    case D2M_Q8: {
        int8_t *q = (int8_t *)malloc(n);
        float *s = (float *)malloc((size_t)rows * 4);
        for (int r = 0; r < rows; r++) {
            s[r] = 0.001f + 0.05f * fabsf(uniform());
            for (int c = 0; c < cols; c++) {
                q[(size_t)r * cols + c] = (int8_t)uniform_int(-128, 127);
                w->exact[(size_t)r * cols + c] = (double)q[(size_t)r * cols + c] * s[r];
            }
        }
        w->data = q;
        w->scales = s;
        break;
    }
    default: {
        uint8_t *p = (uint8_t *)malloc((size_t)rows * nblk * 16);
        uint16_t *s = (uint16_t *)malloc((size_t)rows * ngroups * 2);
        for (size_t i = 0; i < (size_t)rows * nblk * 16; i++)
            p[i] = (uint8_t)next_u64();
        for (size_t i = 0; i < (size_t)rows * ngroups; i++)
            s[i] = f32_to_f16_bits(0.001f + 0.05f * fabsf(uniform()));
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < cols; c++) {
                const uint8_t byte = p[((size_t)r * nblk + c / 32) * 16 + (c % 32) % 16];
                const int nibble = (c % 32) < 16 ? byte & 15 : byte >> 4;
                w->exact[(size_t)r * cols + c] = (nibble - 8) * (double)d2m_f16_to_f32(s[(size_t)r * ngroups + c / group]);
            }
        w->data = p;
        w->scales = s;
    }
    }
    w->m.format = format;
    w->m.rows = rows;
    w->m.cols = cols;
    w->m.group = group;
    w->m.data = w->data;
    w->m.scales = w->scales;
}

static void free_weight(weight *w) {
    free(w->data);
    free(w->scales);
    free(w->exact);
}

static d2m_ctx *context(const char *path, int threads) {
    d2m_ctx *ctx = NULL;
    if (d2m_ctx_create(&ctx, path, threads) != D2M_OK)
        return NULL;
    d2m_ctx_tune(ctx, 0, 1); /* one row per chunk, no minimum: tiny matrices use every thread */
    return ctx;
}

/* A context with the default split: one thread runs a call's rows as whole ranges, as real calls
 * do, so the row-range kernels' work across rows (a Q4G range's layout, computed once) is checked;
 * `context` (one row per chunk) never gives a kernel more than one row. */
static d2m_ctx *context_whole_ranges(const char *path) {
    d2m_ctx *ctx = NULL;
    return d2m_ctx_create(&ctx, path, 1) == D2M_OK ? ctx : NULL;
}

static void *scratch_for(size_t n) {
    return malloc(n ? n : 1);
}

/* x^: x itself, or its quantised form d * q for the integer formats */
static void effective_input(double *xhat, const float *x, int cols, int quantized) {
    if (!quantized) {
        for (int c = 0; c < cols; c++)
            xhat[c] = x[c];
        return;
    }
    const int nblk = d2m_act_blocks(cols);
    int8_t *q = (int8_t *)malloc((size_t)nblk * 32);
    float *d = (float *)malloc((size_t)nblk * 4);
    d2m_quantize_act(q, d, x, cols);
    for (int c = 0; c < cols; c++)
        xhat[c] = (double)d[c / 32] * q[c];
    free(q);
    free(d);
}

static int gemv(d2m_ctx *ctx, float *y, const d2m_matrix *m, const float *x, int n_tok, float alpha, int acc) {
    const size_t need = d2m_gemv_scratch_bytes(m, n_tok);
    void *scratch = scratch_for(need);
    const int status = d2m_gemv(y, m, x, n_tok, alpha, acc, scratch, need, ctx);
    free(scratch);
    return status;
}

/* ---- the GEMV cases ---- */
static void gemv_case(const char *path) {
    const int format = uniform_int(0, 4);
    const int rows = uniform_int(1, 50), cols = uniform_int(1, 300), n_tok = uniform_int(1, 3);
    const int threads = uniform_int(2, 4);
    weight w;
    make_weight(&w, format, rows, cols);
    float *x = (float *)malloc((size_t)n_tok * cols * 4);
    for (int i = 0; i < n_tok * cols; i++)
        x[i] = uniform() * 4.0f;
    float *y1 = (float *)calloc((size_t)n_tok * rows, 4), *yt = (float *)calloc((size_t)n_tok * rows, 4);
    float *ya = (float *)malloc((size_t)n_tok * rows * 4);
    d2m_ctx *one = context_whole_ranges(path), *many = context(path, threads);
    CHECK(one && many, "context for path %s", path);
    CHECK(gemv(one, y1, &w.m, x, n_tok, 1.0f, 0) == D2M_OK, "gemv status");
    CHECK(gemv(many, yt, &w.m, x, n_tok, 1.0f, 0) == D2M_OK, "gemv status, %d threads", threads);
    CHECK(memcmp(y1, yt, (size_t)n_tok * rows * 4) == 0, "%s format %d %dx%d: %d threads differ from 1",
          path, format, rows, cols, threads);
    double *xhat = (double *)malloc((size_t)cols * sizeof(double));
    const double u = ldexp(1.0, -24), gamma = (cols + 4) * u / (1 - (cols + 4) * u);
    for (int t = 0; t < n_tok; t++) {
        effective_input(xhat, x + (size_t)t * cols, cols, d2m_is_quantized(format));
        for (int r = 0; r < rows; r++) {
            double exact = 0, size = 0;
            for (int c = 0; c < cols; c++) {
                exact += w.exact[(size_t)r * cols + c] * xhat[c];
                size += fabs(w.exact[(size_t)r * cols + c] * xhat[c]);
            }
            const double err = fabs(y1[(size_t)t * rows + r] - exact);
            if (!(err <= gamma * size * (1 + 1e-9) + 1e-300)) {
                CHECK(0, "%s format %d %dx%d row %d: |y - exact| = %g > bound %g", path, format, rows, cols, r,
                      err, gamma * size);
                t = n_tok;
                break;
            }
        }
    }
    passed++;
    /* y += alpha W x  ==  y + alpha * (W x) */
    for (int i = 0; i < n_tok * rows; i++)
        ya[i] = uniform();
    float *expect = (float *)malloc((size_t)n_tok * rows * 4);
    for (int i = 0; i < n_tok * rows; i++)
        expect[i] = ya[i] + -0.75f * y1[i];
    CHECK(gemv(many, ya, &w.m, x, n_tok, -0.75f, 1) == D2M_OK, "accumulate status");
    CHECK(memcmp(ya, expect, (size_t)n_tok * rows * 4) == 0, "%s: y += a W x", path);
    free(expect);
    free(xhat);
    d2m_ctx_destroy(one);
    d2m_ctx_destroy(many);
    free(x);
    free(y1);
    free(yt);
    free(ya);
    free_weight(&w);
}

/* ---- expert and top-k: top-k equals k expert calls, bit for bit, on every thread count ---- */
static void topk_case(const char *path) {
    const int format = uniform_int(0, 4);
    const int H = uniform_int(1, 200), F = uniform_int(1, 80), E = uniform_int(1, 5), k = uniform_int(1, E);
    weight parts[5][3];
    d2m_mlp experts[5];
    for (int e = 0; e < E; e++) {
        make_weight(&parts[e][0], format, F, H);
        make_weight(&parts[e][1], format, F, H);
        make_weight(&parts[e][2], format, H, F);
        experts[e].gate = parts[e][0].m;
        experts[e].up = parts[e][1].m;
        experts[e].down = parts[e][2].m;
    }
    int32_t ids[5];
    float weights[5];
    int order[5] = {0, 1, 2, 3, 4};
    for (int i = E - 1; i > 0; i--) { /* shuffle */
        const int j = uniform_int(0, i), tmp = order[i];
        order[i] = order[j];
        order[j] = tmp;
    }
    for (int j = 0; j < k; j++) {
        ids[j] = order[j];
        weights[j] = 0.1f + fabsf(uniform());
    }
    float *x = (float *)malloc((size_t)H * 4), *y = (float *)malloc((size_t)H * 4), *ref = (float *)malloc((size_t)H * 4);
    for (int c = 0; c < H; c++)
        x[c] = uniform() * 2.0f;
    d2m_ctx *one = context(path, 1), *many = context(path, uniform_int(2, 4));
    for (int j = 0; j < k; j++) {
        const size_t need = d2m_expert_scratch_bytes(&experts[ids[j]], 1);
        void *scratch = scratch_for(need);
        CHECK(d2m_expert(ref, &experts[ids[j]], x, 1, &weights[j], j > 0, scratch, need, one) == D2M_OK, "expert");
        free(scratch);
    }
    d2m_ctx *ctxs[2] = {one, many};
    for (int i = 0; i < 2; i++) {
        const size_t need = d2m_topk_scratch_bytes(experts, E, k);
        void *scratch = scratch_for(need);
        CHECK(d2m_experts_topk(y, experts, E, ids, weights, k, x, scratch, need, ctxs[i]) == D2M_OK, "topk");
        CHECK(memcmp(y, ref, (size_t)H * 4) == 0, "%s format %d H=%d F=%d k=%d: top-k differs from k experts",
              path, format, H, F, k);
        free(scratch);
    }
    d2m_ctx_destroy(one);
    d2m_ctx_destroy(many);
    free(x);
    free(y);
    free(ref);
    for (int e = 0; e < E; e++)
        for (int p = 0; p < 3; p++)
            free_weight(&parts[e][p]);
}

/* ---- what the entry points refuse ---- */
/* ---- activation quantisation: every path's prepare writes the portable bytes ---- */
static float awkward_value(void) {
    switch (uniform_int(0, 9)) {
    case 0:
        return 0.0f;
    case 1: /* a tie for x·(127/amax): k + 1/2 steps of amax/127 */
        return (float)(uniform_int(-127, 126) + 0.5) / 127.0f;
    case 2:
        return ldexpf(uniform(), -130); /* subnormal: amax too small, d = 0 */
    case 3:
        return ldexpf(uniform(), uniform_int(-60, 60));
    case 4:
        return uniform_int(0, 40) == 0 ? (uniform_int(0, 1) ? NAN : -INFINITY) : uniform();
    default:
        return uniform() * 3.0f;
    }
}

static void prepare_case(const char *path_name) {
    int status;
    const d2m_path *path = d2m_find_path(path_name, &status);
    CHECK(path != NULL, "path %s", path_name);
    if (!path)
        return;
    const int cols = uniform_int(1, 700), nblk = d2m_act_blocks(cols), nquad = d2m_act_quads(cols);
    float *x = (float *)malloc((size_t)cols * 4);
    /* plain, awkward values, whole zero blocks, exact ties (amax 127 so inv = 1, the others k + 1/2),
     * whole blocks too small for 127/amax (d = 0 with amax > 0) */
    const int mode = uniform_int(0, 4);
    for (int c = 0; c < cols; c++) {
        if (mode == 3)
            x[c] = c % 32 == 0 ? (uniform_int(0, 1) ? 127.0f : -127.0f) : (float)uniform_int(-127, 126) + 0.5f;
        else if (mode == 4)
            x[c] = (c / 32) % 2 ? ldexpf(uniform(), -125) : uniform();
        else
            x[c] = mode == 1 ? awkward_value() : mode == 2 && (c / 32) % 2 ? 0.0f : uniform() * 2.0f;
    }
    d2m_act_buf got[2];
    void *mem[2];
    const size_t sizes[5] = {(size_t)nblk * 32, (size_t)nblk * 4, (size_t)nblk * 32, (size_t)nquad * 128,
                             (size_t)nquad * 64};
    for (int k = 0; k < 2; k++) {
        mem[k] = calloc(1, sizes[0] + sizes[1] + sizes[2] + sizes[3] + sizes[4] + 5 * 64);
        char *at = (char *)d2m_align64(mem[k]);
        got[k].q = (int8_t *)at;
        got[k].d = (float *)(at = (char *)d2m_align64(at + sizes[0]));
        got[k].pairs8 = (int16_t *)(at = (char *)d2m_align64(at + sizes[1]));
        got[k].q4x = (int8_t *)(at = (char *)d2m_align64(at + sizes[2]));
        got[k].q4neg = (int32_t *)d2m_align64(at + sizes[3]);
    }
    const unsigned all = D2M_ACT_Q | D2M_ACT_PAIRS8 | D2M_ACT_Q4;
    d2m_act_prepare_portable(&got[0], x, cols, all);
    path->prepare(&got[1], x, cols, all);
    CHECK(memcmp(got[0].q, got[1].q, sizes[0]) == 0, "%s: q differs from portable, %d cols", path_name, cols);
    CHECK(memcmp(got[0].d, got[1].d, sizes[1]) == 0, "%s: d differs from portable, %d cols", path_name, cols);
    CHECK(memcmp(got[0].pairs8, got[1].pairs8, sizes[2]) == 0, "%s: pairs8 differs, %d cols", path_name, cols);
    CHECK(memcmp(got[0].q4x, got[1].q4x, sizes[3]) == 0, "%s: q4x differs, %d cols", path_name, cols);
    CHECK(memcmp(got[0].q4neg, got[1].q4neg, sizes[4]) == 0, "%s: q4neg differs, %d cols", path_name, cols);
    free(mem[0]);
    free(mem[1]);
    free(x);
}

static void refusals(void) {
    d2m_ctx *ctx = context(NULL, 2);
    float w[32] = {0}, x[8] = {0}, y[4] = {0};
    d2m_matrix m = {D2M_F32, 4, 8, 0, w, NULL};
    d2m_matrix bad = m;
    CHECK(d2m_gemv(y, &m, x, 1, 1.0f, 0, NULL, 0, ctx) == D2M_OK, "plain gemv");
    CHECK(d2m_gemv(NULL, &m, x, 1, 1.0f, 0, NULL, 0, ctx) == D2M_ERR_NULL, "NULL y");
    CHECK(d2m_gemv(y, NULL, x, 1, 1.0f, 0, NULL, 0, ctx) == D2M_ERR_NULL, "NULL matrix");
    CHECK(d2m_gemv(y, &m, NULL, 1, 1.0f, 0, NULL, 0, ctx) == D2M_ERR_NULL, "NULL x");
    CHECK(d2m_gemv(y, &m, x, 1, 1.0f, 0, NULL, 0, NULL) == D2M_ERR_NULL, "NULL ctx");
    CHECK(d2m_gemv(y, &m, x, 0, 1.0f, 0, NULL, 0, ctx) == D2M_ERR_SIZE, "0 tokens");
    bad.rows = -1;
    CHECK(d2m_gemv(y, &bad, x, 1, 1.0f, 0, NULL, 0, ctx) == D2M_ERR_SIZE, "negative rows");
    bad = m;
    bad.format = 7;
    CHECK(d2m_gemv(y, &bad, x, 1, 1.0f, 0, NULL, 0, ctx) == D2M_ERR_FORMAT, "unknown format");
    bad = m;
    bad.format = D2M_Q4G;
    bad.group = 16;
    bad.scales = w;
    CHECK(d2m_gemv(y, &bad, x, 1, 1.0f, 0, NULL, 0, ctx) == D2M_ERR_FORMAT, "group 16");
    bad.group = 32;
    const size_t need = d2m_gemv_scratch_bytes(&bad, 1);
    void *scratch = malloc(need);
    CHECK(d2m_gemv(y, &bad, x, 1, 1.0f, 0, scratch, need - 1, ctx) == D2M_ERR_SCRATCH, "short scratch");
    free(scratch);
    d2m_ctx *none = NULL;
    CHECK(d2m_ctx_create(&none, "no-such-path", 1) == D2M_ERR_PATH && none == NULL, "unknown path");
    CHECK(d2m_ctx_create(&none, NULL, 0) == D2M_ERR_THREADS, "0 threads");
    uint64_t sum;
    CHECK(d2m_stream_read(&sum, w, 100, ctx) == D2M_ERR_SIZE, "stream size");
    double seconds = -1.0;
    d2m_matrix pair[2] = {m, m}, three[3] = {m, m, m};
    pair[1].cols = 0;
    CHECK(d2m_gemv_pass(&seconds, y, pair, 1, x, NULL, 0, ctx) == D2M_OK && seconds >= 0.0, "pass");
    CHECK(d2m_gemv_pass(&seconds, y, pair, 2, x, NULL, 0, ctx) == D2M_ERR_SIZE, "pass: the 2nd matrix's error");
    for (int bad_at = 0; bad_at < 3; bad_at++) {  /* every matrix of the pass is run */
        three[bad_at].rows = 0;
        CHECK(d2m_gemv_pass(&seconds, y, three, 3, x, NULL, 0, ctx) == D2M_ERR_SIZE, "pass: matrix %d not run", bad_at);
        three[bad_at].rows = m.rows;
    }
    CHECK(d2m_gemv_pass(&seconds, y, pair, 0, x, NULL, 0, ctx) == D2M_ERR_SIZE, "pass: no matrices");
    CHECK(d2m_gemv_pass(NULL, y, pair, 1, x, NULL, 0, ctx) == D2M_ERR_NULL, "pass: NULL seconds");
    d2m_ctx_destroy(ctx);
}

/* ---- the thread pool: every chunk of every job runs exactly once, whoever runs it ---- */
#include <pthread.h>

typedef struct pool_job {
    int *runs;  /* [n]: times chunk c ran */
    int n;
} pool_job;

static void count_chunk(void *arg, int chunk) {
    pool_job *job = (pool_job *)arg;
    job->runs[chunk]++;  /* a chunk run twice at once is a data race ThreadSanitizer reports */
    if (chunk % 7 == 3)  /* uneven chunks, so threads interleave differently */
        for (volatile int i = 0; i < 200; i++) {
        }
}

typedef struct pool_caller {
    struct d2m_pool *pool;
    int jobs, bad;
    unsigned seed;
} pool_caller;

static void *pool_calls(void *arg) {
    pool_caller *me = (pool_caller *)arg;
    int runs[64];
    for (int j = 0; j < me->jobs; j++) {
        me->seed = me->seed * 1103515245u + 12345u;
        pool_job job = {runs, 2 + (int)(me->seed >> 16) % 63};
        memset(runs, 0, sizeof runs);
        d2m_pool_run(me->pool, count_chunk, &job, job.n);
        for (int c = 0; c < 64; c++)
            me->bad += runs[c] != (c < job.n);
    }
    return NULL;
}

/* Many short jobs back to back on 2-4 threads, from one calling thread and from two sharing the
 * pool (jobs are serialised): each chunk of each job ran once, none past the job's count. */
static void pool_stress(int jobs) {
    for (int threads = 2; threads <= 4; threads++) {
        struct d2m_pool *pool = NULL;
        CHECK(d2m_pool_create(&pool, threads) == D2M_OK, "pool of %d threads", threads);
        if (!pool)
            continue;
        pool_caller one = {pool, jobs, 0, 1u + (unsigned)threads};
        pool_calls(&one);
        CHECK(one.bad == 0, "pool, %d threads: %d chunks ran other than once", threads, one.bad);
        pool_caller two[2] = {{pool, jobs / 2, 0, 7u}, {pool, jobs / 2, 0, 11u}};
        pthread_t other;
        CHECK(pthread_create(&other, NULL, pool_calls, &two[1]) == 0, "second calling thread");
        pool_calls(&two[0]);
        pthread_join(other, NULL);
        CHECK(two[0].bad == 0 && two[1].bad == 0, "pool, %d threads, 2 callers: %d, %d chunks ran other than once",
              threads, two[0].bad, two[1].bad);
        d2m_pool_destroy(pool);
    }
}

int main(int argc, char **argv) {
    const int cases = argc > 1 ? atoi(argv[1]) : 300;
    refusals();
    pool_stress(20 * cases);
    for (int i = 0; i < d2m_path_count(); i++) {
        const char *path = d2m_path_name(i);
        if (!d2m_path_supported(i)) {
            printf("path %s: compiled, not supported by this CPU (skipped)\n", path);
            continue;
        }
        printf("path %s: %d gemv and %d top-k cases\n", path, cases, cases / 4);
        for (int c = 0; c < cases; c++)
            gemv_case(path);
        for (int c = 0; c < cases / 4; c++)
            topk_case(path);
        for (int c = 0; c < cases; c++)
            prepare_case(path);
    }
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}
