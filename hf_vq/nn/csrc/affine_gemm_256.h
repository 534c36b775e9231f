/* Included by affine_gemm.c (no include guard: once per instruction set, under its target pragma). */
/* ========================================================================================== 256-bit body
   (included twice: AVX2 with maddubs, AVX-VNNI with dpbusd). A ymm holds 8 rows: half h of a 16-row tile. */

/* int32 lane sums of <u, s> over groups of 4 bytes; u unsigned (u < 128 for AVX2, or q ^ 0x80 with signed8) */
INLINE __m256i NAME(dot)(__m256i acc, __m256i u, __m256i s, int signed8) {
#if VNNI
    (void)signed8;
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    if (signed8) {   /* maddubs saturates pairs of u8 x s8 products above 32767: run 8-bit codes as q - 128 */
        s = _mm256_sign_epi8(s, u);
        u = _mm256_sign_epi8(u, u);
    }
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* M activation rows from m0 against H halves of tile t from half h0 (H = 2: both halves share each broadcast of the
   activations). AVX2 on 2/4-bit codes sums a block's maddubs pairs in int16 (at most 8 x 2 x 15 x 127 = 30480, exact)
   and widens once per block. */
INLINE void NAME(tile)(const aff_args *a, int t, int h0, const int H, int m0, const int M, const int BITS) {
    const int F = 8 / BITS, COLS = 32 / BITS;
    const int signed8 = !VNNI && BITS == 8, I16 = !VNNI && BITS < 8, NACC = I16 ? 1 : F;
    const __m256i mask = _mm256_set1_epi8((char)((1 << BITS) - 1));
    __m256 acc[2][2];
    for (int mm = 0; mm < M; mm++)
        for (int hh = 0; hh < H; hh++) acc[mm][hh] = _mm256_setzero_ps();
    for (int g = 0; g < a->G; g++) {
        __m256 gacc[2][2];
        for (int mm = 0; mm < M; mm++)
            for (int hh = 0; hh < H; hh++) gacc[mm][hh] = _mm256_setzero_ps();
        for (int b = a->gstart[g]; b < a->gstart[g + 1]; b++) {
            const uint8_t *blk = block_codes(a, t, b);
            if (h0 == 0)
                for (int c = 0; c < BITS; c++) _mm_prefetch((const char *)(blk + PREFETCH_AHEAD + 64 * c), _MM_HINT_NTA);
            __m256i iacc[2][2][4];
            for (int mm = 0; mm < M; mm++)
                for (int hh = 0; hh < H; hh++)
                    for (int f = 0; f < NACC; f++) iacc[mm][hh][f] = _mm256_setzero_si256();
            for (int c = 0; c < BITS; c++) {
                __m256i w[2];
                for (int hh = 0; hh < H; hh++)
                    w[hh] = _mm256_loadu_si256((const __m256i *)(blk + 64 * c + 32 * (h0 + hh)));
                for (int f = 0; f < F; f++) {
                    __m256i u[2];
                    for (int hh = 0; hh < H; hh++) {
                        if (BITS == 8) u[hh] = VNNI ? w[hh] : _mm256_xor_si256(w[hh], _mm256_set1_epi8((char)0x80));
                        else if (VNNI) u[hh] = _mm256_and_si256(w[hh], _mm256_slli_epi16(mask, BITS * f));   /* c << (BITS f) */
                        else u[hh] = _mm256_and_si256(_mm256_srli_epi16(w[hh], BITS * f), mask);
                    }
                    for (int mm = 0; mm < M; mm++) {
                        int32_t q4;
                        memcpy(&q4, a->xq + (size_t)(m0 + mm) * a->nblk * 32 + (size_t)b * 32 + c * COLS + 4 * f, 4);
                        const __m256i q = _mm256_set1_epi32(q4);
                        for (int hh = 0; hh < H; hh++) {
                            if (I16) iacc[mm][hh][0] = _mm256_add_epi16(iacc[mm][hh][0], _mm256_maddubs_epi16(u[hh], q));
                            else iacc[mm][hh][f] = NAME(dot)(iacc[mm][hh][f], u[hh], q, signed8);
                        }
                    }
                }
            }
            for (int mm = 0; mm < M; mm++) {
                const __m256 d = _mm256_set1_ps(a->d[(size_t)(m0 + mm) * a->nblk + b]);
                for (int hh = 0; hh < H; hh++) {
                    __m256i isum = I16 ? _mm256_madd_epi16(iacc[mm][hh][0], _mm256_set1_epi16(1)) : iacc[mm][hh][0];
                    for (int f = 1; f < NACC; f++)   /* VNNI fields were taken in place, as c << (BITS f): exact shifts */
                        isum = _mm256_add_epi32(isum, VNNI ? _mm256_srai_epi32(iacc[mm][hh][f], BITS * f) : iacc[mm][hh][f]);
                    gacc[mm][hh] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), d, gacc[mm][hh]);
                }
            }
        }
        for (int hh = 0; hh < H; hh++) {
            const size_t at = ((size_t)t * a->G + g) * TILE + 8 * (h0 + hh);
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a->scales + at)));
            const __m256 sz = _mm256_mul_ps(s, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(a->zeros + at)))));
            for (int mm = 0; mm < M; mm++) {
                acc[mm][hh] = _mm256_fmadd_ps(gacc[mm][hh], s, acc[mm][hh]);
                acc[mm][hh] = _mm256_fnmadd_ps(sz, _mm256_set1_ps(a->X[(size_t)(m0 + mm) * a->G + g]), acc[mm][hh]);
            }
        }
    }
    if (signed8) {   /* <q - 128, a> was computed: add back 128 * s * X over the groups */
        for (int g = 0; g < a->G; g++)
            for (int hh = 0; hh < H; hh++) {
                const size_t at = ((size_t)t * a->G + g) * TILE + 8 * (h0 + hh);
                const __m256 s = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(a->scales + at))),
                                               _mm256_set1_ps(128.f));
                for (int mm = 0; mm < M; mm++)
                    acc[mm][hh] = _mm256_fmadd_ps(s, _mm256_set1_ps(a->X[(size_t)(m0 + mm) * a->G + g]), acc[mm][hh]);
            }
    }
    /* each half stores its 8 rows: store_tile takes 16 lanes, so pad */
    for (int mm = 0; mm < M; mm++)
        for (int hh = 0; hh < H; hh++) {
            float v[TILE] = {0.f};
            _mm256_storeu_ps(v, acc[mm][hh]);
            const int r0 = t * TILE + 8 * (h0 + hh);
            const int cnt = a->n - r0 < 8 ? a->n - r0 : 8;
            const size_t o = (size_t)(m0 + mm) * a->n + r0;
            for (int i = 0; i < cnt; i++) {
                const float y = v[i] + (a->bias ? a->bias[r0 + i] : 0.f);
                if (a->y_bf16) ((uint16_t *)a->y)[o + i] = f32_to_bf16(y);
                else ((float *)a->y)[o + i] = y;
            }
        }
}

INLINE void NAME(tiles_bits)(const aff_args *a, int t0, int t1, const int BITS) {
    for (int t = t0; t < t1; t++) {
        const int halves = t * TILE + 8 < a->n ? 2 : 1;
        for (int h = 0; h < halves; h++) {   /* pairs of rows: one half at a time (16 registers) */
            int m0 = 0;
            for (; m0 + 2 <= a->m; m0 += 2) NAME(tile)(a, t, h, 1, m0, 2, BITS);
            if (m0 < a->m && halves == 1) NAME(tile)(a, t, 0, 1, m0, 1, BITS);
        }
        if ((a->m & 1) && halves == 2) NAME(tile)(a, t, 0, 2, a->m - 1, 1, BITS);   /* a single row: both halves */
    }
}

/* the bit width as a constant, so the field loops unroll */
static void NAME(tiles)(const aff_args *a, int t0, int t1) {
    if (a->bits == 2) NAME(tiles_bits)(a, t0, t1, 2);
    else if (a->bits == 4) NAME(tiles_bits)(a, t0, t1, 4);
    else NAME(tiles_bits)(a, t0, t1, 8);
}

