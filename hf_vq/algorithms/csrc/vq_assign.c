/* GPTVQ's nearest-centroid step (hf_vq/algorithms/gptvq.py owns the data layout).

   x, w: fp32 [B, m, d] contiguous (vectors and their per-element weights); ct: fp32 [B, d, k], the centroids
   transposed so the inner loop runs over contiguous centroids (vectorises); out: int64 [B, m].
   out[b][i] = argmin_j sum_t w[b][i][t] * (x[b][i][t] - ct[b][t][j])^2, the first j on ties.
   The direct form, not |x|^2 - 2xc + |c|^2 as a matmul: with d <= 8 a matmul's inner dimension is too short to be
   fast, and the direct form cannot cancel. The weights must be >= 0: the distances are then >= 0 (or NaN), and
   such floats order as their bit patterns do as int32, so the minimum with its index is the minimum of the int64
   keys (bits << 32 | j), an integer reduction that vectorises (a float min with its index does not without
   -ffast-math). Vectors are independent: threads split the B * m vectors. */
#include <stdint.h>
#include <string.h>

#define TILE 256 /* centroids per pass: any k, with the distances on the stack */

/* argmin_j sum_t wv[t] * (xv[t] - cb[t * k + j])^2 for one vector, the first j on ties: the minimum of the keys
   (distance bits << 32 | j), so the smallest distance wins and, among equal ones, the smallest j */
static inline long assign_one(const float *xv, const float *wv, const float *cb, int k, int d) {
    float dist[TILE];
    int64_t best = INT64_MAX;
    for (int j0 = 0; j0 < k; j0 += TILE) {
        const int n = k - j0 < TILE ? k - j0 : TILE;
        for (int j = 0; j < n; j++) dist[j] = 0.0f;
        for (int t = 0; t < d; t++) {
            const float xt = xv[t], wt = wv[t];
            const float *c = cb + (long)t * k + j0;
            for (int j = 0; j < n; j++) {
                const float e = xt - c[j];
                dist[j] += wt * e * e;
            }
        }
        for (int j = 0; j < n; j++) {
            int32_t bits;
            memcpy(&bits, dist + j, sizeof bits);
            const int64_t key = (int64_t)bits << 32 | (int64_t)(j0 + j);
            best = key < best ? key : best;
        }
    }
    return (long)(best & 0xffffffff);
}

void vq_assign(const float *x, const float *w, const float *ct, long B, long m, int k, int d, int64_t *out,
               int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long v = 0; v < B * m; v++)
        out[v] = assign_one(x + v * d, w + v * d, ct + (v / m) * (long)d * k, k, d);
}

/* One EM step of weighted k-means, batched over B codebooks: the assignment above, then the M-step's sums
   num[b][j][t] = sum over vectors i assigned to j of w[b][i][t] * x[b][i][t], den[b][j][t] = sum of w[b][i][t]
   (both [B, k, d], zeroed here), accumulated in vector order, as torch's scatter_add_ does. prev (int64 [B, m], or
   NULL) is the previous assignment: the return value is how many assignments differ from it (B * m without it).
   Threads split the codebooks, so each codebook's sums are accumulated by one thread in a fixed order. */
long vq_em_step(const float *x, const float *w, const float *ct, long B, long m, int k, int d, int64_t *out,
                const int64_t *prev, float *num, float *den, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    long changed = 0;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) reduction(+ : changed)
    for (long b = 0; b < B; b++) {
        float *nb = num + b * (long)k * d, *db = den + b * (long)k * d;
        memset(nb, 0, sizeof(float) * (size_t)k * d);
        memset(db, 0, sizeof(float) * (size_t)k * d);
        const float *cb = ct + b * (long)d * k;
        for (long i = 0; i < m; i++) {
            const long v = b * m + i, j = assign_one(x + v * d, w + v * d, cb, k, d);
            out[v] = j;
            const float *xv = x + v * d, *wv = w + v * d;
            for (int t = 0; t < d; t++) {
                nb[j * d + t] += wv[t] * xv[t];
                db[j * d + t] += wv[t];
            }
            if (prev == NULL || prev[v] != j) changed++;
        }
    }
    return changed;
}

/* GPTVQ's error feedback over one lazy block of nb columns (nb a multiple of d), every row of the weight.
   w (in/out), s (data-normalization scales), lw (lookup weights): fp32 [N, nb] row-major; err: fp32 [N, nb] out;
   ct: the codebooks transposed, fp32 [N / r, d, k] (row n uses codebook n / r); u: the block's [nb, nb] slice of the
   upper Cholesky factor of H^-1, row stride ldu; idx: int64 [N, nb / d] out. For each vector column in order:
   idx = the nearest centroid of w / s under lw, q = centroid * s, then column by column err = (w - q) / u[c][c] and
   the columns after c within the block absorb err: w[c'] -= err * u[c][c'] for c' >= c (as gptvq.py's torch loop).
   Rows are independent here, so threads split them. */
void vq_gptq_block(float *w, const float *s, const float *lw, const float *ct, const float *u, long ldu, long N,
                   int nb, long r, int k, int d, float *err, int64_t *idx, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long n = 0; n < N; n++) {
        float *wn = w + n * nb, *en = err + n * nb;
        const float *sn = s + n * nb, *ln = lw + n * nb, *cb = ct + (n / r) * (long)d * k;
        float xv[8];
        for (int i = 0; i < nb; i += d) {
            for (int t = 0; t < d; t++) xv[t] = wn[i + t] / sn[i + t];
            const long j = assign_one(xv, ln + i, cb, k, d);
            idx[n * (nb / d) + i / d] = j;
            float q[8];
            for (int t = 0; t < d; t++) q[t] = cb[(long)t * k + j] * sn[i + t];
            for (int t = 0; t < d; t++) {
                const int c = i + t;
                const float *uc = u + c * ldu;
                const float e = (wn[c] - q[t]) / uc[c];
                for (int c2 = c; c2 < nb; c2++) wn[c2] -= e * uc[c2];
                en[c] = e;
            }
        }
    }
}
