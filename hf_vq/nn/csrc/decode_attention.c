/* Attention of one query position over the KV cache, the decode step of a causal LM (hf_vq/nn/kernel_native_attention.py
   owns the build): out[b, h] = softmax(scale * q[b, h] . k[b, g]^T + mask) v[b, g], g = h / (Hq / Hkv) (grouped-query
   heads read their key/value head in place, no repeat). bf16 or fp32 tensors; dot products, softmax and the weighted
   sum of values in fp32; the output rounded once to the input dtype. A boolean mask (true: attend) may broadcast over
   batch and heads; NULL attends to every key. A row whose keys are all masked gives zeros.

   A decode token's attention is tiny (one row per head), so torch's general kernels spend most of the call on setup;
   this one reads each key and value once per query head from cache-resident memory. */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "bf16.h"

#define LANES 16
#define MAX_D 512
#define PARALLEL_MIN_READS 1048576.0   /* key + value elements: below, one thread */

typedef struct {
    const void *q; long long qsb, qsh;
    const void *k; long long ksb, ksh, ksl;
    const void *v; long long vsb, vsh, vsl;
    const uint8_t *mask; long long msb, msh, msl;
    int bf16, B, Hq, Hkv, D, L;
    float scale;
    void *out;
} da_args;

static inline void load_row(const da_args *a, const void *base, long long off, float *dst) {
    if (a->bf16) { const uint16_t *p = (const uint16_t *)base + off; for (int d = 0; d < a->D; d++) dst[d] = bf16_to_f32(p[d]); }
    else memcpy(dst, (const float *)base + off, sizeof(float) * (size_t)a->D);
}

static inline float dot(const float *x, const float *y, int D) {
    float part[LANES] = {0};
    int d = 0;
    for (; d + LANES <= D; d += LANES)
        for (int l = 0; l < LANES; l++) part[l] += x[d + l] * y[d + l];
    for (; d < D; d++) part[0] += x[d] * y[d];
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += part[l];
    return s;
}

/* one (batch, query head) row; scores: L floats of scratch */
static void head_row(const da_args *a, int b, int h, float *scores) {
    const int rep = a->Hq / a->Hkv, g = h / rep, D = a->D;
    float qv[MAX_D], row[MAX_D], acc[MAX_D];
    load_row(a, a->q, b * a->qsb + h * a->qsh, qv);
    float mx = -INFINITY;
    for (int l = 0; l < a->L; l++) {
        if (a->mask && !a->mask[b * a->msb + h * a->msh + l * a->msl]) { scores[l] = -INFINITY; continue; }
        load_row(a, a->k, b * a->ksb + g * a->ksh + l * a->ksl, row);
        const float s = dot(qv, row, D) * a->scale;
        scores[l] = s;
        if (s > mx) mx = s;
    }
    for (int d = 0; d < D; d++) acc[d] = 0.0f;
    float total = 0.0f;
    if (mx != -INFINITY) {
        for (int l = 0; l < a->L; l++) {
            if (scores[l] == -INFINITY) continue;
            const float p = expf(scores[l] - mx);
            total += p;
            load_row(a, a->v, b * a->vsb + g * a->vsh + l * a->vsl, row);
            for (int d = 0; d < D; d++) acc[d] += p * row[d];
        }
    }
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    const size_t o = ((size_t)b * a->Hq + h) * D;
    if (a->bf16) { uint16_t *y = (uint16_t *)a->out + o; for (int d = 0; d < D; d++) y[d] = f32_to_bf16(acc[d] * inv); }
    else { float *y = (float *)a->out + o; for (int d = 0; d < D; d++) y[d] = acc[d] * inv; }
}

/* q: [B, Hq, D] by strides (qsb, qsh), d contiguous; k, v: [B, Hkv, L, D] by strides, d contiguous; mask: bytes
   [B, Hq, L] by strides (0 to broadcast) or NULL; out: [B, Hq, D] contiguous. Returns 0, or -1 on a bad argument. */
int decode_attention(const void *q, int bf16, int B, int Hq, int Hkv, int D, int L, long long qsb, long long qsh,
                     const void *k, long long ksb, long long ksh, long long ksl,
                     const void *v, long long vsb, long long vsh, long long vsl,
                     const uint8_t *mask, long long msb, long long msh, long long msl,
                     float scale, void *out, int nthreads) {
    if (!q || !k || !v || !out || B < 1 || Hq < 1 || Hkv < 1 || Hq % Hkv || D < 1 || D > MAX_D || L < 0) return -1;
    da_args a = {q, qsb, qsh, k, ksb, ksh, ksl, v, vsb, vsh, vsl, mask, msb, msh, msl, bf16, B, Hq, Hkv, D, L, scale,
                 out};
    const int rows = B * Hq;
    if (nthreads < 1) nthreads = 1;
    if (nthreads == 1 || rows == 1 || 2.0 * B * Hkv * (double)L * D < PARALLEL_MIN_READS) {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(L > 0 ? L : 1));
        if (!scores) return -1;
        for (int r = 0; r < rows; r++) head_row(&a, r / Hq, r % Hq, scores);
        free(scores);
        return 0;
    }
    int failed = 0;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int r = 0; r < rows; r++) {
        float *scores = (float *)malloc(sizeof(float) * (size_t)(L > 0 ? L : 1));
        if (!scores) { failed = 1; continue; }
        head_row(&a, r / Hq, r % Hq, scores);
        free(scores);
    }
    return failed ? -1 : 0;
}
