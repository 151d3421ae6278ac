/* A small pthreads pool: threads - 1 workers plus the calling thread claim chunks of a job from
 * an atomic counter.  Which thread runs a chunk varies from run to run; what a chunk computes
 * does not (each output row belongs to exactly one chunk), so results never depend on it.
 *
 * A worker takes part in a job by joining it: one word `entry` = job number << 32 | CLOSED |
 * workers inside, changed by compare-and-swap, so a worker can only join the job it names and only
 * while it is open.  When the caller has seen every chunk claimed it closes the job and waits for
 * the workers inside to leave, never for one that has not joined: on a busy machine a worker the
 * scheduler has not run yet costs the call nothing, where waiting for it cost a scheduler slice
 * (one exception left: a worker descheduled while it holds `mutex`, to sleep or to wake the
 * caller, delays the caller's wake-up broadcast).
 * The job's fn, arg and chunk count are written while no worker is inside and read only inside.
 *
 * Workers spin briefly (a decode step issues GEMVs a few tens of microseconds apart) and then
 * sleep on a condition variable.  Jobs on one pool are serialised by run_lock, so a context may be
 * shared by several calling threads. */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "internal.h"

#define SPIN_ITERATIONS 20000
#define CLOSED 0x80000000ull       /* entry: the job takes no more workers */
#define INSIDE 0x7fffffffull       /* entry: workers inside the job */

struct d2m_pool {
    int n_workers;
    pthread_t *workers;
    pthread_mutex_t run_lock;  /* one job at a time */
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    pthread_cond_t left;       /* the last worker left a closed job */
    d2m_task_fn fn;            /* the current job (see above) */
    void *arg;
    int n_chunks;
    atomic_int next_chunk;
    atomic_ullong entry;       /* job << 32 | CLOSED | workers inside */
    int stop;
};

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__ __volatile__("pause");
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static unsigned job_of(unsigned long long entry) {
    return (unsigned)(entry >> 32);
}

static void run_chunks(struct d2m_pool *p) {
    for (;;) {
        const int c = atomic_fetch_add_explicit(&p->next_chunk, 1, memory_order_relaxed);
        if (c >= p->n_chunks)
            return;
        p->fn(p->arg, c);
    }
}

/* Join job `job` if it is still open (the caller's writes before it are then visible), run
 * chunks, leave; wake the caller if this was the last worker inside a closed job. */
static void take_part(struct d2m_pool *p, unsigned job) {
    unsigned long long e = atomic_load_explicit(&p->entry, memory_order_relaxed);
    do {
        if (job_of(e) != job || (e & CLOSED))
            return;
    } while (!atomic_compare_exchange_weak_explicit(&p->entry, &e, e + 1, memory_order_acquire,
                                                    memory_order_relaxed));
    run_chunks(p);
    e = atomic_fetch_sub_explicit(&p->entry, 1, memory_order_release) - 1;
    if ((e & CLOSED) && (e & INSIDE) == 0) {
        pthread_mutex_lock(&p->mutex);
        pthread_cond_signal(&p->left);
        pthread_mutex_unlock(&p->mutex);
    }
}

static void *worker_main(void *arg) {
    struct d2m_pool *p = (struct d2m_pool *)arg;
    unsigned seen = 0u;  /* job 0 is "none": the first job is 1 */
    for (;;) {
        unsigned job = job_of(atomic_load_explicit(&p->entry, memory_order_relaxed));
        for (int i = 0; i < SPIN_ITERATIONS && job == seen; i++) {
            cpu_relax();
            job = job_of(atomic_load_explicit(&p->entry, memory_order_relaxed));
        }
        if (job == seen) {
            pthread_mutex_lock(&p->mutex);
            while ((job = job_of(atomic_load(&p->entry))) == seen && !p->stop)
                pthread_cond_wait(&p->wake, &p->mutex);
            const int stop = p->stop;
            pthread_mutex_unlock(&p->mutex);
            if (stop)
                return NULL;
        }
        seen = job;
        take_part(p, job);
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
    pthread_cond_init(&p->left, NULL);
    atomic_init(&p->next_chunk, 0);
    atomic_init(&p->entry, 0ull);
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
    pthread_cond_destroy(&p->left);
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
    /* no worker is inside (the last job was closed and left): write the job, then open it */
    p->fn = fn;
    p->arg = arg;
    p->n_chunks = n_chunks;
    atomic_store_explicit(&p->next_chunk, 0, memory_order_relaxed);
    unsigned job = job_of(atomic_load_explicit(&p->entry, memory_order_relaxed)) + 1u;
    if (job == 0u)  /* after 2^32 jobs: 0 means none */
        job = 1u;
    atomic_store_explicit(&p->entry, (unsigned long long)job << 32, memory_order_release);
    pthread_mutex_lock(&p->mutex);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mutex);

    run_chunks(p);

    /* every chunk is claimed: close the job, wait for the workers inside (none that never joined) */
    unsigned long long e = atomic_fetch_or_explicit(&p->entry, CLOSED, memory_order_acquire);
    for (int i = 0; i < SPIN_ITERATIONS && (e & INSIDE) != 0; i++) {
        cpu_relax();
        e = atomic_load_explicit(&p->entry, memory_order_acquire);
    }
    if ((e & INSIDE) != 0) {
        pthread_mutex_lock(&p->mutex);
        while ((atomic_load(&p->entry) & INSIDE) != 0)
            pthread_cond_wait(&p->left, &p->mutex);
        pthread_mutex_unlock(&p->mutex);
    }
    pthread_mutex_unlock(&p->run_lock);
}
