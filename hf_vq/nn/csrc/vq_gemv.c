/* Small-batch VQ GEMV for VQLinear (hf_vq/nn/vq_kernel.py owns the build and the data layout).

   y[b, r] = bias[r] + sum_s scale[r, nb(s)] * sum_{j in segment s} cb[g(r, s)][idx[r, j]] . x[b, j*D : j*D+D]

   idx:  uint8, one codebook index per D-dim vector, tile-major: for each tile of <= TILE rows of one row block, for
         each segment, the tile's rows' indices of that segment one after another (a sequential stream).
   cb:   fp32 [row_blocks * col_blocks, k, D], codebook scales already applied (1D: k padded to >= 8); g(r, s) = (r / rpb) * ncb + seg_cb[s].
   Segments are runs of vectors with one codebook and one normalization block, so the codebook of the inner loop is
   fixed and small (L1) and the normalization scale is one multiply per segment. A tile runs segment by segment, so
   that segment's codebook and activations stay in L1 for all of its rows.
   x:    fp32 [m, xstride], zero beyond in_features (padding codes then add exact zeros). y: fp32 [m, n].
   Compute bound, not bandwidth bound: the AVX2 paths build weight vectors from scalar-indexed loads (cheaper than
   vgather on AMD cores) and reuse each built vector for all m activation rows. */
#include <stdint.h>
#include <stddef.h>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VQ_AVX2 1
#else
#define VQ_AVX2 0
#endif

#define INLINE static inline __attribute__((always_inline))

typedef struct {
    const float *x; int m; int xstride;
    float *y; int n;
    const uint8_t *idx; int nvec;
    const float *cb; int d; int k; int rpb; int ncb;
    const int *seg_start; const int *seg_cb; const int *seg_nb; int nseg;
    const float *ns; int nblk;
    const float *bias;
} vq_args;

/* Portable path: also the tail of the AVX2 path. Adds into sum[b] the segment dot product for vectors [j0, j1). */
INLINE void seg_scalar(const vq_args *a, int M, int D, const uint8_t *id, const float *cbp, int j0, int j1,
                       float scale, float *sum) {
    float part[4] = {0.f, 0.f, 0.f, 0.f};
    for (int j = j0; j < j1; j++) {
        const float *w = cbp + (size_t)id[j - j0] * D;
        for (int b = 0; b < M; b++) {
            const float *xv = a->x + (size_t)b * a->xstride + (size_t)j * D;
            float t = 0.f;
            for (int e = 0; e < D; e++) t += w[e] * xv[e];
            part[b] += t;
        }
    }
    for (int b = 0; b < M; b++) sum[b] += scale * part[b];
}

#if VQ_AVX2
/* 8 consecutive vectors' weights as 8*D/8 ymm registers (D = 1, 2 or 4). */
INLINE void build(int D, const uint8_t *id, const float *cbp, __m256 *w) {
    if (D == 1) {
        uint64_t q;
        __builtin_memcpy(&q, id, 8);
        float f[8];
        for (int t = 0; t < 8; t++) f[t] = cbp[(q >> (8 * t)) & 255];
        w[0] = _mm256_setr_ps(f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7]);
    } else if (D == 2) {
        /* one 8-byte load of the indices, split in registers: fewer load-port uops than 8 byte loads */
        uint64_t q;
        __builtin_memcpy(&q, id, 8);
        const double *p[8];
        for (int t = 0; t < 8; t++) p[t] = (const double *)(cbp + 2 * ((q >> (8 * t)) & 255));
        for (int h = 0; h < 2; h++) {
            __m128 lo = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(p[4 * h]), p[4 * h + 1]));
            __m128 hi = _mm_castpd_ps(_mm_loadh_pd(_mm_load_sd(p[4 * h + 2]), p[4 * h + 3]));
            w[h] = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
        }
    } else {
        for (int h = 0; h < 4; h++)
            w[h] = _mm256_loadu2_m128(cbp + 4 * id[2 * h + 1], cbp + 4 * id[2 * h]);
    }
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Adds scale * (segment dot product of one row) to acc[0..M); id points at the row's indices of the segment. */
INLINE void row_seg(const vq_args *a, int M, int D, const uint8_t *id, const float *cbp, int j0, int j1,
                    float scale, float *acc) {
    int j = j0;
#if VQ_AVX2
    if (j1 - j0 >= 8) {
        /* two accumulator chains per activation row hide the FMA latency */
        __m256 v[4][2];
        for (int b = 0; b < M; b++) v[b][0] = v[b][1] = _mm256_setzero_ps();
        /* a 1D codebook of <= 8 entries (padded to 8 by the caller) is one register: a lookup is one permute */
        const __m256 cbreg = (D == 1 && a->k == 8) ? _mm256_loadu_ps(cbp) : _mm256_setzero_ps();
        for (; j + 8 <= j1; j += 8) {
            __m256 w[4];
            if (D == 1 && a->k == 8)
                w[0] = _mm256_permutevar8x32_ps(cbreg, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(id + (j - j0)))));
            else
                build(D, id + (j - j0), cbp, w);
            for (int b = 0; b < M; b++) {
                const float *xv = a->x + (size_t)b * a->xstride + (size_t)j * D;
                for (int h = 0; h < D; h++)
                    v[b][h & 1] = _mm256_fmadd_ps(w[h], _mm256_loadu_ps(xv + 8 * h), v[b][h & 1]);
            }
        }
        for (int b = 0; b < M; b++) acc[b] += scale * hsum(_mm256_add_ps(v[b][0], v[b][1]));
    }
#endif
    if (j < j1) seg_scalar(a, M, D, id + (j - j0), cbp, j, j1, scale, acc);
}

#define TILE 64

/* Rows [r0, r1) of one row block, segment by segment (a row block's codebooks together can exceed L1, e.g.
   16 x 256 x 2D = 32 KiB, one segment's cannot). */
INLINE void tile(const vq_args *a, int M, int D, int r0, int r1) {
    float acc[TILE][4] = {{0.f}};
    const float *cbrow = a->cb + (size_t)(r0 / a->rpb) * a->ncb * a->k * D;
    for (int s = 0; s < a->nseg; s++) {
        const int j0 = a->seg_start[s], j1 = a->seg_start[s + 1];
        const float *cbp = cbrow + (size_t)a->seg_cb[s] * a->k * D;
        const uint8_t *id = a->idx + (size_t)r0 * a->nvec + (size_t)j0 * (r1 - r0);
        for (int r = r0; r < r1; r++, id += j1 - j0) {
            const float scale = a->ns ? a->ns[(size_t)r * a->nblk + a->seg_nb[s]] : 1.f;
            row_seg(a, M, D, id, cbp, j0, j1, scale, acc[r - r0]);
        }
    }
    for (int r = r0; r < r1; r++)
        for (int b = 0; b < M; b++) a->y[(size_t)b * a->n + r] = acc[r - r0][b] + (a->bias ? a->bias[r] : 0.f);
}

#define ROWS(M, D) \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(nthreads > 1)") \
    for (int t = 0; t < ntiles; t++) { \
        const int rb = t / tpb, r0 = rb * rpb + (t % tpb) * TILE; \
        const int lim = rb * rpb + rpb < n ? rb * rpb + rpb : n; \
        if (r0 < lim) tile(&a, M, D, r0, r0 + TILE < lim ? r0 + TILE : lim); \
    }

#define BY_M(D)                         \
    switch (a.m) {                      \
        case 1: { ROWS(1, D) } break;   \
        case 2: { ROWS(2, D) } break;   \
        case 3: { ROWS(3, D) } break;   \
        default: { ROWS(4, D) } break;  \
    }

/* Returns 0 on success, -1 for an unsupported shape (the caller falls back). */
int vq_gemv(const float *x, int m, int xstride, float *y, int n, const uint8_t *idx, int nvec, const float *cb,
            int d, int k, int rpb, int ncb, const int *seg_start, const int *seg_cb, const int *seg_nb, int nseg,
            const float *ns, int nblk, const float *bias, int nthreads) {
    if (m < 1 || m > 4 || !(d == 1 || d == 2 || d == 4) || rpb < 1) return -1;
    vq_args a = {x, m, xstride, y, n, idx, nvec, cb, d, k, rpb, ncb, seg_start, seg_cb, seg_nb, nseg, ns, nblk, bias};
    if (nthreads < 1) nthreads = 1;
    /* tiles of <= TILE rows that never straddle two row blocks */
    const int rows_in_block = rpb < n ? rpb : n;
    const int tpb = (rows_in_block + TILE - 1) / TILE, nrb = (n + rpb - 1) / rpb, ntiles = nrb * tpb;
    if (d == 1) { BY_M(1) } else if (d == 2) { BY_M(2) } else { BY_M(4) }
    return 0;
}

int vq_simd_width(void) { return VQ_AVX2 ? 8 : 1; }
int vq_tile_rows(void) { return TILE; }
