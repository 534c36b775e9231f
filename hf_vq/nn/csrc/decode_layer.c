/* A Llama-family decoder layer's decode step (one position, batch 1) in two calls (hf_vq/nn/kernel_native_layer.py
   owns the build; hf_vq/model/decode_layer.py decides when it runs):

   layer_pre:  x = RMSNorm(h); y = [q | k | v] = x @ W_qkv^T (+ bias); qk = rotary(q), rotary(k)
   (k and v written to the caller's KV cache, or left to the caller to append)
   layer_post: a = attention(q, keys, values); h1 = h + a @ W_o^T; x = RMSNorm(h1);
               [g | u] = x @ W_gate_up^T; out = h1 + (silu(g) * u) @ W_down^T
   layer_step: both, on a cache with room for k and v
   stack_step: layer_step of every layer of a model in turn (one call per decode token)

   Each intermediate is rounded to the hidden states' dtype where transformers' modules round it (every op's output
   in bf16), so the step computes what the layer's own forward computes. The projections are called through one ABI
   that each native layer kernel exports (affine_projection, vq8_projection: ``proj_fn`` below), by pointer, so this
   file knows no weight layout. Norms, rotary embedding and attention are hf_vq's own kernels, included. */
#include "rms_norm.c"
#include "rope.c"
#include "decode_attention.c"
#include <time.h>

typedef int (*proj_fn)(const void *ctx, const void *x, int bf16, void *y, const float *bias, int nthreads, int isa);

typedef struct {
    proj_fn fn; const void *ctx; const float *bias; int32_t isa;
} dl_proj;

/* q/k/v (and gate/up) are one projection writing all of them side by side (k.fn and v.fn, up.fn NULL), or one
   projection each, writing at its first column */
typedef struct {
    dl_proj q, k, v, o, gate, up, down;
    const void *norm1, *norm2;       /* RMSNorm weights, the hidden states' dtype */
    float eps1, eps2, scale;
    int32_t bf16, hidden, D, hq, hk;
    int32_t sq, sk, sv;              /* first columns of q, k, v in the q/k/v output */
    int32_t sg, su, inter;           /* first columns of gate and up in the gate/up output; their width */
    int32_t gu_n;                    /* width of the gate/up output */
} dl_layer;

static inline int project(const dl_proj *p, const void *x, int bf16, void *y, int nthreads) {
    return p->fn(p->ctx, x, bf16, y, p->bias, nthreads, p->isa);
}

static inline float load_at(const void *p, size_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_at(void *p, size_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* out = a + b, rounded to the dtype */
static void add_rows(const void *a, const void *b, void *out, int n, int bf16) {
    for (int i = 0; i < n; i++) store_at(out, i, load_at(a, i, bf16) + load_at(b, i, bf16), bf16);
}

/* out = silu(g) * u with silu(g) = g / (1 + exp(-g)) rounded to the dtype first, as torch's two ops do */
static void silu_mul(const void *g, const void *u, void *out, int n, int bf16) {
    for (int i = 0; i < n; i++) {
        const float gv = load_at(g, i, bf16);
        float s = gv / (1.0f + expf(-gv));
        if (bf16) s = bf16_to_f32(f32_to_bf16(s));
        store_at(out, i, s * load_at(u, i, bf16), bf16);
    }
}

/* h [hidden] -> y [q/k/v width] and qk [hq + hk, D] (q's heads, then k's, rotated by cos/sin [D]); when kdst is
   not NULL, also the rotated k and the v heads to kdst and vdst (head h at h * kvsh elements: the new position of a
   KV cache). Returns 0, or < 0 when a kernel refused. */
int layer_pre(const dl_layer *L, const void *h, const void *cos, const void *sin, void *y, void *qk, void *kdst,
              void *vdst, long long kvsh, int nthreads) {
    const size_t e = L->bf16 ? 2 : 4;
    void *x = malloc(e * (size_t)L->hidden);
    if (!x) return -1;
    int rc = rms_norm(h, L->bf16, 1, L->hidden, L->norm1, L->eps1, x);
    if (rc >= 0) {
        char *yb = (char *)y;
        if (!L->k.fn) rc = project(&L->q, x, L->bf16, y, nthreads);
        else if ((rc = project(&L->q, x, L->bf16, yb + e * (size_t)L->sq, nthreads)) >= 0
                 && (rc = project(&L->k, x, L->bf16, yb + e * (size_t)L->sk, nthreads)) >= 0)
            rc = project(&L->v, x, L->bf16, yb + e * (size_t)L->sv, nthreads);
    }
    free(x);
    if (rc < 0) return -1;
    const char *yb = (const char *)y;
    if (rope(yb + e * (size_t)L->sq, L->bf16, 1, L->hq, L->D, 0, L->D, cos, sin, qk) < 0) return -1;
    const char *kr = (const char *)qk + e * (size_t)L->hq * L->D;
    if (rope(yb + e * (size_t)L->sk, L->bf16, 1, L->hk, L->D, 0, L->D, cos, sin, (void *)kr) < 0) return -1;
    if (kdst)
        for (int hh = 0; hh < L->hk; hh++) {
            const size_t row = e * (size_t)L->D;
            memcpy((char *)kdst + e * (size_t)(hh * kvsh), kr + row * hh, row);
            memcpy((char *)vdst + e * (size_t)(hh * kvsh), yb + e * (size_t)L->sv + row * hh, row);
        }
    return 0;
}

/* The rest of the step: q [hq, D] contiguous; keys/values [hk, len, D] by strides (head, position), D contiguous;
   mask: bytes [hq, len] by strides (0 to broadcast) or NULL; h and out [hidden]. Returns 0, or < 0 when a kernel
   refused. */
int layer_post(const dl_layer *L, const void *h, const void *q, int len, const void *keys, long long ksh,
               long long ksl, const void *values, long long vsh, long long vsl, const uint8_t *mask, long long msh,
               long long msl, void *out, int nthreads) {
    const size_t e = L->bf16 ? 2 : 4;
    const int H = L->hidden;
    char *buf = (char *)malloc(e * ((size_t)L->hq * L->D + 3 * (size_t)H + (size_t)L->gu_n + (size_t)L->inter));
    if (!buf) return -1;
    void *a = buf, *t = buf + e * (size_t)L->hq * L->D, *h1 = (char *)t + e * H, *x = (char *)h1 + e * H;
    void *gu = (char *)x + e * H, *m = (char *)gu + e * (size_t)L->gu_n;
    int rc = decode_attention(q, L->bf16, 1, L->hq, L->hk, L->D, len, 0, L->D, keys, 0, ksh, ksl, values, 0, vsh, vsl,
                              mask, 0, msh, msl, L->scale, a, nthreads);
    if (rc >= 0) rc = project(&L->o, a, L->bf16, t, nthreads);
    if (rc >= 0) {
        add_rows(h, t, h1, H, L->bf16);
        rc = rms_norm(h1, L->bf16, 1, H, L->norm2, L->eps2, x);
    }
    if (rc >= 0) {
        if (!L->up.fn) rc = project(&L->gate, x, L->bf16, gu, nthreads);
        else if ((rc = project(&L->gate, x, L->bf16, (char *)gu + e * (size_t)L->sg, nthreads)) >= 0)
            rc = project(&L->up, x, L->bf16, (char *)gu + e * (size_t)L->su, nthreads);
    }
    if (rc >= 0) {
        silu_mul((char *)gu + e * (size_t)L->sg, (char *)gu + e * (size_t)L->su, m, L->inter, L->bf16);
        rc = project(&L->down, m, L->bf16, t, nthreads);
    }
    if (rc >= 0) add_rows(h1, t, out, H, L->bf16);
    free(buf);
    return rc < 0 ? -1 : 0;
}

/* The whole step in one call, on a KV cache with room at position n: layer_pre (q/k/v width qkv_n) writing k and v
   at position n of keys/values (strides kvsh, kvsl for both), then layer_post over positions 0..n. */
int layer_step(const dl_layer *L, const void *h, const void *cos, const void *sin, int qkv_n, void *keys,
               void *values, long long kvsh, long long kvsl, int n, const uint8_t *mask, long long msh, long long msl,
               void *out, int nthreads) {
    const size_t e = L->bf16 ? 2 : 4;
    char *buf = (char *)malloc(e * ((size_t)qkv_n + (size_t)(L->hq + L->hk) * L->D));
    if (!buf) return -1;
    char *qk = buf + e * (size_t)qkv_n;
    const size_t at = e * (size_t)n * (size_t)kvsl;
    int rc = layer_pre(L, h, cos, sin, buf, qk, (char *)keys + at, (char *)values + at, kvsh, nthreads);
    if (rc >= 0)
        rc = layer_post(L, h, qk, n + 1, keys, kvsh, kvsl, values, kvsh, kvsl, mask, msh, msl, out, nthreads);
    free(buf);
    return rc;
}

/* Every layer's step in turn, as many layer_step calls, without a mask: layer i on its KV buffers keys[i], values[i]
   (strides kvsh[i], kvsl[i], room at position n[i]), the hidden states handed from one layer to the next in two
   buffers; h and out [hidden]. All layers share cos/sin. Returns 0, or < 0 when a kernel refused. */
int stack_step(const dl_layer *const *layers, int nl, const void *h, const void *cos, const void *sin,
               const int32_t *qkv_n, void *const *keys, void *const *values, const long long *kvsh,
               const long long *kvsl, const int32_t *n, void *out, int nthreads) {
    if (nl < 1) return -1;
    const size_t bytes = (layers[0]->bf16 ? 2 : 4) * (size_t)layers[0]->hidden;
    char *buf = (char *)malloc(2 * bytes);
    if (!buf) return -1;
    const void *cur = h;
    int rc = 0;
    for (int i = 0; i < nl && rc >= 0; i++) {
        void *dst = i == nl - 1 ? out : buf + (size_t)(i & 1) * bytes;
        rc = layer_step(layers[i], cur, cos, sin, qkv_n[i], keys[i], values[i], kvsh[i], kvsl[i], n[i], NULL, 0, 0,
                        dst, nthreads);
        cur = dst;
    }
    free(buf);
    return rc < 0 ? -1 : 0;
}

/* Benchmark aid (benchmarks/kernel_speed.py): the wall time in nanoseconds of `count` one-row calls of a projection
   made as the two calls above make them, call i on context ctxs[i % nctx] (copies of one layer, so that each call
   reads its weights from memory, not from cache). x [k] and y [n] are both bf16 (bf16 = 1) or both fp32.
   Returns < 0 when a call refused. */
long long layer_time_projection(proj_fn fn, const void *const *ctxs, int nctx, int count, const void *x, int bf16,
                                void *y, const float *bias, int nthreads, int isa) {
    struct timespec t0, t1;
    if (nctx < 1 || count < 1 || !timespec_get(&t0, TIME_UTC)) return -1;
    for (int i = 0; i < count; i++)
        if (fn(ctxs[i % nctx], x, bf16, y, bias, nthreads, isa) < 0) return -1;
    timespec_get(&t1, TIME_UTC);
    return (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
}

