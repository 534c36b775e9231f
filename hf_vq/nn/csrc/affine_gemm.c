/* Integer-code GEMM with int8 activations for affine layers (hf_vq/nn/kernel_native_affine.py owns the build and the
   weight layout).

   The weight is w[r, j] = s[r, g] * (q[r, j] - z[r, g]) with unsigned codes q. The activations (columns permuted by
   perm when given, for act-order) are quantized to int8 in blocks of 32 columns with one fp32 scale d each, as in
   llama.cpp's Q8_0: x[m, j] ~ d[m, b] * a[m, j]. Then
       y[m, r] = bias[r] + sum_g s[r, g] * (sum_{b in g} d[m, b] * <q[r, b], a[m, b]>  -  z[r, g] * X[m, g]),
       X[m, g] = sum_{b in g} d[m, b] * sum_j a[m, 32b + j],
   where <q, a> is an unsigned x signed int8 dot product (AVX2 maddubs, AVX-VNNI / AVX512-VNNI dpbusd) summed in
   int32 over a block, then one float FMA per block, and per group one FMA for the scale and one for the zero-point.

   Layout: one vector lane per output row. Rows are taken 16 at a time (a tile; the last one padded with zero codes
   and scales). For each tile and each block of 32 columns, `bits` chunks of 64 bytes: in a chunk, bytes 4i..4i+3
   belong to row i of the tile, and byte t holds, in field f (bits `bits * f` up), the code of column
   c0 + 4f + t, where c0 = 32b + (32 / bits) * chunk. So a field of one chunk times four activation bytes broadcast
   to every lane is one dpbusd: 16 rows x 4 columns, with the row sums ending in their own lanes (no horizontal
   reductions). Groups are runs of whole blocks, gstart[g] .. gstart[g + 1] (columns sorted by group, padded with
   zero activations to whole blocks). scales: fp16 [tiles, G, 16]. zeros: uint8 [tiles, G, 16].

   Each instruction-set path is compiled with its own target attribute and chosen at run time from what the CPU
   reports (isa 0), or forced (isa > 0) to test a fallback. */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) || defined(__i386__)
#define AFF_X86 1
#include <immintrin.h>
#else
#define AFF_X86 0
#endif

#define TILE 16
#define PARALLEL_MIN_MACS 262144.0   /* multiply-adds: below, one thread (a 2-thread SmolLM2 decode token: 4% faster than at 4M) */
#define INLINE static inline __attribute__((always_inline))
/* codes are read as one stream; prefetching it this far ahead as non-temporal keeps a decode token's weights from
   evicting what the rest of the token works on (a SmolLM2 token: ~0.3 ms faster; a cold 4096 x 4096 layer: 30 -> 34 GB/s) */
#define PREFETCH_AHEAD 8192

enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVXVNNI = 3, ISA_AVX512VNNI = 4 };

typedef struct {
    const uint8_t *codes; int bits; int nblk;
    const uint16_t *scales; const uint8_t *zeros; const int32_t *gstart; int G;
    const int8_t *xq;        /* [m, nblk * 32] */
    const float *d;          /* [m, nblk] */
    const float *X;          /* [m, G] */
    int n; int m;
    const float *bias;
    void *y; int y_bf16;
} aff_args;

static inline float fp16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {   /* subnormal */
            exp = 113;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#include "bf16.h"
#include "q8_block.h"
#include "scratch.h"

static _Thread_local scratch_buf tls_acts;

/* rows [r0, r0 + 16) of activation row mm, from 16 lane sums */
static inline void store_tile(const aff_args *a, int mm, int r0, const float *v) {
    const int cnt = a->n - r0 < TILE ? a->n - r0 : TILE;
    const size_t at = (size_t)mm * a->n + r0;
    for (int i = 0; i < cnt; i++) {
        const float t = v[i] + (a->bias ? a->bias[r0 + i] : 0.f);
        if (a->y_bf16) ((uint16_t *)a->y)[at + i] = f32_to_bf16(t);
        else ((float *)a->y)[at + i] = t;
    }
}

INLINE const uint8_t *block_codes(const aff_args *a, int tile, int b) {
    return a->codes + ((size_t)tile * a->nblk + b) * (size_t)(64 * a->bits);
}

/* ------------------------------------------------------------------------------------------ scalar path */
static void tiles_scalar(const aff_args *a, int t0, int t1) {
    const int bits = a->bits, fields = 8 / bits, cols = 32 / bits, mask = (1 << bits) - 1;
    for (int t = t0; t < t1; t++) {
        for (int mm = 0; mm < a->m; mm++) {
            const int8_t *xq = a->xq + (size_t)mm * a->nblk * 32;
            float acc[TILE] = {0.f};
            for (int g = 0; g < a->G; g++) {
                float gacc[TILE] = {0.f};
                for (int b = a->gstart[g]; b < a->gstart[g + 1]; b++) {
                    const uint8_t *blk = block_codes(a, t, b);
                    int32_t dot[TILE] = {0};
                    for (int c = 0; c < bits; c++)
                        for (int i = 0; i < TILE; i++)
                            for (int f = 0; f < fields; f++)
                                for (int u = 0; u < 4; u++)
                                    dot[i] += ((blk[c * 64 + 4 * i + u] >> (bits * f)) & mask) *
                                              xq[b * 32 + c * cols + 4 * f + u];
                    const float d = a->d[(size_t)mm * a->nblk + b];
                    for (int i = 0; i < TILE; i++) gacc[i] += (float)dot[i] * d;
                }
                const float X = a->X[(size_t)mm * a->G + g];
                for (int i = 0; i < TILE; i++) {
                    const size_t at = ((size_t)t * a->G + g) * TILE + i;
                    const float s = fp16_to_f32(a->scales[at]);
                    acc[i] += s * gacc[i] - s * (float)a->zeros[at] * X;
                }
            }
            store_tile(a, mm, t * TILE, acc);
        }
    }
}

#if AFF_X86
/* ------------------------------------------------------------------------------------------ 256-bit paths */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define NAME(x) x##_avx2
#define VNNI 0
#include "affine_gemm_256.h"
#undef NAME
#undef VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define NAME(x) x##_avxvnni
#define VNNI 1
#include "affine_gemm_256.h"
#undef NAME
#undef VNNI
#pragma GCC pop_options

/* ------------------------------------------------------------------------------------------ 512-bit path */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include "affine_gemm_512.h"
#pragma GCC pop_options

static int cpu_has(int isa) {
    __builtin_cpu_init();
    switch (isa) {
        case ISA_SCALAR: return 1;
        case ISA_AVX2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case ISA_AVXVNNI: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                                 __builtin_cpu_supports("avxvnni");
        case ISA_AVX512VNNI: return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                                    __builtin_cpu_supports("avx512vnni");
        default: return 0;
    }
}
#else
static int cpu_has(int isa) { return isa == ISA_SCALAR; }
#endif

int affine_isa_supported(int isa) { return cpu_has(isa); }

int affine_best_isa(void) {
    for (int isa = ISA_AVX512VNNI; isa > ISA_SCALAR; isa--)
        if (cpu_has(isa)) return isa;
    return ISA_SCALAR;
}

int affine_tile_rows(void) { return TILE; }

/* Activations -> int8 blocks of 32 (scale d = max|x| / 127, so |a| <= 127) and X[m, g]. */
#if AFF_X86
/* one full block of 32 activations without a permutation, as the scalar loop below computes it, bit for bit */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
static void quantize_block_avx512(const void *src, int bf16, int8_t *q, float *d, int32_t *sum) {
    __m512 v[2];
    __m512i qi[2];
    q8_load32_avx512(src, bf16, v);
    q8_block_avx512(v, qi, d, sum);
    for (int h = 0; h < 2; h++) _mm_storeu_si128((__m128i *)(q + 16 * h), _mm512_cvtepi32_epi8(qi[h]));
}

/* four full blocks from src, as four quantize_block_avx512 calls */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
static void quantize_block4_avx512(const void *src, int bf16, int8_t *q, float *d, int32_t *sum) {
    __m512 v[8];
    __m512i qi[8];
    for (int j = 0; j < 4; j++) q8_load32_avx512((const char *)src + (size_t)j * 32 * (bf16 ? 2 : 4), bf16, v + 2 * j);
    q8_block4_avx512(v, qi, d, sum);
    for (int i = 0; i < 8; i++) _mm_storeu_si128((__m128i *)(q + 16 * i), _mm512_cvtepi32_epi8(qi[i]));
}

__attribute__((target("avx2,fma")))
static void quantize_block_avx2(const void *src, int bf16, int8_t *q, float *d, int32_t *sum) {
    __m256 v[4];
    for (int h = 0; h < 4; h++)
        v[h] = bf16 ? _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(
                          _mm_loadu_si128((const __m128i *)((const uint16_t *)src + 8 * h))), 16))
                    : _mm256_loadu_ps((const float *)src + 8 * h);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                             _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    const float amax = _mm_cvtss_f32(m4);
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    int32_t qi[32];
    for (int h = 0; h < 4; h++) {
        const __m256 r = _mm256_mul_ps(v[h], _mm256_set1_ps(id));
        const __m256 pos = _mm256_cmp_ps(r, _mm256_setzero_ps(), _CMP_GE_OQ);
        const __m256 t = _mm256_add_ps(r, _mm256_blendv_ps(_mm256_set1_ps(-0.5f), _mm256_set1_ps(0.5f), pos));
        __m256i i = _mm256_cvttps_epi32(t);
        i = _mm256_min_epi32(_mm256_max_epi32(i, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
        _mm256_storeu_si256((__m256i *)(qi + 8 * h), i);
    }
    int32_t s = 0;
    for (int j = 0; j < 32; j++) { q[j] = (int8_t)qi[j]; s += qi[j]; }
    *sum = s;
    *d = amax / 127.f;
}
#endif

/* Row mm of x to int8 blocks: xq [m, nblk * 32], d [m, nblk] and the per-group sums X [m, G] */
static void quantize_row(const void *x, int x_bf16, int mm, int k, const int32_t *perm, int nblk,
                         const int32_t *gstart, int G, int8_t *xq, float *d, float *X, int fast) {
    const float *xf = (const float *)x + (size_t)mm * k;
    const uint16_t *xh = (const uint16_t *)x + (size_t)mm * k;
    float *dm = d + (size_t)mm * nblk;
    int run = -4;   /* the blocks run .. run + 3 were quantized together; run_sum: their sums */
    int32_t run_sum[4];
    for (int g = 0; g < G; g++) {
        float sum_g = 0.f;
        for (int b = gstart[g]; b < gstart[g + 1]; b++) {
            int8_t *q = xq + (size_t)mm * nblk * 32 + (size_t)b * 32;
            int32_t s = 0;
#if AFF_X86
            if (fast == 2 && !perm) {   /* runs of 4 full blocks, across group ends */
                if (b >= run + 4 && b * 32 + 128 <= k) {
                    quantize_block4_avx512(x_bf16 ? (const void *)(xh + b * 32) : (const void *)(xf + b * 32), x_bf16,
                                           q, &dm[b], run_sum);
                    run = b;
                }
                if (b < run + 4) {
                    sum_g += dm[b] * (float)run_sum[b - run];
                    continue;
                }
            }
            if (fast && !perm && b * 32 + 32 <= k) {
                const void *src = x_bf16 ? (const void *)(xh + b * 32) : (const void *)(xf + b * 32);
                if (fast == 2) quantize_block_avx512(src, x_bf16, q, &dm[b], &s);
                else quantize_block_avx2(src, x_bf16, q, &dm[b], &s);
                sum_g += dm[b] * (float)s;
                continue;
            }
#endif
            float v[32], amax = 0.f;
            for (int j = 0; j < 32; j++) {
                const int col = b * 32 + j;
                float t = 0.f;
                if (col < k) {
                    const int src = perm ? perm[col] : col;
                    t = x_bf16 ? bf16_to_f32(xh[src]) : xf[src];
                }
                v[j] = t;
                amax = fabsf(t) > amax ? fabsf(t) : amax;
            }
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            for (int j = 0; j < 32; j++) {
                const float r = v[j] * id;   /* round half away from zero, without a libm call */
                const int qi = (int)(r + (r >= 0.f ? 0.5f : -0.5f));
                q[j] = (int8_t)(qi > 127 ? 127 : (qi < -127 ? -127 : qi));
                s += q[j];
            }
            dm[b] = amax / 127.f;
            sum_g += dm[b] * (float)s;
        }
        X[(size_t)mm * G + g] = sum_g;
    }
}

#define PARALLEL_MIN_QUANT 65536   /* activations: below, one thread */

/* rows [r0, r1) of the activations; vector code on full blocks for the vector paths (the same numbers as the
   portable loop) */
static void quantize_acts(const void *x, int x_bf16, int r0, int r1, int k, const int32_t *perm, int nblk,
                          const int32_t *gstart, int G, int8_t *xq, float *d, float *X, int isa) {
    const int fast = isa == ISA_AVX512VNNI ? 2 : (isa == ISA_AVX2 || isa == ISA_AVXVNNI);
    for (int mm = r0; mm < r1; mm++) quantize_row(x, x_bf16, mm, k, perm, nblk, gstart, G, xq, d, X, fast);
}

typedef void (*tiles_fn)(const aff_args *, int, int);

/* The kernels prefetch the codes PREFETCH_AHEAD bytes ahead of where they read. The first that many bytes of a call,
   and the start of the scales and zero-points, are requested here, before the activations are quantized, so that
   their memory latency overlaps that work instead of stalling the first tiles (a cold decode call of a small layer
   is mostly that latency). */
static void prefetch_head(const void *codes, size_t codes_bytes, const void *scales, size_t scales_bytes,
                          const void *zeros, size_t zeros_bytes) {
#if AFF_X86
    const size_t nc = codes_bytes < PREFETCH_AHEAD ? codes_bytes : PREFETCH_AHEAD;
    const size_t ns = scales_bytes < 1024 ? scales_bytes : 1024, nz = zeros_bytes < 512 ? zeros_bytes : 512;
    for (size_t o = 0; o < ns; o += 64) _mm_prefetch((const char *)scales + o, _MM_HINT_NTA);
    for (size_t o = 0; o < nz; o += 64) _mm_prefetch((const char *)zeros + o, _MM_HINT_NTA);
    for (size_t o = 0; o < nc; o += 64) _mm_prefetch((const char *)codes + o, _MM_HINT_NTA);
#else
    (void)codes; (void)codes_bytes; (void)scales; (void)scales_bytes; (void)zeros; (void)zeros_bytes;
#endif
}

/* y [m, n] (fp32, or bf16 when y_bf16) = x [m, k] (fp32, or bf16 when x_bf16) @ W^T + bias. Returns the
   instruction set used (1 scalar, 2 AVX2, 3 AVX-VNNI, 4 AVX512-VNNI), or -1 for arguments it cannot take. */
int affine_gemm(const void *x, int x_bf16, int m, int k, const int32_t *perm, void *y, int y_bf16, int n,
                const uint8_t *codes, int bits, int nblk, const uint16_t *scales, const uint8_t *zeros,
                const int32_t *gstart, int G, const float *bias, int nthreads, int isa) {
    if (m < 1 || n < 1 || k < 1 || nblk * 32 < k || G < 1 || gstart[0] != 0 || gstart[G] != nblk) return -1;
    if (!(bits == 2 || bits == 4 || bits == 8)) return -1;
    if (isa == ISA_AUTO) isa = affine_best_isa();
    if (!cpu_has(isa)) return -1;
    if (nthreads < 1) nthreads = 1;
    const int ntiles = (n + TILE - 1) / TILE;
    prefetch_head(codes, (size_t)ntiles * nblk * 64 * bits, scales, (size_t)ntiles * G * TILE * 2, zeros,
                  (size_t)ntiles * G * TILE);
    /* small calls (decode) keep the quantized activations on the stack */
    enum { STACK_BLOCKS = 256, STACK_GROUPS = 256 };
    int8_t xq_s[STACK_BLOCKS * 32] __attribute__((aligned(64)));
    float d_s[STACK_BLOCKS], X_s[STACK_GROUPS];
    /* larger ones in this thread's scratch: int8 values, then the block scales, then the group sums */
    const int heap = (size_t)m * nblk > STACK_BLOCKS || (size_t)m * G > STACK_GROUPS;
    const size_t nb = (size_t)m * nblk, xq_bytes = (nb * 32 + 63) / 64 * 64;
    uint8_t *acts = heap ? scratch_get(&tls_acts, xq_bytes + sizeof(float) * (nb + (size_t)m * G)) : NULL;
    if (heap && !acts) return -1;
    int8_t *xq = heap ? (int8_t *)acts : xq_s;
    float *d = heap ? (float *)(acts + xq_bytes) : d_s;
    float *X = heap ? d + nb : X_s;
    aff_args a = {codes, bits, nblk, scales, zeros, gstart, G, xq, d, X, n, m, bias, y, y_bf16};
    tiles_fn fn = tiles_scalar;
#if AFF_X86
    if (isa == ISA_AVX2) fn = tiles_avx2;
    else if (isa == ISA_AVXVNNI) fn = tiles_avxvnni;
    else if (isa == ISA_AVX512VNNI) fn = tiles_avx512;
#endif
    /* a small call costs less than waking the OpenMP pool (a second runtime beside torch's): one thread */
    const int serial = nthreads == 1 || ntiles == 1 || (double)n * k * m < PARALLEL_MIN_MACS;
    /* many rows: the threads quantize a share of the rows each, in the region that then runs the tiles */
    const int qpar = !serial && m > 1 && (double)m * k >= PARALLEL_MIN_QUANT;
    if (!qpar) quantize_acts(x, x_bf16, 0, m, k, perm, nblk, gstart, G, xq, d, X, isa);
    if (serial) {
        fn(&a, 0, ntiles);
    } else {
        /* a few tiles per task: even shares without a scheduling cost per tile */
        int per = ntiles / (4 * nthreads) > 1 ? ntiles / (4 * nthreads) : 1;
        if (m > 1) per += per & 1;   /* whole pairs of tiles: several rows share broadcasts across two tiles */
        /* one row (decode): one run of tiles per thread, each read as one stream (a SmolLM2 token at 2 threads:
           5-10% faster than in small tasks) */
        else per = (ntiles + nthreads - 1) / nthreads;
        const int ntasks = (ntiles + per - 1) / per;
        const size_t tile_codes = (size_t)nblk * 64 * bits, tile_groups = (size_t)G * TILE;
        #pragma omp parallel num_threads(nthreads)
        {
            if (qpar) {
                #pragma omp for schedule(static)
                for (int mm = 0; mm < m; mm++)
                    quantize_acts(x, x_bf16, mm, mm + 1, k, perm, nblk, gstart, G, xq, d, X, isa);
            }
            #pragma omp for schedule(dynamic, 1)
            for (int t = 0; t < ntasks; t++) {
                const int t0 = t * per, t1 = (t + 1) * per < ntiles ? (t + 1) * per : ntiles;
                if (t && isa != ISA_SCALAR)   /* a task's first bytes, as the call's (the running prefetch covers the rest) */
                    prefetch_head(codes + t0 * tile_codes, (t1 - t0) * tile_codes, scales + t0 * tile_groups,
                                  (t1 - t0) * tile_groups * 2, zeros + t0 * tile_groups, (t1 - t0) * tile_groups);
                fn(&a, t0, t1);
            }
        }
    }
    if (heap) scratch_trim(&tls_acts);
    return isa;
}

/* The projection ABI of hf_vq's native layer kernels (csrc/decode_layer.c calls a layer through it):
   y [n] = x [k] @ W^T + bias for one row, x and y both bf16 (bf16 = 1) or both fp32. Returns < 0 on failure. */
typedef struct {
    const uint8_t *codes; const uint16_t *scales; const uint8_t *zeros; const int32_t *gstart; const int32_t *perm;
    int32_t n, k, bits, nblk, G;
} aff_layer;

int affine_projection(const void *ctx, const void *x, int bf16, void *y, const float *bias, int nthreads, int isa) {
    const aff_layer *L = (const aff_layer *)ctx;
    return affine_gemm(x, bf16, 1, L->k, L->perm, y, bf16, L->n, L->codes, L->bits, L->nblk, L->scales, L->zeros,
                       L->gstart, L->G, bias, nthreads, isa);
}

