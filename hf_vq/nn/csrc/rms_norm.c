/* RMSNorm for the decode step: y = w * (x / sqrt(mean(x^2) + eps)) per row (hf_vq/nn/kernel_native_norm.py owns the
   build). It computes what transformers' Llama-family RMSNorm computes, rounding included: x in fp32, the mean of
   squares in fp32, r = 1 / sqrt(mean + eps), h = x * r rounded to the input dtype, then y = w * h rounded to the
   input dtype (bf16 x bf16 products are exact in fp32). The only difference is the order of the fp32 sum.
   One call replaces the seven small torch ops of that forward: on a decode token their dispatch, not the
   arithmetic, is the cost. */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <math.h>

#include "bf16.h"

#define LANES 16   /* independent partial sums: lets the compiler vectorize the sum of squares */

/* x, y: [rows, n] contiguous, both bf16 (bf16 = 1) or both fp32; w: [n] of the same dtype. Returns 0, or -1 on a
   bad argument. */
int rms_norm(const void *x, int bf16, int rows, int n, const void *w, float eps, void *y) {
    if (!x || !w || !y || rows < 0 || n <= 0) return -1;
    for (int r = 0; r < rows; r++) {
        float part[LANES] = {0};
        int j = 0;
        if (bf16) {
            const uint16_t *xr = (const uint16_t *)x + (size_t)r * n;
            for (; j + LANES <= n; j += LANES)
                for (int l = 0; l < LANES; l++) { float v = bf16_to_f32(xr[j + l]); part[l] += v * v; }
            for (; j < n; j++) { float v = bf16_to_f32(xr[j]); part[0] += v * v; }
        } else {
            const float *xr = (const float *)x + (size_t)r * n;
            for (; j + LANES <= n; j += LANES)
                for (int l = 0; l < LANES; l++) part[l] += xr[j + l] * xr[j + l];
            for (; j < n; j++) part[0] += xr[j] * xr[j];
        }
        float sum = 0.0f;
        for (int l = 0; l < LANES; l++) sum += part[l];
        const float inv = 1.0f / sqrtf(sum / (float)n + eps);
        if (bf16) {
            const uint16_t *xr = (const uint16_t *)x + (size_t)r * n, *wr = (const uint16_t *)w;
            uint16_t *yr = (uint16_t *)y + (size_t)r * n;
            for (j = 0; j < n; j++) {
                const float h = bf16_to_f32(f32_to_bf16(bf16_to_f32(xr[j]) * inv));
                yr[j] = f32_to_bf16(bf16_to_f32(wr[j]) * h);
            }
        } else {
            const float *xr = (const float *)x + (size_t)r * n, *wr = (const float *)w;
            float *yr = (float *)y + (size_t)r * n;
            for (j = 0; j < n; j++) yr[j] = wr[j] * (xr[j] * inv);
        }
    }
    return 0;
}
