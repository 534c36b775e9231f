/* Included by affine_gemm.c (no include guard: once per instruction set, under its target pragma). */
/* ========================================================================================== 512-bit body:
   a zmm holds the 16 rows of a tile */

/* M activation rows from m0 against T tiles from t (T 16-row tiles side by side). One row (decode): fields are
   taken in place, as code << (BITS f), one AND each, with an exact shift per block. Several rows: fields are shifted
   down once (shared by all rows) and summed in one int32 accumulator per row; two tiles share each broadcast of the
   activations (loads, not arithmetic, bound this loop), so 4 rows x 2 tiles fit the 32 registers. */
INLINE void tile_512(const aff_args *a, int t, int m0, const int M, const int T, const int BITS) {
    const int F = 8 / BITS, COLS = 32 / BITS, SHIFTED = M > 1 || T > 1, NACC = SHIFTED ? 1 : F;
    const __m512i mask = _mm512_set1_epi8((char)((1 << BITS) - 1));
    __m512 acc[8][2];
    for (int mm = 0; mm < M; mm++)
        for (int tt = 0; tt < T; tt++) acc[mm][tt] = _mm512_setzero_ps();
    for (int g = 0; g < a->G; g++) {
        __m512 gacc[8][2];
        for (int mm = 0; mm < M; mm++)
            for (int tt = 0; tt < T; tt++) gacc[mm][tt] = _mm512_setzero_ps();
        for (int b = a->gstart[g]; b < a->gstart[g + 1]; b++) {
            const uint8_t *blk[2];
            for (int tt = 0; tt < T; tt++) {
                blk[tt] = block_codes(a, t + tt, b);
                for (int c = 0; c < BITS; c++)
                    _mm_prefetch((const char *)(blk[tt] + PREFETCH_AHEAD + 64 * c), _MM_HINT_NTA);
            }
            __m512i iacc[8][2][4];
            for (int mm = 0; mm < M; mm++)
                for (int tt = 0; tt < T; tt++)
                    for (int f = 0; f < NACC; f++) iacc[mm][tt][f] = _mm512_setzero_si512();
            for (int c = 0; c < BITS; c++) {
                __m512i w[2];
                for (int tt = 0; tt < T; tt++) w[tt] = _mm512_loadu_si512((const void *)(blk[tt] + 64 * c));
                for (int f = 0; f < F; f++) {
                    __m512i u[2];
                    for (int tt = 0; tt < T; tt++) {
                        u[tt] = w[tt];
                        if (BITS < 8)
                            u[tt] = SHIFTED ? _mm512_and_si512(f ? _mm512_srli_epi16(w[tt], BITS * f) : w[tt], mask)
                                            : _mm512_and_si512(w[tt], _mm512_slli_epi16(mask, BITS * f));
                    }
                    for (int mm = 0; mm < M; mm++) {
                        int32_t q4;
                        memcpy(&q4, a->xq + (size_t)(m0 + mm) * a->nblk * 32 + (size_t)b * 32 + c * COLS + 4 * f, 4);
                        const __m512i q = _mm512_set1_epi32(q4);
                        for (int tt = 0; tt < T; tt++) {
                            __m512i *dst = &iacc[mm][tt][SHIFTED ? 0 : f];
                            *dst = _mm512_dpbusd_epi32(*dst, u[tt], q);
                        }
                    }
                }
            }
            for (int mm = 0; mm < M; mm++) {
                const __m512 d = _mm512_set1_ps(a->d[(size_t)(m0 + mm) * a->nblk + b]);
                for (int tt = 0; tt < T; tt++) {
                    __m512i isum = iacc[mm][tt][0];
                    for (int f = 1; f < NACC; f++)
                        isum = _mm512_add_epi32(isum, _mm512_srai_epi32(iacc[mm][tt][f], BITS * f));
                    gacc[mm][tt] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), d, gacc[mm][tt]);
                }
            }
        }
        for (int tt = 0; tt < T; tt++) {
            const size_t at = ((size_t)(t + tt) * a->G + g) * TILE;
            const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(a->scales + at)));
            const __m512 sz = _mm512_mul_ps(s, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(a->zeros + at)))));
            for (int mm = 0; mm < M; mm++) {
                acc[mm][tt] = _mm512_fmadd_ps(gacc[mm][tt], s, acc[mm][tt]);
                acc[mm][tt] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(a->X[(size_t)(m0 + mm) * a->G + g]), acc[mm][tt]);
            }
        }
    }
    for (int mm = 0; mm < M; mm++)
        for (int tt = 0; tt < T; tt++) {
            float v[TILE];
            _mm512_storeu_ps(v, acc[mm][tt]);
            store_tile(a, m0 + mm, (t + tt) * TILE, v);
        }
}

INLINE void tiles_512_bits(const aff_args *a, int t0, int t1, const int BITS) {
    int t = t0;
    for (; a->m > 1 && t + 2 <= t1; t += 2) {   /* pairs of tiles for several rows */
        int m0 = 0;
        for (; m0 + 4 <= a->m; m0 += 4) tile_512(a, t, m0, 4, 2, BITS);
        if (a->m - m0 >= 2) { tile_512(a, t, m0, 2, 2, BITS); m0 += 2; }
        if (m0 < a->m) tile_512(a, t, m0, 1, 2, BITS);
    }
    for (; t < t1; t++) {
        int m0 = 0;
        for (; m0 + 8 <= a->m; m0 += 8) tile_512(a, t, m0, 8, 1, BITS);
        if (a->m - m0 >= 4) { tile_512(a, t, m0, 4, 1, BITS); m0 += 4; }
        if (a->m - m0 >= 2) { tile_512(a, t, m0, 2, 1, BITS); m0 += 2; }
        if (m0 < a->m) tile_512(a, t, m0, 1, 1, BITS);
    }
}

static void tiles_avx512(const aff_args *a, int t0, int t1) {
    if (a->bits == 2) tiles_512_bits(a, t0, t1, 2);
    else if (a->bits == 4) tiles_512_bits(a, t0, t1, 4);
    else tiles_512_bits(a, t0, t1, 8);
}
