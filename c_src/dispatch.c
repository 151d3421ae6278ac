/* Path selection: one small table of the paths compiled into this build, best first, each with
 * a CPU check that is itself compiled for the baseline ISA.  A context uses the path named by its
 * caller, else the one named by D2M_KERNEL_PATH, else the first one this CPU supports.  Also the
 * build facts (compiler, flags, target) for build_info(). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__)
#include <cpuid.h>
#endif
#if defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMD
#define HWCAP_ASIMD (1 << 1)
#endif
#ifndef HWCAP_FPHP
#define HWCAP_FPHP (1 << 9)
#endif
#ifndef HWCAP_ASIMDHP
#define HWCAP_ASIMDHP (1 << 10)
#endif
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif

#if defined(D2M_HAVE_AVX2) && !defined(__x86_64__)
#error "D2M_HAVE_AVX2 is for x86-64 builds"
#endif
#if defined(D2M_HAVE_AVX512) && !defined(D2M_HAVE_AVX2)
#error "the avx512 path takes its F32 kernel from the AVX2 unit"
#endif
#if (defined(D2M_HAVE_NEON) || defined(D2M_HAVE_DOTPROD)) && !defined(__aarch64__)
#error "D2M_HAVE_NEON / D2M_HAVE_DOTPROD are for aarch64 builds"
#endif
#if defined(D2M_HAVE_DOTPROD) && !defined(D2M_HAVE_NEON)
#error "the dotprod path takes its float kernels from the NEON unit"
#endif

#ifndef D2M_BUILD_CC
#define D2M_BUILD_CC "cc"
#endif
#ifndef D2M_BUILD_FLAGS
#define D2M_BUILD_FLAGS "unknown"
#endif
#ifndef D2M_BUILD_TARGET
#define D2M_BUILD_TARGET "unknown"
#endif

static int cpu_any(void) {
    return 1;
}

#if defined(D2M_HAVE_AVX2)
/* The register state the OS saves (XCR0, low half; only read once OSXSAVE is seen in cpuid). */
static unsigned xcr0(void) {
    unsigned lo, hi;
    __asm__ __volatile__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return lo;
}

/* AVX2 + FMA + F16C, and the OS saves the YMM registers (OSXSAVE, XCR0 bits 1 and 2). */
static int cpu_avx2(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d))
        return 0;
    const int fma = (c >> 12) & 1, osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, f16c = (c >> 29) & 1;
    if (!(fma && osxsave && avx && f16c))
        return 0;
    if ((xcr0() & 6u) != 6u)
        return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    return (b >> 5) & 1;
}
#endif

#if defined(D2M_HAVE_AVX512)
/* The AVX2 path's features (its float kernels are used), plus AVX512F, BW, VL and VNNI, and the
 * OS saves the opmask and ZMM state too (XCR0 bits 5, 6, 7 besides SSE and AVX). */
static int cpu_avx512(void) {
    unsigned a, b, c, d;
    if (!cpu_avx2() || !__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    const int f = (b >> 16) & 1, bw = (b >> 30) & 1, vl = (b >> 31) & 1, vnni = (c >> 11) & 1;
    if (!(f && bw && vl && vnni))
        return 0;
    return (xcr0() & 0xe6u) == 0xe6u;
}
#endif

#if defined(D2M_HAVE_NEON)
static int cpu_neon(void) {
    return (getauxval(AT_HWCAP) & HWCAP_ASIMD) != 0;
}
#endif

#if defined(D2M_HAVE_DOTPROD)
/* The unit is built with -march=armv8.2-a+dotprod+fp16, so it needs all three features
 * (Cortex-A78AE of Jetson Orin has them; Cortex-A53 has none). */
static int cpu_dotprod(void) {
    const unsigned long hw = getauxval(AT_HWCAP);
    return (hw & HWCAP_ASIMD) && (hw & HWCAP_ASIMDDP) && (hw & HWCAP_FPHP) && (hw & HWCAP_ASIMDHP);
}
#endif

static const d2m_path PATHS[] = {
#if defined(D2M_HAVE_AVX512)
    {"avx512", cpu_avx512,
     {d2m_dot_f32_avx2, d2m_dot_f16_avx512, d2m_dot_bf16_avx512, d2m_dot_q8_avx512, d2m_dot_q4g_avx512},
     {0, 0, 0, D2M_ACT_Q | D2M_ACT_PAIRS8, D2M_ACT_Q | D2M_ACT_Q4}, d2m_act_prepare_avx512, d2m_stream_avx2},
#endif
#if defined(D2M_HAVE_AVX2)
    {"avx2", cpu_avx2,
     {d2m_dot_f32_avx2, d2m_dot_f16_avx2, d2m_dot_bf16_avx2, d2m_dot_q8_avx2, d2m_dot_q4g_avx2},
     {0, 0, 0, D2M_ACT_Q, D2M_ACT_Q | D2M_ACT_Q4}, d2m_act_prepare_avx2, d2m_stream_avx2},
#endif
#if defined(D2M_HAVE_DOTPROD)
    {"neon_dotprod", cpu_dotprod,
     {d2m_dot_f32_neon, d2m_dot_f16_neon, d2m_dot_bf16_neon, d2m_dot_q8_dotprod, d2m_dot_q4g_dotprod},
     {0, 0, 0, D2M_ACT_Q, D2M_ACT_Q}, d2m_act_prepare_portable, d2m_stream_neon},
#endif
#if defined(D2M_HAVE_NEON)
    {"neon", cpu_neon,
     {d2m_dot_f32_neon, d2m_dot_f16_neon, d2m_dot_bf16_neon, d2m_dot_q8_neon, d2m_dot_q4g_neon},
     {0, 0, 0, D2M_ACT_Q, D2M_ACT_Q}, d2m_act_prepare_portable, d2m_stream_neon},
#endif
    {"scalar", cpu_any,
     {d2m_dot_f32_scalar, d2m_dot_f16_scalar, d2m_dot_bf16_scalar, d2m_dot_q8_scalar, d2m_dot_q4g_scalar},
     {0, 0, 0, D2M_ACT_Q, D2M_ACT_Q}, d2m_act_prepare_portable, d2m_stream_scalar},
};

#define N_PATHS ((int)(sizeof PATHS / sizeof PATHS[0]))

int d2m_path_count(void) {
    return N_PATHS;
}

const char *d2m_path_name(int i) {
    return i >= 0 && i < N_PATHS ? PATHS[i].name : NULL;
}

int d2m_path_supported(int i) {
    return i >= 0 && i < N_PATHS ? PATHS[i].supported() : 0;
}

const d2m_path *d2m_find_path(const char *name, int *status) {
    *status = D2M_OK;
    if (!name || !*name) {
        name = getenv("D2M_KERNEL_PATH");
        if (name && (!*name || strcmp(name, "auto") == 0))
            name = NULL;
    }
    for (int i = 0; i < N_PATHS; i++) {
        if (name ? strcmp(name, PATHS[i].name) == 0 : PATHS[i].supported()) {
            if (!PATHS[i].supported())
                break;  /* named, compiled in, but this CPU lacks it */
            return &PATHS[i];
        }
    }
    *status = D2M_ERR_PATH;
    return NULL;
}

int d2m_ctx_create(d2m_ctx **out, const char *path, int threads) {
    if (!out)
        return D2M_ERR_NULL;
    *out = NULL;
    if (threads < 1 || threads > D2M_MAX_THREADS)
        return D2M_ERR_THREADS;
    int status;
    const d2m_path *p = d2m_find_path(path, &status);
    if (!p)
        return status;
    d2m_ctx *ctx = (d2m_ctx *)calloc(1, sizeof *ctx);
    if (!ctx)
        return D2M_ERR_NOMEM;
    ctx->path = p;
    ctx->threads = threads;
    ctx->parallel_min_bytes = D2M_DEFAULT_PARALLEL_MIN_BYTES;
    ctx->chunk_bytes = 0;  /* by matrix size */
    if (threads > 1 && (status = d2m_pool_create(&ctx->pool, threads)) != D2M_OK) {
        free(ctx);
        return status;
    }
    *out = ctx;
    return D2M_OK;
}

void d2m_ctx_destroy(d2m_ctx *ctx) {
    if (!ctx)
        return;
    d2m_pool_destroy(ctx->pool);
    free(ctx);
}

const char *d2m_ctx_path(const d2m_ctx *ctx) {
    return ctx ? ctx->path->name : NULL;
}

int d2m_ctx_threads(const d2m_ctx *ctx) {
    return ctx ? ctx->threads : 0;
}

int d2m_ctx_tune(d2m_ctx *ctx, size_t parallel_min_bytes, size_t chunk_bytes) {
    if (!ctx)
        return D2M_ERR_NULL;
    ctx->parallel_min_bytes = parallel_min_bytes;
    ctx->chunk_bytes = chunk_bytes;
    return D2M_OK;
}

const char *d2m_build_compiler(void) {
#if defined(__VERSION__)
    return D2M_BUILD_CC " (" __VERSION__ ")";
#else
    return D2M_BUILD_CC;
#endif
}

const char *d2m_build_flags(void) {
    return D2M_BUILD_FLAGS;
}

const char *d2m_build_target(void) {
    return D2M_BUILD_TARGET;
}

const char *d2m_status_message(int status) {
    switch (status) {
    case D2M_OK:
        return "ok";
    case D2M_ERR_NULL:
        return "a required pointer is NULL";
    case D2M_ERR_SIZE:
        return "a size is out of range or sizes disagree";
    case D2M_ERR_FORMAT:
        return "unknown weight format, or a group size Q4G does not allow";
    case D2M_ERR_SCRATCH:
        return "the scratch buffer is too small";
    case D2M_ERR_PATH:
        return "unknown kernel path, not compiled in, or this CPU lacks it";
    case D2M_ERR_THREADS:
        return "thread count out of range, or a thread could not be started";
    case D2M_ERR_NOMEM:
        return "out of memory";
    default:
        return "unknown status";
    }
}
