/* Integer-code GEMM with int8 activations for QuantLinear / QuantExperts (hf_vq/nn/affine_kernel.py owns the build
   and the weight layout).

   The weight is w[r, j] = s[r, g] * (q[r, j] - z[r, g]) with unsigned codes q. The activations (columns permuted by
   perm when given, for act-order) are quantized to int8 in blocks of 32 columns with one fp32 scale d each, as in
   llama.cpp's Q8_0: x[m, j] ~ d[m, b] * a[m, j]. Then
       y[m, r] = bias[r] + sum_g s[r, g] * (sum_{b in g} d[m, b] * <q[r, b], a[m, b]>  -  z[r, g] * X[m, g]),
       X[m, g] = sum_{b in g} d[m, b] * sum_j a[m, 32b + j],
   so the inner loop is an unsigned x signed int8 dot product of 32 columns (AVX2 maddubs, AVX-VNNI / AVX512-VNNI
   dpbusd), one float FMA per block, and the zero-points cost one FMA per group (X is shared by all rows).

   Layout: groups are runs of whole blocks, gstart[g] .. gstart[g + 1] (columns sorted by group, padded with zero
   activations to whole blocks). codes: uint8 [n, nblk * bits * 4], in chunks of 32 bytes: 8-bit: one block;
   4-bit (3-bit codes too): two blocks, byte i holds code i of the first (low nibble) and of the second (high);
   2-bit: four blocks, byte i holds code i of block q at bits 2q. nblk is a multiple of 8 / bits, so one load of
   32 bytes and a shift give any block, and a broadcast load and one variable shift give two (AVX-512), with no
   cross-lane shuffles. scales: fp16 [n, G]. zeros: uint8 [n, G].

   Each instruction-set path is compiled with its own target attribute and chosen at run time from what the CPU
   reports (isa 0), or forced (isa > 0) to test a fallback. */
#if !defined(AFF_BODY_256) && !defined(AFF_BODY_512)
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

enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVXVNNI = 3, ISA_AVX512VNNI = 4 };

typedef struct {
    const uint8_t *codes; int bits; int bpb; int nblk;
    const uint16_t *scales; const uint8_t *zeros; const int32_t *gstart; int G;
    const int8_t *xq;        /* [m, nblk * 32] */
    const float *dexp;       /* [m, nblk * 8]: each block's d repeated 8 times (VNNI paths: over 2^(bits * q)) */
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

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);   /* quiet NaN */
    bits += 0x7fffu + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

static inline void store_y(const aff_args *a, int mm, int r, float v) {
    if (a->bias) v += a->bias[r];
    const size_t at = (size_t)mm * a->n + r;
    if (a->y_bf16) ((uint16_t *)a->y)[at] = f32_to_bf16(v);
    else ((float *)a->y)[at] = v;
}

/* zshift: the path computes <q - zshift, a> instead of <q, a> (AVX2 8-bit), so the zero-point term uses z - zshift */
static inline float zero_term_scalar(const aff_args *a, int r, int mm, int g0, float zshift) {
    const uint16_t *s = a->scales + (size_t)r * a->G;
    const uint8_t *z = a->zeros + (size_t)r * a->G;
    const float *X = a->X + (size_t)mm * a->G;
    float t = 0.f;
    for (int g = g0; g < a->G; g++) t += fp16_to_f32(s[g]) * ((float)z[g] - zshift) * X[g];
    return t;
}

/* ------------------------------------------------------------------------------------------ scalar path */
/* code j of block b in a row */
static inline int code_at(const uint8_t *row, int bits, int b, int j) {
    const int per = 8 / bits;   /* blocks per 32-byte chunk */
    return (row[(size_t)(b / per) * 32 + j] >> (bits * (b % per))) & ((1 << bits) - 1);
}

static void rows_scalar(const aff_args *a, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        const uint8_t *row = a->codes + (size_t)r * a->nblk * a->bpb;
        for (int mm = 0; mm < a->m; mm++) {
            const int8_t *xq = a->xq + (size_t)mm * a->nblk * 32;
            const float *dexp = a->dexp + (size_t)mm * a->nblk * 8;
            float acc = 0.f;
            for (int g = 0; g < a->G; g++) {
                float gacc = 0.f;
                for (int b = a->gstart[g]; b < a->gstart[g + 1]; b++) {
                    int32_t dot = 0;
                    for (int j = 0; j < 32; j++) dot += code_at(row, a->bits, b, j) * xq[b * 32 + j];
                    gacc += (float)dot * dexp[b * 8];
                }
                acc += gacc * fp16_to_f32(a->scales[(size_t)r * a->G + g]);
            }
            store_y(a, mm, r, acc - zero_term_scalar(a, r, mm, 0, 0.f));
        }
    }
}

#if AFF_X86
/* ------------------------------------------------------------------------------------------ 256-bit paths */
#define INLINE static inline __attribute__((always_inline))

#define AFF_BODY_256
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define NAME(x) x##_avx2
#define VNNI 0
#include __FILE__
#undef NAME
#undef VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define NAME(x) x##_avxvnni
#define VNNI 1
#include __FILE__
#undef NAME
#undef VNNI
#pragma GCC pop_options
#undef AFF_BODY_256
#endif

#if AFF_X86
/* ------------------------------------------------------------------------------------------ 512-bit path */
#define AFF_BODY_512
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#include __FILE__
#pragma GCC pop_options
#undef AFF_BODY_512

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

/* Activations -> int8 blocks of 32 (scale d = max|x| / 127), their scales repeated 8 times, and X[m, g]. */
/* prescale_bits: the VNNI paths take the codes of block q of a chunk masked in place, as c * 2^(bits * q) (one AND,
   no shift; dpbusd sums in 32 bits, so the larger products cannot saturate), and d carries 2^-(bits * q) */
static void quantize_acts(const void *x, int x_bf16, int m, int k, const int32_t *perm, int nblk,
                          const int32_t *gstart, int G, int prescale_bits, int8_t *xq, float *dexp, float *X) {
    const int per = prescale_bits ? 8 / prescale_bits : 1;
    for (int mm = 0; mm < m; mm++) {
        float v[32];
        int32_t *asum = (int32_t *)malloc(sizeof(int32_t) * (size_t)nblk);
        float *dplain = (float *)malloc(sizeof(float) * (size_t)nblk);
        const float *xf = (const float *)x + (size_t)mm * k;
        const uint16_t *xh = (const uint16_t *)x + (size_t)mm * k;
        for (int b = 0; b < nblk; b++) {
            float amax = 0.f;
            for (int j = 0; j < 32; j++) {
                const int col = b * 32 + j;
                float t = 0.f;
                if (col < k) {
                    const int src = perm ? perm[col] : col;
                    t = x_bf16 ? bf16_to_f32(xh[src]) : xf[src];
                }
                v[j] = t;
                const float at = fabsf(t);
                amax = at > amax ? at : amax;
            }
            const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
            int32_t s = 0;
            int8_t *q = xq + (size_t)mm * nblk * 32 + (size_t)b * 32;
            for (int j = 0; j < 32; j++) {
                const int qi = (int)nearbyintf(v[j] * id);
                q[j] = (int8_t)(qi > 127 ? 127 : (qi < -127 ? -127 : qi));
                s += q[j];
            }
            asum[b] = s;
            dplain[b] = d;
            const float dq = ldexpf(d, -prescale_bits * (b % per));
            for (int t = 0; t < 8; t++) dexp[(size_t)mm * nblk * 8 + (size_t)b * 8 + t] = dq;
        }
        for (int g = 0; g < G; g++) {
            float t = 0.f;
            for (int b = gstart[g]; b < gstart[g + 1]; b++) t += dplain[b] * (float)asum[b];
            X[(size_t)mm * G + g] = t;
        }
        free(dplain);
        free(asum);
    }
}

typedef void (*rows_fn)(const aff_args *, int, int);

/* y [m, n] (fp32, or bf16 when y_bf16) = x [m, k] (fp32, or bf16 when x_bf16) @ W^T + bias. Returns the
   instruction set used (1 scalar, 2 AVX2, 3 AVX-VNNI, 4 AVX512-VNNI), or -1 for arguments it cannot take. */
int affine_gemm(const void *x, int x_bf16, int m, int k, const int32_t *perm, void *y, int y_bf16, int n,
                const uint8_t *codes, int bits, int nblk, const uint16_t *scales, const uint8_t *zeros,
                const int32_t *gstart, int G, const float *bias, int nthreads, int isa) {
    if (m < 1 || n < 1 || k < 1 || nblk * 32 < k || G < 1 || gstart[0] != 0 || gstart[G] != nblk) return -1;
    if (!(bits == 2 || bits == 4 || bits == 8) || nblk % (8 / bits)) return -1;
    if (isa == ISA_AUTO) isa = affine_best_isa();
    if (!cpu_has(isa)) return -1;
    if (nthreads < 1) nthreads = 1;
    int8_t *xq = (int8_t *)aligned_alloc(64, ((size_t)m * nblk * 32 + 63) / 64 * 64);
    float *dexp = (float *)aligned_alloc(64, ((size_t)m * nblk * 32 + 63) / 64 * 64);
    float *X = (float *)malloc(sizeof(float) * (size_t)m * G);
    if (!xq || !dexp || !X) { free(xq); free(dexp); free(X); return -1; }
    const int vnni = isa == ISA_AVXVNNI || isa == ISA_AVX512VNNI;
    quantize_acts(x, x_bf16, m, k, perm, nblk, gstart, G, vnni && bits < 8 ? bits : 0, xq, dexp, X);
    aff_args a = {codes, bits, bits == 2 ? 8 : (bits == 4 ? 16 : 32), nblk, scales, zeros, gstart, G, xq, dexp, X,
                  n, m, bias, y, y_bf16};
    rows_fn fn = rows_scalar;
#if AFF_X86
    if (isa == ISA_AVX2) fn = rows_avx2;
    else if (isa == ISA_AVXVNNI) fn = rows_avxvnni;
    else if (isa == ISA_AVX512VNNI) fn = rows_avx512;
#endif
    /* chunks of 16 rows: whole register tiles, and enough chunks to share among threads */
    const int chunk = 16, nchunks = (n + chunk - 1) / chunk;
    if (nthreads == 1 || nchunks == 1) {
        fn(&a, 0, n);
    } else {
        #pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int c = 0; c < nchunks; c++) fn(&a, c * chunk, c * chunk + chunk < n ? c * chunk + chunk : n);
    }
    free(xq); free(dexp); free(X);
    return isa;
}

#elif defined(AFF_BODY_256)
/* ========================================================================================== 256-bit body
   (included twice: AVX2 with maddubs, AVX-VNNI with dpbusd) */

INLINE __m256i NAME(unpack)(const uint8_t *row, int b, int bits) {
    const int per = 8 / bits;
    const __m256i v = _mm256_loadu_si256((const __m256i *)(row + (size_t)(b / per) * 32));
    if (bits == 8)   /* AVX2 maddubs saturates pairs of u8 x s8 products above 32767: run 8-bit codes as q - 128 */
        return VNNI ? v : _mm256_xor_si256(v, _mm256_set1_epi8((char)0x80));
#if VNNI
    return _mm256_and_si256(v, _mm256_set1_epi8((char)(((1 << bits) - 1) << (bits * (b % per)))));
#else
    return _mm256_and_si256(_mm256_srli_epi16(v, bits * (b % per)), _mm256_set1_epi8((char)((1 << bits) - 1)));
#endif
}

/* 8 int32 partial sums of <u, s> over 32 bytes; signed8: u holds q - 128 as int8 (AVX2, 8-bit codes) */
INLINE __m256 NAME(dot)(__m256i u, __m256i s, int signed8) {
#if VNNI
    (void)signed8;
    return _mm256_cvtepi32_ps(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s));
#else
    if (signed8) {
        s = _mm256_sign_epi8(s, u);
        u = _mm256_sign_epi8(u, u);
    }
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

INLINE float NAME(hsum)(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE float NAME(zero_term)(const aff_args *a, int r, int mm, float zshift) {
    const uint16_t *s = a->scales + (size_t)r * a->G;
    const uint8_t *z = a->zeros + (size_t)r * a->G;
    const float *X = a->X + (size_t)mm * a->G;
    __m256 acc = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= a->G; g += 8) {
        const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + g)));
        const __m256 zv = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(z + g)))),
                                        _mm256_set1_ps(zshift));
        acc = _mm256_fmadd_ps(_mm256_mul_ps(sv, zv), _mm256_loadu_ps(X + g), acc);
    }
    return NAME(hsum)(acc) + zero_term_scalar(a, r, mm, g, zshift);
}

/* R output rows x M activation rows, starting at rows r0 and m0 */
INLINE void NAME(tile)(const aff_args *a, int r0, int m0, const int R, const int M, const int BITS) {
    const int signed8 = !VNNI && BITS == 8;
    const size_t rowbytes = (size_t)a->nblk * a->bpb;
    __m256 acc[4][4], gacc[4][4];
    for (int r = 0; r < R; r++)
        for (int mm = 0; mm < M; mm++) acc[r][mm] = _mm256_setzero_ps();
    for (int g = 0; g < a->G; g++) {
        for (int r = 0; r < R; r++)
            for (int mm = 0; mm < M; mm++) gacc[r][mm] = _mm256_setzero_ps();
        for (int b = a->gstart[g]; b < a->gstart[g + 1]; b++) {
            __m256i u[4];
            for (int r = 0; r < R; r++) u[r] = NAME(unpack)(a->codes + (size_t)(r0 + r) * rowbytes, b, BITS);
            for (int mm = 0; mm < M; mm++) {
                const __m256i s = _mm256_loadu_si256((const __m256i *)(a->xq + (size_t)(m0 + mm) * a->nblk * 32 + (size_t)b * 32));
                const __m256 d = _mm256_loadu_ps(a->dexp + (size_t)(m0 + mm) * a->nblk * 8 + (size_t)b * 8);
                for (int r = 0; r < R; r++) gacc[r][mm] = _mm256_fmadd_ps(NAME(dot)(u[r], s, signed8), d, gacc[r][mm]);
            }
        }
        for (int r = 0; r < R; r++) {
            const __m256 sv = _mm256_set1_ps(_cvtsh_ss(a->scales[(size_t)(r0 + r) * a->G + g]));
            for (int mm = 0; mm < M; mm++) acc[r][mm] = _mm256_fmadd_ps(gacc[r][mm], sv, acc[r][mm]);
        }
    }
    const float zshift = signed8 ? 128.f : 0.f;
    for (int r = 0; r < R; r++)
        for (int mm = 0; mm < M; mm++)
            store_y(a, m0 + mm, r0 + r, NAME(hsum)(acc[r][mm]) - NAME(zero_term)(a, r0 + r, m0 + mm, zshift));
}

INLINE void NAME(rows_bits)(const aff_args *a, int r0, int r1, const int BITS) {
    int r = r0;
    if (a->m == 1) {
        for (; r + 4 <= r1; r += 4) NAME(tile)(a, r, 0, 4, 1, BITS);
        for (; r < r1; r++) NAME(tile)(a, r, 0, 1, 1, BITS);
        return;
    }
    for (; r + 2 <= r1; r += 2) {
        int m0 = 0;
        for (; m0 + 2 <= a->m; m0 += 2) NAME(tile)(a, r, m0, 2, 2, BITS);
        for (; m0 < a->m; m0++) NAME(tile)(a, r, m0, 2, 1, BITS);
    }
    for (; r < r1; r++) {
        int m0 = 0;
        for (; m0 + 4 <= a->m; m0 += 4) NAME(tile)(a, r, m0, 1, 4, BITS);
        for (; m0 < a->m; m0++) NAME(tile)(a, r, m0, 1, 1, BITS);
    }
}

/* the bit width as a constant: the block arithmetic becomes shifts */
static void NAME(rows)(const aff_args *a, int r0, int r1) {
    if (a->bits == 2) NAME(rows_bits)(a, r0, r1, 2);
    else if (a->bits == 4) NAME(rows_bits)(a, r0, r1, 4);
    else NAME(rows_bits)(a, r0, r1, 8);
}

#else
/* ========================================================================================== 512-bit body (AVX512-VNNI):
   two blocks per register; a group's odd last block goes through the 256-bit form of the same instructions */

/* blocks b and b + 1 of a row (b even; for 2-bit, b % 4 is 0 or 2) */
static inline __attribute__((always_inline)) __m512i unpack2_512(const uint8_t *row, int b, const int bits) {
    if (bits == 8) return _mm512_loadu_si512((const void *)(row + (size_t)b * 32));
    const int per = 8 / bits, q = b % per;
    const __m512i v = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(row + (size_t)(b / per) * 32)));
    const char lo = (char)(((1 << bits) - 1) << (bits * q)), hi = (char)(((1 << bits) - 1) << (bits * (q + 1)));
    return _mm512_and_si512(v, _mm512_inserti64x4(_mm512_set1_epi8(lo), _mm256_set1_epi8(hi), 1));
}

static inline __attribute__((always_inline)) __m256i unpack1_256(const uint8_t *row, int b, const int bits) {
    const int per = 8 / bits;
    const __m256i v = _mm256_loadu_si256((const __m256i *)(row + (size_t)(b / per) * 32));
    if (bits == 8) return v;
    return _mm256_and_si256(v, _mm256_set1_epi8((char)(((1 << bits) - 1) << (bits * (b % per)))));
}

static inline float zero_term_512(const aff_args *a, int r, int mm) {
    const uint16_t *s = a->scales + (size_t)r * a->G;
    const uint8_t *z = a->zeros + (size_t)r * a->G;
    const float *X = a->X + (size_t)mm * a->G;
    __m512 acc = _mm512_setzero_ps();
    int g = 0;
    for (; g + 16 <= a->G; g += 16) {
        const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + g)));
        const __m512 zv = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(z + g))));
        acc = _mm512_fmadd_ps(_mm512_mul_ps(sv, zv), _mm512_loadu_ps(X + g), acc);
    }
    return _mm512_reduce_add_ps(acc) + zero_term_scalar(a, r, mm, g, 0.f);
}

/* one block through the 256-bit forms, added to the low half of the group accumulators */
static inline __attribute__((always_inline)) void single_512(const aff_args *a, int r0, int m0, const int R,
                                                             const int M, int b, __m512 gacc[4][4], const int BITS) {
    const size_t rowbytes = (size_t)a->nblk * a->bpb;
    __m256i u[4];
    for (int r = 0; r < R; r++) u[r] = unpack1_256(a->codes + (size_t)(r0 + r) * rowbytes, b, BITS);
    for (int mm = 0; mm < M; mm++) {
        const __m256i s = _mm256_loadu_si256((const __m256i *)(a->xq + (size_t)(m0 + mm) * a->nblk * 32 + (size_t)b * 32));
        const __m256 d = _mm256_loadu_ps(a->dexp + (size_t)(m0 + mm) * a->nblk * 8 + (size_t)b * 8);
        for (int r = 0; r < R; r++) {
            const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u[r], s)), d);
            gacc[r][mm] = _mm512_add_ps(gacc[r][mm], _mm512_zextps256_ps512(t));
        }
    }
}

static inline __attribute__((always_inline)) void tile_512(const aff_args *a, int r0, int m0, const int R, const int M, const int BITS) {
    const size_t rowbytes = (size_t)a->nblk * a->bpb;
    const size_t xrow = (size_t)a->nblk * 32, drow = (size_t)a->nblk * 8;
    __m512 acc[4][4], gacc[4][4];
    for (int r = 0; r < R; r++)
        for (int mm = 0; mm < M; mm++) acc[r][mm] = _mm512_setzero_ps();
    for (int g = 0; g < a->G; g++) {
        for (int r = 0; r < R; r++)
            for (int mm = 0; mm < M; mm++) gacc[r][mm] = _mm512_setzero_ps();
        int b = a->gstart[g];
        const int b1 = a->gstart[g + 1];
        if (b & 1) {   /* a group that starts mid-pair: its first block alone */
            single_512(a, r0, m0, R, M, b, gacc, BITS);
            b++;
        }
        for (; b + 2 <= b1; b += 2) {
            __m512i u[4];
            for (int r = 0; r < R; r++) u[r] = unpack2_512(a->codes + (size_t)(r0 + r) * rowbytes, b, BITS);
            for (int mm = 0; mm < M; mm++) {
                const __m512i s = _mm512_loadu_si512((const void *)(a->xq + (size_t)(m0 + mm) * xrow + (size_t)b * 32));
                const __m512 d = _mm512_loadu_ps(a->dexp + (size_t)(m0 + mm) * drow + (size_t)b * 8);
                for (int r = 0; r < R; r++)
                    gacc[r][mm] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u[r], s)),
                                                  d, gacc[r][mm]);
            }
        }
        if (b < b1) single_512(a, r0, m0, R, M, b, gacc, BITS);
        for (int r = 0; r < R; r++) {
            const __m512 sv = _mm512_set1_ps(_cvtsh_ss(a->scales[(size_t)(r0 + r) * a->G + g]));
            for (int mm = 0; mm < M; mm++) acc[r][mm] = _mm512_fmadd_ps(gacc[r][mm], sv, acc[r][mm]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int mm = 0; mm < M; mm++)
            store_y(a, m0 + mm, r0 + r, _mm512_reduce_add_ps(acc[r][mm]) - zero_term_512(a, r0 + r, m0 + mm));
}

static inline __attribute__((always_inline)) void rows_512_bits(const aff_args *a, int r0, int r1, const int BITS) {
    int r = r0;
    if (a->m == 1) {
        for (; r + 4 <= r1; r += 4) tile_512(a, r, 0, 4, 1, BITS);
        for (; r < r1; r++) tile_512(a, r, 0, 1, 1, BITS);
        return;
    }
    for (; r + 4 <= r1; r += 4) {
        int m0 = 0;
        for (; m0 + 2 <= a->m; m0 += 2) tile_512(a, r, m0, 4, 2, BITS);
        for (; m0 < a->m; m0++) tile_512(a, r, m0, 4, 1, BITS);
    }
    for (; r < r1; r++) {
        int m0 = 0;
        for (; m0 + 4 <= a->m; m0 += 4) tile_512(a, r, m0, 1, 4, BITS);
        for (; m0 < a->m; m0++) tile_512(a, r, m0, 1, 1, BITS);
    }
}

static void rows_avx512(const aff_args *a, int r0, int r1) {
    if (a->bits == 2) rows_512_bits(a, r0, r1, 2);
    else if (a->bits == 4) rows_512_bits(a, r0, r1, 4);
    else rows_512_bits(a, r0, r1, 8);
}
#endif
