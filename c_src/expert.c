/* The fused SwiGLU expert and a token's top-k experts (spec/architecture.md §4.1, §4.2 step 5):
 *     y += w * down(silu(gate x) * up x),   silu(z) = z / (1 + exp(-z))
 * Two parallel passes: (1) rows of gate and up together, each thread turning its rows of both
 * into silu(g) * u; (2) rows of down.  Between them the calling thread quantises that
 * intermediate for an integer-format down matrix.  As in gemv.c, every output element is computed
 * whole by one thread, so results do not depend on the thread count. */
#include <math.h>

#include "internal.h"

static size_t round64(size_t n) {
    return (n + 63) & ~(size_t)63;
}

static float silu(float z) {
    return z / (1.0f + expf(-z));
}

static int check_expert(const d2m_mlp *e) {
    if (!e)
        return D2M_ERR_NULL;
    int status;
    if ((status = d2m_check_matrix(&e->gate)) != D2M_OK || (status = d2m_check_matrix(&e->up)) != D2M_OK ||
        (status = d2m_check_matrix(&e->down)) != D2M_OK)
        return status;
    const int F = e->gate.rows, H = e->gate.cols;
    if (e->up.rows != F || e->up.cols != H || e->down.rows != H || e->down.cols != F)
        return D2M_ERR_SIZE;
    return D2M_OK;
}

static int gate_up_quantized(const d2m_mlp *e) {
    return d2m_is_quantized(e->gate.format) || d2m_is_quantized(e->up.format);
}

/* what the path's gate and up kernels read of x (D2M_ACT_* bits; 0 for float formats) */
static unsigned gate_up_reads(const d2m_path *path, const d2m_mlp *e) {
    return (unsigned)path->reads[e->gate.format] | (unsigned)path->reads[e->up.format];
}

/* Pass 1 over the rows of one expert: a[t][r] = silu(gate_r x_t) * (up_r x_t), into g. */
typedef struct pass1 {
    const d2m_mlp *e;
    d2m_dot_fn dot_gate, dot_up;
    const d2m_acts *x;
    float *g, *u;           /* [n_tok][F]; g becomes a */
    int chunk_rows;
    int first_chunk;        /* topk: this expert's chunks start here */
} pass1;

static void pass1_rows(const pass1 *p, int r0, int r1) {
    const int F = p->e->gate.rows;
    d2m_rows(p->g, F, &p->e->gate, p->dot_gate, r0, r1, p->x, 1.0f, NULL, 0);
    d2m_rows(p->u, F, &p->e->up, p->dot_up, r0, r1, p->x, 1.0f, NULL, 0);
    for (int t = 0; t < p->x->n_tok; t++) {
        float *g = p->g + (size_t)t * F, *u = p->u + (size_t)t * F;
        for (int r = r0; r < r1; r++)
            g[r] = silu(g[r]) * u[r];
    }
}

static void pass1_chunk(const pass1 *p, int chunk) {
    const int F = p->e->gate.rows;
    const int r0 = chunk * p->chunk_rows;
    pass1_rows(p, r0, r0 + p->chunk_rows < F ? r0 + p->chunk_rows : F);
}

static int pass1_chunks(const pass1 *p) {
    return (p->e->gate.rows + p->chunk_rows - 1) / p->chunk_rows;
}

static void pass1_task(void *arg, int chunk) {
    pass1_chunk((const pass1 *)arg, chunk);
}

/* Pass 2: y rows of down, for one or more (expert, activation, weight) terms in order. */
typedef struct pass2 {
    float *y;
    int n_terms;
    const d2m_matrix *down[D2M_MAX_TOPK];
    d2m_dot_fn dot[D2M_MAX_TOPK];
    d2m_acts a[D2M_MAX_TOPK];
    float weight[D2M_MAX_TOPK];
    const float *tok_weights;   /* d2m_expert: per-token weights (n_terms == 1) */
    int accumulate;
    int chunk_rows;
    int H;
} pass2;

static void pass2_task(void *arg, int chunk) {
    const pass2 *p = (const pass2 *)arg;
    const int r0 = chunk * p->chunk_rows;
    const int r1 = r0 + p->chunk_rows < p->H ? r0 + p->chunk_rows : p->H;
    for (int j = 0; j < p->n_terms; j++)
        d2m_rows(p->y, p->H, p->down[j], p->dot[j], r0, r1, &p->a[j], p->weight[j], p->tok_weights,
                 j > 0 || p->accumulate);
}

/* ------------------------------------------------------------------------------------------ */

size_t d2m_expert_scratch_bytes(const d2m_mlp *e, int n_tok) {
    if (check_expert(e) != D2M_OK || n_tok <= 0 || n_tok > D2M_MAX_TOKENS)
        return 0;
    const int F = e->gate.rows, H = e->gate.cols;
    size_t n = 64;
    if (gate_up_quantized(e))
        n += d2m_acts_bytes(H, n_tok);
    n += 2 * round64((size_t)n_tok * (size_t)F * sizeof(float));
    if (d2m_is_quantized(e->down.format))
        n += d2m_acts_bytes(F, n_tok);
    return n;
}

int d2m_expert(float *y, const d2m_mlp *e, const float *x, int n_tok, const float *tok_weights,
               int accumulate, void *scratch, size_t scratch_bytes, d2m_ctx *ctx) {
    if (!y || !x || !ctx || !scratch)
        return D2M_ERR_NULL;
    const int status = check_expert(e);
    if (status != D2M_OK)
        return status;
    if (n_tok <= 0 || n_tok > D2M_MAX_TOKENS)
        return D2M_ERR_SIZE;
    if (scratch_bytes < d2m_expert_scratch_bytes(e, n_tok))
        return D2M_ERR_SCRATCH;
    const int F = e->gate.rows, H = e->gate.cols;
    void *cursor = d2m_align64(scratch);
    d2m_acts xin;
    d2m_acts_prepare(&xin, x, H, n_tok, gate_up_reads(ctx->path, e), ctx->path, &cursor);
    float *g = (float *)cursor;
    float *u = (float *)((char *)g + round64((size_t)n_tok * F * sizeof(float)));
    cursor = (char *)u + round64((size_t)n_tok * F * sizeof(float));

    const d2m_path *path = ctx->path;
    pass1 p1 = {e, path->dot[e->gate.format], path->dot[e->up.format], &xin, g, u, 0, 0};
    p1.chunk_rows = d2m_chunk_rows(ctx, &e->gate);
    d2m_run(ctx, pass1_task, &p1, pass1_chunks(&p1), d2m_matrix_bytes(&e->gate) + d2m_matrix_bytes(&e->up));

    pass2 p2;
    p2.y = y;
    p2.n_terms = 1;
    p2.down[0] = &e->down;
    p2.dot[0] = path->dot[e->down.format];
    d2m_acts_prepare(&p2.a[0], g, F, n_tok, path->reads[e->down.format], path, &cursor);
    p2.weight[0] = 1.0f;
    p2.tok_weights = tok_weights;
    p2.accumulate = accumulate != 0;
    p2.chunk_rows = d2m_chunk_rows(ctx, &e->down);
    p2.H = H;
    d2m_run(ctx, pass2_task, &p2, (H + p2.chunk_rows - 1) / p2.chunk_rows, d2m_matrix_bytes(&e->down));
    return D2M_OK;
}

/* ------------------------------------------------------------------------------------------ */

size_t d2m_topk_scratch_bytes(const d2m_mlp *experts, int n_experts, int k) {
    if (!experts || n_experts <= 0 || k <= 0 || k > D2M_MAX_TOPK)
        return 0;
    int F = 0, H = 0, quantized = 0;
    for (int i = 0; i < n_experts; i++) {
        if (check_expert(&experts[i]) != D2M_OK)
            return 0;
        const d2m_mlp *e = &experts[i];
        F = e->gate.rows > F ? e->gate.rows : F;
        H = e->gate.cols > H ? e->gate.cols : H;
        quantized |= gate_up_quantized(e) || d2m_is_quantized(e->down.format);
    }
    size_t n = 64 + 2 * (size_t)k * round64((size_t)F * sizeof(float));
    if (quantized)
        n += d2m_acts_bytes(H, 1) + (size_t)k * d2m_acts_bytes(F, 1);
    return n;
}

typedef struct topk_pass1 {
    pass1 part[D2M_MAX_TOPK];
    int k;
    int total_chunks;
} topk_pass1;

static void topk_pass1_task(void *arg, int chunk) {
    const topk_pass1 *p = (const topk_pass1 *)arg;
    int j = p->k - 1;
    while (j > 0 && chunk < p->part[j].first_chunk)
        j--;
    pass1_chunk(&p->part[j], chunk - p->part[j].first_chunk);
}

int d2m_experts_topk(float *y, const d2m_mlp *experts, int n_experts, const int32_t *ids,
                     const float *weights, int k, const float *x, void *scratch, size_t scratch_bytes,
                     d2m_ctx *ctx) {
    if (!y || !experts || !ids || !weights || !x || !scratch || !ctx)
        return D2M_ERR_NULL;
    if (n_experts <= 0 || k <= 0 || k > D2M_MAX_TOPK)
        return D2M_ERR_SIZE;
    for (int i = 0; i < n_experts; i++) {
        const int status = check_expert(&experts[i]);
        if (status != D2M_OK)
            return status;
    }
    if (scratch_bytes < d2m_topk_scratch_bytes(experts, n_experts, k))
        return D2M_ERR_SCRATCH;
    for (int j = 0; j < k; j++)
        if (ids[j] < 0 || ids[j] >= n_experts)
            return D2M_ERR_SIZE;
    const int H = experts[ids[0]].gate.cols;
    int F = 0;
    for (int i = 0; i < n_experts; i++) {
        const d2m_mlp *e = &experts[i];
        F = e->gate.rows > F ? e->gate.rows : F;
    }
    for (int j = 0; j < k; j++)
        if (experts[ids[j]].gate.cols != H)
            return D2M_ERR_SIZE;

    /* within the layout d2m_topk_scratch_bytes sized: x quantised (if a kernel reads it), then per
     * expert g, u, a quantised */
    void *cursor = d2m_align64(scratch);
    d2m_acts xin;
    const d2m_path *path = ctx->path;
    d2m_acts_prepare(&xin, x, H, 1, 0, path, &cursor);
    d2m_acts xq;
    unsigned x_reads = 0;  /* what the chosen experts' gate and up kernels read of x */
    for (int j = 0; j < k; j++)
        x_reads |= gate_up_reads(path, &experts[ids[j]]);
    d2m_acts_prepare(&xq, x, H, 1, x_reads, path, &cursor);
    topk_pass1 p1;
    p1.k = k;
    p1.total_chunks = 0;
    size_t bytes1 = 0, bytes2 = 0;
    for (int j = 0; j < k; j++) {
        const d2m_mlp *e = &experts[ids[j]];
        pass1 *p = &p1.part[j];
        p->e = e;
        p->dot_gate = path->dot[e->gate.format];
        p->dot_up = path->dot[e->up.format];
        p->x = gate_up_quantized(e) ? &xq : &xin;
        p->g = (float *)cursor;
        p->u = (float *)((char *)cursor + round64((size_t)F * sizeof(float)));
        cursor = (char *)cursor + 2 * round64((size_t)F * sizeof(float));
        p->chunk_rows = d2m_chunk_rows(ctx, &e->gate);
        p->first_chunk = p1.total_chunks;
        p1.total_chunks += pass1_chunks(p);
        bytes1 += d2m_matrix_bytes(&e->gate) + d2m_matrix_bytes(&e->up);
        bytes2 += d2m_matrix_bytes(&e->down);
    }
    d2m_run(ctx, topk_pass1_task, &p1, p1.total_chunks, bytes1);

    pass2 p2;
    p2.y = y;
    p2.n_terms = k;
    for (int j = 0; j < k; j++) {
        const d2m_mlp *e = &experts[ids[j]];
        p2.down[j] = &e->down;
        p2.dot[j] = path->dot[e->down.format];
        d2m_acts_prepare(&p2.a[j], p1.part[j].g, e->down.cols, 1, path->reads[e->down.format], path, &cursor);
        p2.weight[j] = weights[j];
    }
    p2.tok_weights = NULL;
    p2.accumulate = 0;
    p2.chunk_rows = d2m_chunk_rows(ctx, p2.down[0]);
    p2.H = H;
    d2m_run(ctx, pass2_task, &p2, (H + p2.chunk_rows - 1) / p2.chunk_rows, bytes2);
    return D2M_OK;
}
