/* GPTQ's inner loop over one lazy block of columns (hf_vq/algorithms/gptq.py owns the data layout).

   w, s, z, q, err: fp32 [B, n] row-major: row i is column i of the weight block (all n weight rows), its grid
   scale/zero, then its codes and scaled errors. hinv: the block's [B, B] slice of the upper Cholesky factor of H^-1,
   row stride ldh. For each column i in order: q = clamp(round(w / s) + z, 0, maxq), err = (w - (q - z) s) / hinv[i][i],
   then the columns after i within the block absorb err: w[k] -= hinv[i][k] * err for k > i.
   Weight rows are independent in GPTQ, so threads split the n rows and never synchronise. */
#include <math.h>

void gptq_block(float *w, const float *hinv, long ldh, const float *s, const float *z, int B, long n, float maxq,
                float *q, float *err, int nthreads) {
    if (nthreads < 1) nthreads = 1;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int t = 0; t < nthreads; t++) {
        long r0 = n * t / nthreads, r1 = n * (t + 1) / nthreads;
        for (int i = 0; i < B; i++) {
            const float d = hinv[i * ldh + i];
            float *wi = w + (long)i * n;
            const float *si = s + (long)i * n, *zi = z + (long)i * n;
            float *qi = q + (long)i * n, *ei = err + (long)i * n;
            for (long r = r0; r < r1; r++) {
                float v = nearbyintf(wi[r] / si[r]) + zi[r];
                v = v < 0.0f ? 0.0f : (v > maxq ? maxq : v);
                qi[r] = v;
                ei[r] = (wi[r] - (v - zi[r]) * si[r]) / d;
            }
            for (int k = i + 1; k < B; k++) {
                const float h = hinv[i * ldh + k];
                float *wk = w + (long)k * n;
                for (long r = r0; r < r1; r++) wk[r] -= h * ei[r];
            }
        }
    }
}
