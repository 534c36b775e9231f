/* Float GEMV for the layers hf_vq keeps in float (the output head): y[m, r] = bias[r] + sum_j x[m, j] * w[r, j]
   for a few rows m (hf_vq/nn/kernel_native_dense.py owns the build).

   A decode token multiplies one row by the head's [vocab, hidden] weight, which is read once: the speed is the rate
   at which the weight streams from memory. Weights are bf16 or fp32, row-major [n, k]; activations are converted to
   fp32 once per call, and every product is summed in fp32 (bf16 x bf16 products are exact in fp32, so the result
   differs from torch's bf16 GEMM only in the order of the sums). One weight row at a time, so the weight is read as
   one sequential stream (the prefetchers follow it; walking several rows side by side halved the bf16 rate), and the
   activations stay in L1; with several activation rows each reuses the weight row from L1. bf16 outputs are rounded
   to nearest even.

   Each instruction-set path is compiled with its own target attribute and chosen at run time from what the CPU
   reports (isa 0), or forced (isa > 0) to test a fallback. */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#define DN_X86 1
#include <immintrin.h>
#else
#define DN_X86 0
#endif

#define ROWS 4   /* row granularity of the threads' shares */
#define PARALLEL_MIN_MACS 2097152.0   /* 2M multiply-adds: below, one thread */

enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVX512 = 3 };

#include "bf16.h"

typedef struct {
    const float *x; int m; int k;
    const void *w; int w_bf16; int n;
    const float *bias;
    void *y; int y_bf16;
} dn_args;

static inline void store(const dn_args *a, int mi, int r, float v) {
    if (a->bias) v += a->bias[r];
    if (a->y_bf16) ((uint16_t *)a->y)[(size_t)mi * a->n + r] = f32_to_bf16(v);
    else ((float *)a->y)[(size_t)mi * a->n + r] = v;
}

static float weight_at(const dn_args *a, int r, int j) {
    return a->w_bf16 ? bf16_to_f32(((const uint16_t *)a->w)[(size_t)r * a->k + j])
                     : ((const float *)a->w)[(size_t)r * a->k + j];
}

/* Non-temporal prefetch of the weight row PREFETCH_BYTES ahead of row r (within this thread's rows): the head's
   tens of MB then pass through without evicting what the rest of the token works on (Python's objects, the other
   kernels' code and data), which otherwise come back from memory after every token. */
#define PREFETCH_BYTES 24576
static inline void prefetch_ahead(const dn_args *a, int r, int r1) {
    const size_t row = (size_t)a->k * (a->w_bf16 ? 2 : 4);
    const int ahead = row >= PREFETCH_BYTES ? 1 : (int)(PREFETCH_BYTES / row);
    if (r + ahead >= r1) return;
    const char *p = (const char *)a->w + (size_t)(r + ahead) * row;
    for (size_t o = 0; o < row; o += 64) __builtin_prefetch(p + o, 0, 0);
}

static void rows_scalar(const dn_args *a, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        prefetch_ahead(a, r, r1);
        for (int mi = 0; mi < a->m; mi++) {
            const float *x = a->x + (size_t)mi * a->k;
            float s = 0.f;
            for (int j = 0; j < a->k; j++) s += x[j] * weight_at(a, r, j);
            store(a, mi, r, s);
        }
    }
}

#if DN_X86
__attribute__((target("avx2,fma"))) static inline __m256 load8_avx2(const dn_args *a, int r, int j) {
    if (a->w_bf16) {
        __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)a->w + (size_t)r * a->k + j));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
    return _mm256_loadu_ps((const float *)a->w + (size_t)r * a->k + j);
}

__attribute__((target("avx2,fma"))) static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

__attribute__((target("avx2,fma"))) static void rows_avx2(const dn_args *a, int r0, int r1) {
    const int k = a->k, kv = k & ~15;
    for (int r = r0; r < r1; r++) {
        prefetch_ahead(a, r, r1);
        for (int mi = 0; mi < a->m; mi++) {
            const float *x = a->x + (size_t)mi * k;
            __m256 s0 = _mm256_setzero_ps(), s1 = s0;
            int j = 0;
            for (; j < kv; j += 16) {
                s0 = _mm256_fmadd_ps(load8_avx2(a, r, j), _mm256_loadu_ps(x + j), s0);
                s1 = _mm256_fmadd_ps(load8_avx2(a, r, j + 8), _mm256_loadu_ps(x + j + 8), s1);
            }
            if (j + 8 <= k) {
                s0 = _mm256_fmadd_ps(load8_avx2(a, r, j), _mm256_loadu_ps(x + j), s0);
                j += 8;
            }
            float t = hsum_avx2(_mm256_add_ps(s0, s1));
            for (; j < k; j++) t += x[j] * weight_at(a, r, j);
            store(a, mi, r, t);
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static inline __m512 load16_avx512(const dn_args *a, int r, int j,
                                                                              __mmask16 mask) {
    if (a->w_bf16) {
        __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)a->w + (size_t)r * a->k + j);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(mask, (const float *)a->w + (size_t)r * a->k + j);
}

__attribute__((target("avx512f,avx512bw,avx512vl"))) static void rows_avx512(const dn_args *a, int r0, int r1) {
    /* one weight row at a time: the weight is read as one sequential stream, which the prefetchers follow best */
    const int k = a->k, kv = k & ~31;
    const __mmask16 tail = (__mmask16)((1u << (k & 15)) - 1);
    for (int r = r0; r < r1; r++) {
        prefetch_ahead(a, r, r1);
        for (int mi = 0; mi < a->m; mi++) {
            const float *x = a->x + (size_t)mi * k;
            __m512 s0 = _mm512_setzero_ps(), s1 = s0;
            int j = 0;
            for (; j < kv; j += 32) {
                s0 = _mm512_fmadd_ps(load16_avx512(a, r, j, 0xffff), _mm512_loadu_ps(x + j), s0);
                s1 = _mm512_fmadd_ps(load16_avx512(a, r, j + 16, 0xffff), _mm512_loadu_ps(x + j + 16), s1);
            }
            if (j + 16 <= k) {
                s0 = _mm512_fmadd_ps(load16_avx512(a, r, j, 0xffff), _mm512_loadu_ps(x + j), s0);
                j += 16;
            }
            if (j < k) s1 = _mm512_fmadd_ps(load16_avx512(a, r, j, tail), _mm512_maskz_loadu_ps(tail, x + j), s1);
            store(a, mi, r, _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)));
        }
    }
}
#endif

static int cpu_has(int isa) {
#if DN_X86
    __builtin_cpu_init();
    switch (isa) {
        case ISA_SCALAR: return 1;
        case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case ISA_AVX512: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
        default: return 0;
    }
#else
    return isa == ISA_SCALAR;
#endif
}

int dense_isa_supported(int isa) { return cpu_has(isa); }

int dense_best_isa(void) {
    if (cpu_has(ISA_AVX512)) return ISA_AVX512;
    if (cpu_has(ISA_AVX2)) return ISA_AVX2;
    return ISA_SCALAR;
}

static void run_rows(const dn_args *a, int isa, int r0, int r1) {
#if DN_X86
    if (isa == ISA_AVX512) { rows_avx512(a, r0, r1); return; }
    if (isa == ISA_AVX2) { rows_avx2(a, r0, r1); return; }
#endif
    rows_scalar(a, r0, r1);
}

/* x: [m, k] fp32 or bf16 (x_bf16); w: [n, k] fp32 or bf16 (w_bf16); y: [m, n] fp32 or bf16 (y_bf16); bias: fp32 [n]
   or NULL. Returns the instruction set used, or -1 on bad arguments or no memory. */
int dense_gemv(const void *x, int x_bf16, int m, int k, const void *w, int w_bf16, int n, void *y, int y_bf16,
               const float *bias, int nthreads, int isa) {
    if (m < 1 || k < 1 || n < 1 || !x || !w || !y) return -1;
    if (isa == ISA_AUTO || !cpu_has(isa)) isa = dense_best_isa();
    if (nthreads < 1) nthreads = 1;
    float *xf = NULL;
    const float *xs = (const float *)x;
    if (x_bf16) {
        xf = (float *)malloc((size_t)m * k * sizeof(float));
        if (!xf) return -1;
        for (size_t i = 0; i < (size_t)m * k; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        xs = xf;
    }
    const dn_args a = {xs, m, k, w, w_bf16, n, bias, y, y_bf16};
    const int tiles = (n + ROWS - 1) / ROWS;
    if (nthreads == 1 || (double)n * k * m < PARALLEL_MIN_MACS) {
        run_rows(&a, isa, 0, n);
    } else {
        /* contiguous runs of row tiles per thread: each thread streams its own part of the weight */
        #pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int t = 0; t < nthreads; t++) {
            const int t0 = (int)((long long)tiles * t / nthreads), t1 = (int)((long long)tiles * (t + 1) / nthreads);
            const int r0 = t0 * ROWS, r1 = t1 * ROWS < n ? t1 * ROWS : n;
            if (r0 < r1) run_rows(&a, isa, r0, r1);
        }
    }
    free(xf);
    return isa;
}
