/* Activations to int8 in blocks of 32 (llama.cpp's Q8_0), as the native kernels' portable loops compute it, bit for
   bit: d = max|x| / 127, q = x * (127 / max|x|) rounded half away from zero, clamped to [-127, 127] (0 for an all-zero
   block), and the block's sum of q. On AVX-512, four blocks at a time: their horizontal max and sum reductions share
   one set of shuffles instead of four. */
#ifndef HF_VQ_Q8_BLOCK_H
#define HF_VQ_Q8_BLOCK_H
#if defined(__x86_64__) || defined(__i386__)
#include <stdint.h>
#include <immintrin.h>

/* in each 128-bit lane j, the reduction (max or add) of register r[j]'s 16 values, in all 4 of the lane's elements */
#define Q8_REDUCE4(T, OP, SHUF, PERM, r)                                                                          \
    do {                                                                                                          \
        const T s1_ = OP(SHUF(r[0], r[1], 0x44), SHUF(r[0], r[1], 0xEE));                                       \
        const T s2_ = OP(SHUF(r[2], r[3], 0x44), SHUF(r[2], r[3], 0xEE));                                       \
        r[0] = OP(SHUF(s1_, s2_, 0x88), SHUF(s1_, s2_, 0xDD));                                                    \
        r[0] = OP(r[0], PERM(r[0], 0x4E));                                                                        \
        r[0] = OP(r[0], PERM(r[0], 0xB1));                                                                        \
    } while (0)

/* 32 bf16 or fp32 values from p, as fp32 in v[0], v[1] (bf16 widening is exact) */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline))
static inline void q8_load32_avx512(const void *p, int bf16, __m512 *v) {
    if (bf16) {
        const __m512i h = _mm512_loadu_si512(p);
        v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
        v[1] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
    } else {
        v[0] = _mm512_loadu_ps(p);
        v[1] = _mm512_loadu_ps((const float *)p + 16);
    }
}

/* 16 values times 127 / max|x| (id) -> codes as int32: rounded half away from zero, clamped to [-127, 127] */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline))
static inline __m512i q8_codes_avx512(__m512 v, __m512 id) {
    const __m512 r = _mm512_mul_ps(v, id);
    const __m512 half = _mm512_or_ps(_mm512_and_ps(r, _mm512_set1_ps(-0.f)), _mm512_set1_ps(0.5f));
    const __m512i t = _mm512_cvttps_epi32(_mm512_add_ps(r, half));
    return _mm512_min_epi32(_mm512_max_epi32(t, _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
}

/* one block in v[0], v[1] -> its codes as int32 in q[0], q[1] (column order), *d, *sum */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline))
static inline void q8_block_avx512(const __m512 *v, __m512i *q, float *d, int32_t *sum) {
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
    const __m512 id = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    q[0] = q8_codes_avx512(v[0], id);
    q[1] = q8_codes_avx512(v[1], id);
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
    *d = amax / 127.f;
}

/* blocks j = 0..3 in v[2j], v[2j + 1] -> their codes as int32 in q[2j], q[2j + 1] (column order), d[j], sum[j] */
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"), always_inline))
static inline void q8_block4_avx512(const __m512 *v, __m512i *q, float *d, int32_t *sum) {
    __m512 mx[4];
    for (int j = 0; j < 4; j++) mx[j] = _mm512_max_ps(_mm512_abs_ps(v[2 * j]), _mm512_abs_ps(v[2 * j + 1]));
    Q8_REDUCE4(__m512, _mm512_max_ps, _mm512_shuffle_f32x4, _mm512_permute_ps, mx);
    const __m512 amax = mx[0];   /* block j's max in lane j */
    const __mmask16 pos = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 id4 = _mm512_maskz_div_ps(pos, _mm512_set1_ps(127.f), amax);
    __m512i sums[4];
    for (int j = 0; j < 4; j++) {
        const __m512 id = _mm512_shuffle_f32x4(id4, id4, 0x55 * j);
        for (int i = 0; i < 2; i++) q[2 * j + i] = q8_codes_avx512(v[2 * j + i], id);
        sums[j] = _mm512_add_epi32(q[2 * j], q[2 * j + 1]);
    }
    Q8_REDUCE4(__m512i, _mm512_add_epi32, _mm512_shuffle_i32x4, _mm512_shuffle_epi32, sums);
    const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    _mm_storeu_si128((__m128i *)sum, _mm512_castsi512_si128(_mm512_permutexvar_epi32(first, sums[0])));
    _mm_storeu_ps(d, _mm512_castps512_ps128(_mm512_permutexvar_ps(first, _mm512_div_ps(amax, _mm512_set1_ps(127.f)))));
}
#endif
#endif
