/* d2m_ref C kernels: GEMV over weights kept in their storage format, the fused SwiGLU expert, and
 * one call for a token's top-k experts.  spec/kernels.md is the description (paths, dispatch,
 * threading, error bound); spec/quant.md defines the Q8 and Q4G weight formats.
 *
 * Conventions: output pointer first, then inputs, then sizes; every entry point returns an int
 * status (D2M_OK or a D2M_ERR_*), never exits, never allocates inside a kernel (scratch memory is
 * the caller's, sized by the *_scratch_bytes functions).  Every call checks its pointers and
 * sizes: the C side never trusts its caller (the Python binding validates too).
 *
 * The text between the cdef-begin and cdef-end markers is also the cffi cdef
 * (d2m_ref/_build_kernels.py reads it from this file), so it holds plain declarations only.
 */
#ifndef D2M_KERNELS_H
#define D2M_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* cdef-begin */
#define D2M_OK 0
#define D2M_ERR_NULL 1      /* a required pointer is NULL */
#define D2M_ERR_SIZE 2      /* a size is out of range or sizes disagree */
#define D2M_ERR_FORMAT 3    /* unknown weight format, or a group size Q4G does not allow */
#define D2M_ERR_SCRATCH 4   /* the scratch buffer is smaller than *_scratch_bytes asked for */
#define D2M_ERR_PATH 5      /* unknown path name, a path not compiled in, or one this CPU lacks */
#define D2M_ERR_THREADS 6   /* thread count out of range, or a thread could not be started */
#define D2M_ERR_NOMEM 7     /* the context could not be allocated */

/* Weight formats (spec/kernels.md §2, spec/quant.md). */
#define D2M_F32 0           /* float32 [R][C] */
#define D2M_F16 1           /* IEEE binary16 bits, uint16 [R][C] */
#define D2M_BF16 2          /* bfloat16 bits, uint16 [R][C] */
#define D2M_Q8 3            /* int8 [R][C], scales float32 [R] */
#define D2M_Q4G 4           /* packed uint8 [R][16*ceil(C/32)], scales f16 bits uint16 [R][ceil(C/group)] */

#define D2M_QBLOCK 32       /* activation quantisation block; Q4 packing block */
#define D2M_MAX_DIM 16777216   /* rows, cols <= 2^24 */
#define D2M_MAX_TOKENS 65536
#define D2M_MAX_THREADS 256
#define D2M_MAX_TOPK 64

typedef struct d2m_matrix {
    int format;             /* D2M_F32 ... D2M_Q4G */
    int rows;               /* R: output features */
    int cols;               /* C: input features */
    int group;              /* D2M_Q4G: 32, 64 or 128; otherwise 0 */
    const void *data;       /* the weights, layout by format (above) */
    const void *scales;     /* D2M_Q8, D2M_Q4G: the scales; otherwise NULL */
} d2m_matrix;

typedef struct d2m_mlp {  /* one SwiGLU expert (or dense MLP) */
    d2m_matrix gate;        /* [F][H] */
    d2m_matrix up;          /* [F][H] */
    d2m_matrix down;        /* [H][F] */
} d2m_mlp;

typedef struct d2m_ctx d2m_ctx;  /* a chosen path and a thread pool */

/* Context: path NULL means the environment variable D2M_KERNEL_PATH if set, else the best path
 * this CPU supports; threads >= 1 (1 = run on the calling thread only). */
int d2m_ctx_create(d2m_ctx **out, const char *path, int threads);
void d2m_ctx_destroy(d2m_ctx *ctx);
const char *d2m_ctx_path(const d2m_ctx *ctx);
int d2m_ctx_threads(const d2m_ctx *ctx);
/* How work is split (results never depend on it): a call reading fewer than parallel_min_bytes of
 * weights runs on the calling thread (default 1 MiB); rows go to threads in chunks of about
 * chunk_bytes of weights (at least one row; by default each thread's share in equal chunks: one
 * per MiB of the share, 1 to 4, more when a chunk would pass 2 MiB; chunk_bytes 0 restores that).
 * Tests set both small. */
int d2m_ctx_tune(d2m_ctx *ctx, size_t parallel_min_bytes, size_t chunk_bytes);

/* Paths compiled into this build, best first; supported = this CPU can run it. */
int d2m_path_count(void);
const char *d2m_path_name(int i);
int d2m_path_supported(int i);

/* How this library was built (so a golden mismatch can be traced to a build). */
const char *d2m_build_compiler(void);
const char *d2m_build_flags(void);
const char *d2m_build_target(void);
const char *d2m_status_message(int status);

/* y[t][r] = (accumulate ? y[t][r] : 0) + alpha * (W x_t)[r], for t < n_tok tokens:
 * y [n_tok][R], x [n_tok][C], both float32, row-major. */
size_t d2m_gemv_scratch_bytes(const d2m_matrix *w, int n_tok);
int d2m_gemv(float *y, const d2m_matrix *w, const float *x, int n_tok, float alpha, int accumulate,
             void *scratch, size_t scratch_bytes, d2m_ctx *ctx);

/* y[t] = (accumulate ? y[t] : 0) + tok_weights[t] * down(silu(gate x_t) * up x_t), y and x [n_tok][H];
 * tok_weights NULL means 1 for every token. */
size_t d2m_expert_scratch_bytes(const d2m_mlp *e, int n_tok);
int d2m_expert(float *y, const d2m_mlp *e, const float *x, int n_tok, const float *tok_weights,
               int accumulate, void *scratch, size_t scratch_bytes, d2m_ctx *ctx);

/* One token: y = sum over j < k, in order, of weights[j] * expert_{ids[j]}(x); y, x [H].
 * Equals k calls of d2m_expert (the first with accumulate 0), bit for bit. */
size_t d2m_topk_scratch_bytes(const d2m_mlp *experts, int n_experts, int k);
int d2m_experts_topk(float *y, const d2m_mlp *experts, int n_experts, const int32_t *ids,
                     const float *weights, int k, const float *x, void *scratch, size_t scratch_bytes,
                     d2m_ctx *ctx);

/* The activation quantisation the integer kernels use (spec/kernels.md §3), exposed for tests:
 * xq [ceil(C/32)*32] (zero padded), xd [ceil(C/32)]. */
int d2m_quantize_act(int8_t *xq, float *xd, const float *x, int cols);

/* Streaming read of nbytes (a multiple of 64) at buf (64-byte aligned), split over the context's
 * threads with its path's widest loads; *checksum = sum of the 64-bit words mod 2^64.  For
 * measuring bandwidth. */
int d2m_stream_read(uint64_t *checksum, const void *buf, size_t nbytes, d2m_ctx *ctx);

/* For benchmarks: y = W_i x for each of the n matrices ws[i] in turn (one token, x [C], y [R]; all
 * the same shape), each by d2m_gemv as a caller makes it, with its checks and activation
 * preparation; *seconds = the wall time of the loop, without any binding's per-call cost.  Stops
 * at the first error and returns it. */
int d2m_gemv_pass(double *seconds, float *y, const d2m_matrix *ws, int n, const float *x, void *scratch,
                  size_t scratch_bytes, d2m_ctx *ctx);
/* cdef-end */

#ifdef __cplusplus
}
#endif

#endif /* D2M_KERNELS_H */
