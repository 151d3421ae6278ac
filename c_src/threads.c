/* A small pthreads pool: threads - 1 workers plus the calling thread claim chunks of a job from
 * an atomic counter.  Which thread runs a chunk varies from run to run; what a chunk computes
 * does not (each output row belongs to exactly one chunk), so results never depend on it.
 *
 * Workers spin briefly (a decode step issues GEMVs a few tens of microseconds apart) and then
 * sleep on a condition variable.  Jobs on one pool are serialised by run_lock, so a context may be
 * shared by several calling threads. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

#define SPIN_ITERATIONS 20000

struct d2m_pool {
    int n_workers;
    pthread_t *workers;
    pthread_mutex_t run_lock;  /* one job at a time */
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    pthread_cond_t done;
    d2m_task_fn fn;
    void *arg;
    int n_chunks;
    atomic_int next_chunk;
    atomic_int busy;           /* workers not yet finished with the current job */
    atomic_uint generation;    /* bumped for every job */
    int stop;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause");
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static void run_chunks(struct d2m_pool *p) {
    for (;;) {
        const int c = atomic_fetch_add(&p->next_chunk, 1);
        if (c >= p->n_chunks)
            return;
        p->fn(p->arg, c);
    }
}

static void *worker_main(void *arg) {
    struct d2m_pool *p = (struct d2m_pool *)arg;
    unsigned seen = 0u;  /* the generation at creation: a worker that starts late must still see job 1 */
    for (;;) {
        for (int i = 0; i < SPIN_ITERATIONS && atomic_load_explicit(&p->generation, memory_order_acquire) == seen; i++)
            cpu_relax();
        pthread_mutex_lock(&p->mutex);
        while (atomic_load(&p->generation) == seen && !p->stop)
            pthread_cond_wait(&p->wake, &p->mutex);
        if (p->stop) {
            pthread_mutex_unlock(&p->mutex);
            return NULL;
        }
        seen = atomic_load(&p->generation);
        pthread_mutex_unlock(&p->mutex);
        run_chunks(p);
        if (atomic_fetch_sub(&p->busy, 1) == 1) {
            pthread_mutex_lock(&p->mutex);
            pthread_cond_signal(&p->done);
            pthread_mutex_unlock(&p->mutex);
        }
    }
}

static void stop_workers(struct d2m_pool *p, int started) {
    pthread_mutex_lock(&p->mutex);
    p->stop = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mutex);
    for (int i = 0; i < started; i++)
        pthread_join(p->workers[i], NULL);
}

int d2m_pool_create(struct d2m_pool **out, int threads) {
    if (!out)
        return D2M_ERR_NULL;
    *out = NULL;
    if (threads < 2 || threads > D2M_MAX_THREADS)
        return D2M_ERR_THREADS;
    struct d2m_pool *p = (struct d2m_pool *)calloc(1, sizeof *p);
    if (!p)
        return D2M_ERR_NOMEM;
    p->n_workers = threads - 1;
    p->workers = (pthread_t *)calloc((size_t)p->n_workers, sizeof(pthread_t));
    if (!p->workers) {
        free(p);
        return D2M_ERR_NOMEM;
    }
    pthread_mutex_init(&p->run_lock, NULL);
    pthread_mutex_init(&p->mutex, NULL);
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->done, NULL);
    atomic_init(&p->next_chunk, 0);
    atomic_init(&p->busy, 0);
    atomic_init(&p->generation, 0u);
    for (int i = 0; i < p->n_workers; i++) {
        if (pthread_create(&p->workers[i], NULL, worker_main, p) != 0) {
            stop_workers(p, i);
            p->n_workers = 0;
            d2m_pool_destroy(p);
            return D2M_ERR_THREADS;
        }
    }
    *out = p;
    return D2M_OK;
}

void d2m_pool_destroy(struct d2m_pool *p) {
    if (!p)
        return;
    stop_workers(p, p->n_workers);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->wake);
    pthread_mutex_destroy(&p->mutex);
    pthread_mutex_destroy(&p->run_lock);
    free(p->workers);
    free(p);
}

void d2m_pool_run(struct d2m_pool *p, d2m_task_fn fn, void *arg, int n_chunks) {
    if (!p || n_chunks <= 1) {
        for (int c = 0; c < n_chunks; c++)
            fn(arg, c);
        return;
    }
    pthread_mutex_lock(&p->run_lock);
    pthread_mutex_lock(&p->mutex);
    p->fn = fn;
    p->arg = arg;
    p->n_chunks = n_chunks;
    atomic_store(&p->next_chunk, 0);
    atomic_store(&p->busy, p->n_workers);
    atomic_fetch_add_explicit(&p->generation, 1u, memory_order_release);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mutex);

    run_chunks(p);

    for (int i = 0; i < SPIN_ITERATIONS && atomic_load_explicit(&p->busy, memory_order_acquire) > 0; i++)
        cpu_relax();
    pthread_mutex_lock(&p->mutex);
    while (atomic_load(&p->busy) > 0)
        pthread_cond_wait(&p->done, &p->mutex);
    pthread_mutex_unlock(&p->mutex);
    pthread_mutex_unlock(&p->run_lock);
}
