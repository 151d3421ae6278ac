/* Measuring.  The streaming read, for memory bandwidth: every byte of a buffer is loaded once, with
 * the path's widest loads, the buffer split over the context's threads.  The checksum (the sum of
 * the 64-bit words modulo 2^64, the same on every path and thread count) keeps the loads alive.
 * The timed GEMV pass, for the kernels' rate without the binding's per-call cost. */
#define _POSIX_C_SOURCE 200809L  /* clock_gettime under -std=c11 */

#include <stdatomic.h>
#include <time.h>

#include "internal.h"

#define STREAM_CHUNK_BYTES (1u << 20)

uint64_t d2m_stream_scalar(const uint64_t *p, size_t n) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = 0; i < n; i += 8) {
        s0 += p[i] + p[i + 4];
        s1 += p[i + 1] + p[i + 5];
        s2 += p[i + 2] + p[i + 6];
        s3 += p[i + 3] + p[i + 7];
    }
    return s0 + s1 + s2 + s3;
}

typedef struct stream_job {
    const uint64_t *words;
    size_t n_words;
    d2m_stream_fn stream;
    atomic_ullong checksum;
} stream_job;

static void stream_task(void *arg, int chunk) {
    stream_job *job = (stream_job *)arg;
    const size_t per = STREAM_CHUNK_BYTES / 8;
    const size_t lo = (size_t)chunk * per;
    const size_t n = job->n_words - lo < per ? job->n_words - lo : per;
    atomic_fetch_add(&job->checksum, (unsigned long long)job->stream(job->words + lo, n));
}

int d2m_stream_read(uint64_t *checksum, const void *buf, size_t nbytes, d2m_ctx *ctx) {
    if (!checksum || !buf || !ctx)
        return D2M_ERR_NULL;
    if (nbytes == 0 || nbytes % 64 != 0 || ((uintptr_t)buf & 63) != 0)
        return D2M_ERR_SIZE;
    if (nbytes / STREAM_CHUNK_BYTES >= (size_t)1 << 30)
        return D2M_ERR_SIZE;
    stream_job job;
    job.words = (const uint64_t *)buf;
    job.n_words = nbytes / 8;
    job.stream = ctx->path->stream;
    atomic_init(&job.checksum, 0ull);
    const int n_chunks = (int)((nbytes + STREAM_CHUNK_BYTES - 1) / STREAM_CHUNK_BYTES);
    d2m_run(ctx, stream_task, &job, n_chunks, nbytes);
    *checksum = (uint64_t)atomic_load(&job.checksum);
    return D2M_OK;
}

int d2m_gemv_pass(double *seconds, float *y, const d2m_matrix *ws, int n, const float *x, void *scratch,
                  size_t scratch_bytes, d2m_ctx *ctx) {
    if (!seconds || !ws)
        return D2M_ERR_NULL;
    if (n <= 0)
        return D2M_ERR_SIZE;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (int i = 0; i < n; i++) {
        const int status = d2m_gemv(y, &ws[i], x, 1, 1.0f, 0, scratch, scratch_bytes, ctx);
        if (status != D2M_OK)
            return status;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    *seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
    return D2M_OK;
}
