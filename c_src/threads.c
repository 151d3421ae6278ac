/* A small pthreads pool: threads - 1 workers plus the calling thread claim chunks of a job.  Which
 * thread runs a chunk varies from run to run; what a chunk computes does not (each output row
 * belongs to exactly one chunk), so results never depend on it.
 *
 * A job is a word `claim` = job number << 32 | next chunk, claimed by compare-and-swap, so a worker
 * that wakes late (descheduled: another process holds the CPU) can only take chunks of the job it
 * names, and finds none once the job is over.  The caller runs chunks too and returns when every
 * chunk is done, without waiting for workers that never started: on a busy machine a call falls
 * back to the caller's own speed instead of waiting a scheduler slice for an idle worker.
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
    pthread_cond_t done_cv;
    /* the current job: read by a worker before it claims, valid for it once a claim succeeds (the
     * caller does not return, so does not change them, while a claimed chunk runs) */
    _Atomic(d2m_task_fn) fn;
    _Atomic(void *) arg;
    atomic_int n_chunks;
    atomic_ullong claim;       /* job << 32 | next unclaimed chunk */
    atomic_int done;           /* chunks of the current job finished */
    int stop;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause");
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static unsigned job_of(unsigned long long word) {
    return (unsigned)(word >> 32);
}

/* Run chunks of job `job` while it has unclaimed ones; wake the caller after the job's last chunk. */
static void run_chunks(struct d2m_pool *p, unsigned job) {
    const d2m_task_fn fn = atomic_load_explicit(&p->fn, memory_order_relaxed);
    void *const arg = atomic_load_explicit(&p->arg, memory_order_relaxed);
    const int n = atomic_load_explicit(&p->n_chunks, memory_order_relaxed);
    unsigned long long word = atomic_load_explicit(&p->claim, memory_order_acquire);
    for (;;) {
        if (job_of(word) != job || (int)(unsigned)word >= n)
            return;  /* another job, or nothing left to claim */
        if (!atomic_compare_exchange_weak_explicit(&p->claim, &word, word + 1, memory_order_acquire,
                                                   memory_order_acquire))
            continue;  /* word reloaded */
        fn(arg, (int)(unsigned)word);  /* claimed: fn, arg, n are this job's (the caller waits for it) */
        if (atomic_fetch_add_explicit(&p->done, 1, memory_order_acq_rel) + 1 == n) {
            pthread_mutex_lock(&p->mutex);
            pthread_cond_signal(&p->done_cv);
            pthread_mutex_unlock(&p->mutex);
        }
        word = atomic_load_explicit(&p->claim, memory_order_acquire);
    }
}

static void *worker_main(void *arg) {
    struct d2m_pool *p = (struct d2m_pool *)arg;
    unsigned seen = 0u;  /* job 0 is "none": the first job is 1 */
    for (;;) {
        unsigned job = job_of(atomic_load_explicit(&p->claim, memory_order_acquire));
        for (int i = 0; i < SPIN_ITERATIONS && job == seen; i++) {
            cpu_relax();
            job = job_of(atomic_load_explicit(&p->claim, memory_order_acquire));
        }
        if (job == seen) {
            pthread_mutex_lock(&p->mutex);
            while ((job = job_of(atomic_load(&p->claim))) == seen && !p->stop)
                pthread_cond_wait(&p->wake, &p->mutex);
            const int stop = p->stop;
            pthread_mutex_unlock(&p->mutex);
            if (stop)
                return NULL;
        }
        seen = job;
        run_chunks(p, job);
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
    pthread_cond_init(&p->done_cv, NULL);
    atomic_init(&p->fn, (d2m_task_fn)0);
    atomic_init(&p->arg, (void *)0);
    atomic_init(&p->n_chunks, 0);
    atomic_init(&p->claim, 0ull);
    atomic_init(&p->done, 0);
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
    pthread_cond_destroy(&p->done_cv);
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
    /* publish the job: its parameters, then the claim word naming it (release) */
    unsigned job = job_of(atomic_load(&p->claim)) + 1u;
    if (job == 0u)  /* after 2^32 jobs: 0 means none */
        job = 1u;
    atomic_store_explicit(&p->fn, fn, memory_order_relaxed);
    atomic_store_explicit(&p->arg, arg, memory_order_relaxed);
    atomic_store_explicit(&p->n_chunks, n_chunks, memory_order_relaxed);
    atomic_store_explicit(&p->done, 0, memory_order_relaxed);
    atomic_store_explicit(&p->claim, (unsigned long long)job << 32, memory_order_release);
    pthread_mutex_lock(&p->mutex);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mutex);

    run_chunks(p, job);

    /* every chunk claimed: wait for those still running (never for a worker that did not start) */
    for (int i = 0; i < SPIN_ITERATIONS && atomic_load_explicit(&p->done, memory_order_acquire) < n_chunks; i++)
        cpu_relax();
    pthread_mutex_lock(&p->mutex);
    while (atomic_load(&p->done) < n_chunks)
        pthread_cond_wait(&p->done_cv, &p->mutex);
    pthread_mutex_unlock(&p->mutex);
    pthread_mutex_unlock(&p->run_lock);
}
