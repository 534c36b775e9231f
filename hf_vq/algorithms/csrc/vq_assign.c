/* GPTVQ's nearest-centroid step (hf_vq/algorithms/gptvq.py owns the data layout).

   x, w: fp32 [B, m, d] contiguous (vectors and their per-element weights); ct: fp32 [B, d, k], the centroids
   transposed so the inner loop runs over contiguous centroids (vectorises); out: int64 [B, m].
   out[b][i] = argmin_j sum_t w[b][i][t] * (x[b][i][t] - ct[b][t][j])^2, the first j on ties.
   The direct form, not |x|^2 - 2xc + |c|^2 as a matmul: with d <= 8 a matmul's inner dimension is too short to be
   fast, and the direct form cannot cancel. The weights must be >= 0: the distances are then >= 0 (or NaN), and
   such floats order as their bit patterns do as int32, so the minimum is an integer reduction, which vectorises
   (a float min with its index does not without -ffast-math). Vectors are independent: threads split the B * m
   vectors. */
#include <stdint.h>
#include <string.h>

#define TILE 256 /* centroids per pass: any k, with the distances on the stack */

void vq_assign(const float *x, const float *w, const float *ct, long B, long m, int k, int d, int64_t *out,
               int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long v = 0; v < B * m; v++) {
        const float *xv = x + v * d, *wv = w + v * d, *cb = ct + (v / m) * (long)d * k;
        float dist[TILE];
        int32_t bits[TILE];
        int32_t bd = INT32_MAX;
        long best = 0;
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
            memcpy(bits, dist, sizeof(float) * (size_t)n);
            int32_t lo = INT32_MAX;
            for (int j = 0; j < n; j++) lo = bits[j] < lo ? bits[j] : lo;
            if (lo < bd) { /* strictly smaller: an equal distance in a later tile is not the first */
                int j = 0;
                while (bits[j] != lo) j++;
                bd = lo;
                best = j0 + j;
            }
        }
        out[v] = best;
    }
}
