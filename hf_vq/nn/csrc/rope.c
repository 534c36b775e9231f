/* Rotary position embedding of one position per sequence, the decode step (hf_vq/nn/kernel_native_rope.py owns the
   build): out = x * cos + rotate_half(x) * sin with rotate_half(x) = (-x[D/2:], x[:D/2]), each product and the sum
   rounded to the input dtype as transformers' Llama-family apply_rotary_pos_emb computes it in bf16 (in fp32 the
   roundings are those of fp32). */
#include <stdint.h>
#include <stddef.h>
#include <string.h>

#include "bf16.h"

static inline float rnd(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

/* x: [B, H, D] with row stride xs (elements) and batch stride xb, D contiguous; cos, sin: [B, D] contiguous;
   out: [B, H, D] contiguous; all bf16 (bf16 = 1) or all fp32. D even. Returns 0, or -1 on a bad argument. */
int rope(const void *x, int bf16, int B, int H, int D, long long xb, long long xs, const void *cos, const void *sin,
         void *out) {
    if (!x || !cos || !sin || !out || B < 1 || H < 1 || D < 2 || D % 2) return -1;
    const int half = D / 2;
    for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
            const size_t xo = (size_t)b * xb + (size_t)h * xs, oo = ((size_t)b * H + h) * D, co = (size_t)b * D;
            for (int d = 0; d < D; d++) {
                const int p = d < half ? d + half : d - half;   /* the partner element of rotate_half */
                float xv, xp, c, s;
                if (bf16) {
                    xv = bf16_to_f32(((const uint16_t *)x)[xo + d]);
                    xp = bf16_to_f32(((const uint16_t *)x)[xo + p]);
                    c = bf16_to_f32(((const uint16_t *)cos)[co + d]);
                    s = bf16_to_f32(((const uint16_t *)sin)[co + d]);
                } else {
                    xv = ((const float *)x)[xo + d];
                    xp = ((const float *)x)[xo + p];
                    c = ((const float *)cos)[co + d];
                    s = ((const float *)sin)[co + d];
                }
                const float r = d < half ? -xp : xp;
                const float v = rnd(rnd(xv * c, bf16) + rnd(r * s, bf16), bf16);
                if (bf16) ((uint16_t *)out)[oo + d] = f32_to_bf16(v);
                else ((float *)out)[oo + d] = v;
            }
        }
    return 0;
}
