/* Attention of one query position over the KV cache, the decode step of a causal LM (hf_vq/nn/kernel_native_attention.py
   owns the build): out[b, h] = softmax(scale * q[b, h] . k[b, g]^T + mask) v[b, g], g = h / (Hq / Hkv) (grouped-query
   heads read their key/value head in place, no repeat). bf16 or fp32 tensors; dot products, softmax and the weighted
   sum of values in fp32; the output rounded once to the input dtype. A boolean mask (true: attend) may broadcast over
   batch and heads; NULL attends to every key. A row whose keys are all masked gives zeros.

   The query heads that share a key/value head are taken together (up to HEADS at a time), so each key and value row
   is read and widened to fp32 once for all of them. The positions are cut into chunks of CHUNK (flash-decoding):
   each (batch, key/value head, chunk) is one task giving, per query head, its largest score, its sum of exponentials
   and its unnormalized weighted sum of values; the chunks are then combined. The chunks are fixed, so the result
   does not depend on the number of threads. The arithmetic is in 16-float vectors (GCC vector extensions: one
   AVX-512 register, two AVX2 registers, or scalar code, whatever the build targets), the exponential a
   Cephes-style polynomial; the dot products of 16 keys are summed across lanes together. */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "bf16.h"

#define MAX_D 512
#define HEADS 8                        /* query heads of one key/value head per pass */
#define CHUNK 256                      /* positions per task */
#define PARALLEL_MIN_READS 65536.0     /* key + value elements: below, one thread */

typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

typedef struct {
    const void *q; long long qsb, qsh;
    const void *k; long long ksb, ksh, ksl;
    const void *v; long long vsb, vsh, vsl;
    const uint8_t *mask; long long msb, msh, msl;
    int bf16, B, Hq, Hkv, D, L;
    float scale;
    void *out;
} da_args;

static inline v16f vload(const void *base, long long off, int bf16) {
    v16f f;
    if (bf16) {
        v16h h;
        memcpy(&h, (const uint16_t *)base + off, sizeof h);
        const v16u w = __builtin_convertvector(h, v16u) << 16;
        memcpy(&f, &w, sizeof f);
    } else {
        memcpy(&f, (const float *)base + off, sizeof f);
    }
    return f;
}

static inline float sload(const void *base, long long off, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[off]) : ((const float *)base)[off];
}

static inline float hsum(v16f v) {
    v = v + __builtin_shuffle(v, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    v = v + __builtin_shuffle(v, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    v = v + __builtin_shuffle(v, (v16i){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    v = v + __builtin_shuffle(v, (v16i){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return v[0];
}

/* lane j: the sum of P[j]'s 16 lanes (a transposing tree: 15 adds for 16 sums, where 16 separate sums take 64) */
static inline v16f hsum16(const v16f *P) {
    v16f A[8], B[4], C[2];
    for (int j = 0; j < 8; j++)
        A[j] = __builtin_shuffle(P[j], P[j + 8], (v16i){0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23})
             + __builtin_shuffle(P[j], P[j + 8], (v16i){8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
    for (int j = 0; j < 4; j++)
        B[j] = __builtin_shuffle(A[j], A[j + 4], (v16i){0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27})
             + __builtin_shuffle(A[j], A[j + 4], (v16i){4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
    for (int j = 0; j < 2; j++)
        C[j] = __builtin_shuffle(B[j], B[j + 2], (v16i){0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29})
             + __builtin_shuffle(B[j], B[j + 2], (v16i){2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
    return __builtin_shuffle(C[0], C[1], (v16i){0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30})
         + __builtin_shuffle(C[0], C[1], (v16i){1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
}

/* m ? a : b lane by lane (m: all ones or zeros, as comparisons give) */
static inline v16f vsel(v16i m, v16f a, v16f b) {
    return (v16f)(((v16i)a & m) | ((v16i)b & ~m));
}

/* e^x for x <= 0 (Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, times 2^n) */
static inline v16f vexp(v16f x) {
    const v16f lo = x - x - 87.0f;
    x = vsel(x < lo, lo, x);   /* e^-87 is still a normal float */
    const v16f fx = x * 1.44269504088896341f + 0.5f;
    v16f n = __builtin_convertvector(__builtin_convertvector(fx, v16i), v16f);
    n = vsel(n > fx, n - 1.0f, n);   /* floor */
    const v16f r = x - n * 0.693359375f + n * 2.12194440e-4f;
    v16f y = r * 1.9875691500e-4f + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const v16u e = (v16u)(__builtin_convertvector(n, v16i) + 127) << 23;
    v16f p;
    memcpy(&p, &e, sizeof p);
    return y * p;
}

static inline int attends(const da_args *a, int b, int h, int l) {
    return !a->mask || a->mask[b * a->msb + h * a->msh + l * a->msl];
}

/* One task: query heads h0 .. h0 + R - 1 (all of key/value head g) of batch b over positions [l0, l1). Writes per
   head R x (D + 2) floats to part: its largest score, its sum of exponentials, its unnormalized sum of values.
   DV: D / 16 when the caller knows it (64 or 128: registers), else 0 (any D). */
static inline __attribute__((always_inline))
void chunk_heads(const da_args *a, int b, int g, int h0, int R, int l0, int l1, float *part, const int DV) {
    const int D = a->D, nv = DV ? DV : D / 16, tail = DV ? 0 : D % 16, bf16 = a->bf16;
    float q[HEADS][MAX_D] __attribute__((aligned(64)));
    float sc[HEADS][CHUNK] __attribute__((aligned(64)));
    float mx[HEADS];
    for (int r = 0; r < R; r++) {
        for (int d = 0; d < D; d++) q[r][d] = sload(a->q, b * a->qsb + (h0 + r) * a->qsh + d, bf16);
        mx[r] = -INFINITY;
    }
    const int n = l1 - l0;
    /* 16 positions at a time: their dot products summed across lanes together; lanes past n score -inf */
    v16f mxv[HEADS];
    for (int r = 0; r < R; r++) mxv[r] = (v16f){0} - INFINITY;
    for (int i0 = 0; i0 < n; i0 += 16) {   /* CHUNK is a multiple of 16: sc holds a whole last block */
        const int cnt = n - i0 < 16 ? n - i0 : 16;
        v16f P[HEADS][16];
        float tl[HEADS][16];
        for (int j = 0; j < 16; j++) {
            if (j >= cnt) {
                for (int r = 0; r < R; r++) { P[r][j] = (v16f){0}; tl[r][j] = 0.0f; }
                continue;
            }
            const long long ko = b * a->ksb + g * a->ksh + (long long)(l0 + i0 + j) * a->ksl;
            v16f kv[MAX_D / 16];
            for (int v = 0; v < nv; v++) kv[v] = vload(a->k, ko + 16 * v, bf16);
            for (int r = 0; r < R; r++) {
                v16f s = {0}, qv;
                for (int v = 0; v < nv; v++) { memcpy(&qv, q[r] + 16 * v, sizeof qv); s += qv * kv[v]; }
                P[r][j] = s;
                float t = 0.0f;
                for (int d = 16 * nv; d < 16 * nv + tail; d++) t += q[r][d] * sload(a->k, ko + d, bf16);
                tl[r][j] = t;
            }
        }
        /* masked keys (their rows may hold anything) and lanes past n score -inf; a mask that broadcasts over
           heads is read once for all R heads */
        const int masked = a->mask || cnt < 16, per_head = a->mask && a->msh;
        v16i keep;
        if (masked && !per_head)
            for (int j = 0; j < 16; j++) keep[j] = j < cnt && attends(a, b, h0, l0 + i0 + j) ? -1 : 0;
        for (int r = 0; r < R; r++) {
            v16f sv = hsum16(P[r]), t;
            if (tail) { memcpy(&t, tl[r], sizeof t); sv += t; }
            sv *= a->scale;
            if (masked) {
                if (per_head)
                    for (int j = 0; j < 16; j++) keep[j] = j < cnt && attends(a, b, h0 + r, l0 + i0 + j) ? -1 : 0;
                sv = vsel(keep, sv, (v16f){0} - INFINITY);
            }
            memcpy(sc[r] + i0, &sv, sizeof sv);
            mxv[r] = vsel(sv > mxv[r], sv, mxv[r]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < 16; j++) if (mxv[r][j] > mx[r]) mx[r] = mxv[r][j];
    /* scores -> exponentials (0 where masked), and their sums */
    float tot[HEADS];
    for (int r = 0; r < R; r++) {
        v16f acc = {0};
        float rest = 0.0f;
        int i = 0;
        if (mx[r] != -INFINITY) {
            for (; i + 16 <= n; i += 16) {
                v16f s;
                memcpy(&s, sc[r] + i, sizeof s);
                const v16f p = vsel(s == -INFINITY, (v16f){0}, vexp(s - mx[r]));   /* 0 where masked */
                memcpy(sc[r] + i, &p, sizeof p);
                acc += p;
            }
            for (; i < n; i++) {
                v16f s = {0};
                s[0] = sc[r][i];
                const float p = sc[r][i] == -INFINITY ? 0.0f : vexp(s - mx[r])[0];
                sc[r][i] = p;
                rest += p;
            }
        }
        tot[r] = (mx[r] != -INFINITY ? hsum(acc) : 0.0f) + rest;
    }
    v16f acc[HEADS][MAX_D / 16];
    float acct[HEADS][16];
    for (int r = 0; r < R; r++) {
        for (int j = 0; j < nv; j++) acc[r][j] = (v16f){0};
        for (int d = 0; d < tail; d++) acct[r][d] = 0.0f;
    }
    for (int i = 0; i < n; i++) {
        int any = 0;
        for (int r = 0; r < R && !any; r++) any = mx[r] != -INFINITY && sc[r][i] != 0.0f;
        if (!any) continue;
        const long long vo = b * a->vsb + g * a->vsh + (long long)(l0 + i) * a->vsl;
        v16f vv[MAX_D / 16];
        for (int j = 0; j < nv; j++) vv[j] = vload(a->v, vo + 16 * j, bf16);
        for (int r = 0; r < R; r++) {
            const float p = mx[r] != -INFINITY ? sc[r][i] : 0.0f;
            if (p == 0.0f) continue;
            for (int j = 0; j < nv; j++) acc[r][j] += p * vv[j];
            for (int d = 0; d < tail; d++) acct[r][d] += p * sload(a->v, vo + 16 * nv + d, bf16);
        }
    }
    for (int r = 0; r < R; r++) {
        float *o = part + (size_t)r * (D + 2);
        o[0] = mx[r];
        o[1] = tot[r];
        for (int j = 0; j < nv; j++) memcpy(o + 2 + 16 * j, &acc[r][j], sizeof(v16f));
        for (int d = 0; d < tail; d++) o[2 + 16 * nv + d] = acct[r][d];
    }
}

static void run_task(const da_args *a, int b, int g, int h0, int R, int l0, int l1, float *part) {
    if (a->D == 64) chunk_heads(a, b, g, h0, R, l0, l1, part, 4);
    else if (a->D == 128) chunk_heads(a, b, g, h0, R, l0, l1, part, 8);
    else chunk_heads(a, b, g, h0, R, l0, l1, part, 0);
}

/* q: [B, Hq, D] by strides (qsb, qsh), d contiguous; k, v: [B, Hkv, L, D] by strides, d contiguous; mask: bytes
   [B, Hq, L] by strides (0 to broadcast) or NULL; out: [B, Hq, D] contiguous. Returns 0, or -1 on a bad argument. */
int decode_attention(const void *q, int bf16, int B, int Hq, int Hkv, int D, int L, long long qsb, long long qsh,
                     const void *k, long long ksb, long long ksh, long long ksl,
                     const void *v, long long vsb, long long vsh, long long vsl,
                     const uint8_t *mask, long long msb, long long msh, long long msl,
                     float scale, void *out, int nthreads) {
    if (!q || !k || !v || !out || B < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || D < 1 || D > MAX_D || L < 0) return -1;
    /* keys after the last one any row attends to are left out (a static cache's unused tail) */
    if (mask) {
        int last = -1;
        for (int b = 0; b < (msb ? B : 1); b++)
            for (int h = 0; h < (msh ? Hq : 1); h++)
                for (int l = L - 1; l > last; l--)
                    if (mask[b * msb + h * msh + l * msl]) { last = l; break; }
        L = last + 1;
    }
    da_args a = {q, qsb, qsh, k, ksb, ksh, ksl, v, vsb, vsh, vsl, mask, msb, msh, msl, bf16, B, Hq, Hkv, D, L, scale,
                 out};
    const int rep = Hq / Hkv, nhb = (rep + HEADS - 1) / HEADS, nch = L > CHUNK ? (L + CHUNK - 1) / CHUNK : 1;
    const int ntasks = B * Hkv * nhb * nch;
    /* per (batch, query head, chunk): max, sum, D sums; indexed [b][h][chunk] */
    float *part = (float *)malloc(sizeof(float) * (size_t)B * Hq * nch * (D + 2));
    if (!part) return -1;
    #define TASK(t) do {                                                                                         \
        const int c_ = (t) % nch, hb_ = (t) / nch % nhb, g_ = (t) / nch / nhb % Hkv, b_ = (t) / nch / nhb / Hkv; \
        const int h0_ = g_ * rep + hb_ * HEADS, R_ = rep - hb_ * HEADS < HEADS ? rep - hb_ * HEADS : HEADS;      \
        const int l0_ = c_ * CHUNK, l1_ = l0_ + CHUNK < L ? l0_ + CHUNK : L;                                    \
        float *tmp_ = (float *)__builtin_alloca(sizeof(float) * (size_t)R_ * (D + 2));                          \
        run_task(&a, b_, g_, h0_, R_, l0_, l1_, tmp_);                                                          \
        for (int r_ = 0; r_ < R_; r_++)                                                                          \
            memcpy(part + (((size_t)b_ * Hq + h0_ + r_) * nch + c_) * (D + 2), tmp_ + (size_t)r_ * (D + 2),     \
                   sizeof(float) * (size_t)(D + 2));                                                            \
    } while (0)
    if (nthreads < 1) nthreads = 1;
    if (nthreads == 1 || ntasks == 1 || 2.0 * B * Hkv * (double)L * D < PARALLEL_MIN_READS) {
        for (int t = 0; t < ntasks; t++) TASK(t);
    } else {
        #pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int t = 0; t < ntasks; t++) TASK(t);
    }
    #undef TASK
    /* combine the chunks of each row: weights e^(max_c - max) */
    for (int row = 0; row < B * Hq; row++) {
        const float *p = part + (size_t)row * nch * (D + 2);
        float m = -INFINITY, total = 0.0f, acc[MAX_D];
        for (int c = 0; c < nch; c++) if (p[c * (D + 2)] > m) m = p[c * (D + 2)];
        for (int d = 0; d < D; d++) acc[d] = 0.0f;
        if (m != -INFINITY) {
            for (int c = 0; c < nch; c++) {
                const float *pc = p + c * (D + 2);
                if (pc[0] == -INFINITY) continue;
                const float w = nch == 1 ? 1.0f : expf(pc[0] - m);
                total += w * pc[1];
                for (int d = 0; d < D; d++) acc[d] += w * pc[2 + d];
            }
        }
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        const size_t o = (size_t)row * D;
        if (bf16) { uint16_t *y = (uint16_t *)out + o; for (int d = 0; d < D; d++) y[d] = f32_to_bf16(acc[d] * inv); }
        else { float *y = (float *)out + o; for (int d = 0; d < D; d++) y[d] = acc[d] * inv; }
    }
    free(part);
    return 0;
}
