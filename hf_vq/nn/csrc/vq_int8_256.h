/* Included by vq_int8.c (no include guard: once per instruction set, under its target pragma). */
/* ========================================================================================== 256-bit body
   (included twice: AVX2 with maddubs, AVX-VNNI with dpbusd). A ymm holds 8 rows: half h of a 16-row tile.
   Lookups: KC = 16 (one pshufb), 64 (4 pshufb, 3 blends) or 256 (16 pshufb, 15 blends) table entries. */

/* quantize_acts (same rounding: x * (127 / amax), plus +-0.5, truncated), 8 floats at a time */
INLINE void NAME(quant_block)(const __m256 *v, const int D, int8_t *out, float *dout, int32_t *aout) {
    const __m256 absm = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v[0], absm), _mm256_and_ps(v[1], absm)),
                                    _mm256_max_ps(_mm256_and_ps(v[2], absm), _mm256_and_ps(v[3], absm)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 idv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i q[4];
    for (int i = 0; i < 4; i++) {
        const __m256 r = _mm256_mul_ps(v[i], idv);
        const __m256 h = _mm256_or_ps(_mm256_and_ps(r, _mm256_set1_ps(-0.f)), _mm256_set1_ps(0.5f));
        /* -0.0 takes -0.5 here and +0.5 in the scalar path: both truncate to 0 */
        q[i] = _mm256_cvttps_epi32(_mm256_add_ps(r, h));
        q[i] = _mm256_min_epi32(_mm256_max_epi32(q[i], _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
    }
    __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));   /* column order */
    _mm256_storeu_si256((__m256i *)out, vq8_deinterleave(p, D));
    *aout = -128 * _mm_cvtsi128_si32(s4);
    *dout = amax / 127.f;
}

INLINE void NAME(quantize_d)(const void *x, int x_bf16, int r0, int r1, int k, int nblk, const int D, int grouped,
                             int8_t *xq, float *d, int32_t *asum) {
    for (int mm = r0; mm < r1; mm++)
        for (int b = 0; b < nblk; b++) {
            const int c0 = b * 32;
            __m256 v[4];
            if (c0 + 32 <= k) {
                for (int i = 0; i < 4; i++) {
                    if (x_bf16) {
                        const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + (size_t)mm * k + c0 + 8 * i));
                        v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
                    } else {
                        v[i] = _mm256_loadu_ps((const float *)x + (size_t)mm * k + c0 + 8 * i);
                    }
                }
            } else {   /* the partial last block: zeros beyond k */
                float tmp[32];
                partial_block(x, x_bf16, k, mm, c0, tmp);
                for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(tmp + 8 * i);
            }
            const size_t at = xq_at(grouped, nblk, mm) + (size_t)b * (grouped ? 8 : 1);
            NAME(quant_block)(v, D, xq + at * 32, d + at, asum + at);
        }
}

static void NAME(quantize)(const void *x, int x_bf16, int r0, int r1, int k, int nblk, int D, int grouped,
                           int8_t *xq, float *d, int32_t *asum) {
    if (D == 1) NAME(quantize_d)(x, x_bf16, r0, r1, k, nblk, 1, grouped, xq, d, asum);
    else if (D == 2) NAME(quantize_d)(x, x_bf16, r0, r1, k, nblk, 2, grouped, xq, d, asum);
    else NAME(quantize_d)(x, x_bf16, r0, r1, k, nblk, 4, grouped, xq, d, asum);
}

/* the KC-entry table lookup of 32 index bytes; T holds KC / 16 subtables, each in both 128-bit lanes */
/* the codebook byte tables of segment s of tile t, in registers (NS per component); AVX2 multiplies signed codes
   (maddubs would saturate on c + 128) */
INLINE void NAME(load_tables)(const vq8_args *a, int t, int s, const int D, const int NS, __m256i T[4][16]) {
    const uint8_t *tab = seg_tables(a, t, s);
    for (int e = 0; e < D; e++)
        for (int j = 0; j < NS; j++) {
            T[e][j] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tab + e * a->kp + 16 * j)));
            if (!VNNI) T[e][j] = _mm256_xor_si256(T[e][j], _mm256_set1_epi8((char)0x80));
        }
}

INLINE __m256i NAME(lookup)(const __m256i *T, __m256i idx, const int KC) {
    if (KC == 16) return _mm256_shuffle_epi8(T[0], idx);
    /* blendv takes bit 7 of each mask byte: index bit 4 + L is moved there by a 16-bit shift (3 - L): bits that
       cross into the next byte land in its low bits, never in its bit 7 */
    const __m256i lo = KC == 256 ? _mm256_and_si256(idx, _mm256_set1_epi8(0x0f)) : idx;
    const __m256i m4 = _mm256_slli_epi16(idx, 3), m5 = _mm256_slli_epi16(idx, 2);
    __m256i r[16];
    for (int j = 0; j < KC / 16; j++) r[j] = _mm256_shuffle_epi8(T[j], lo);
    for (int j = 0; j < KC / 32; j++) r[j] = _mm256_blendv_epi8(r[2 * j], r[2 * j + 1], m4);
    for (int j = 0; j < KC / 64; j++) r[j] = _mm256_blendv_epi8(r[2 * j], r[2 * j + 1], m5);
    if (KC == 256) {
        const __m256i m6 = _mm256_slli_epi16(idx, 1);
        r[0] = _mm256_blendv_epi8(r[0], r[1], m6);
        r[1] = _mm256_blendv_epi8(r[2], r[3], m6);
        r[0] = _mm256_blendv_epi8(r[0], r[1], idx);
    }
    return r[0];
}

/* the end of segment s for M rows of half h of tile t: their block sums times the segment's scales, into acc */
INLINE void NAME(end_segment)(const vq8_args *a, int t, int h, int s, const __m256 *gacc, __m256 *acc, const int M) {
    const __m256 sc = _mm256_loadu_ps(tile_scales(a, t, s) + 8 * h);
    for (int mm = 0; mm < M; mm++) acc[mm] = _mm256_fmadd_ps(gacc[mm], sc, acc[mm]);
}

/* M rows from m0 of half h of tile t, from their accumulators to y */
INLINE void NAME(store_half)(const vq8_args *a, int t, int h, int m0, const __m256 *acc, const int M) {
    for (int mm = 0; mm < M; mm++) {
        float v[8];
        _mm256_storeu_ps(v, acc[mm]);
        store_rows(a, m0 + mm, t, 8 * h, 8, v);
    }
}

/* one tile half, M activation rows from m0 */
INLINE void NAME(tile)(const vq8_args *a, int t, int h, int m0, const int M, const int D, const int KC) {
    const int CH = 8 / D, SL = 32 / D, NS = KC / 16;
    const int NA = M == 1 ? 4 : 2;   /* independent integer accumulator chains per activation row */
    __m256 acc[4];
    for (int mm = 0; mm < M; mm++) acc[mm] = _mm256_setzero_ps();
    for (int s = 0; s < a->nseg; s++) {
        __m256i T[4][16];
        NAME(load_tables)(a, t, s, D, NS, T);
        __m256 gacc[4];
        for (int mm = 0; mm < M; mm++) gacc[mm] = _mm256_setzero_ps();
        for (int b = a->seg_start[s]; b < a->seg_start[s + 1]; b++) {
            const uint8_t *raw = tile_block_idx(a, t, b);
            if (h == 0)
                for (int c = 0; c < CH; c++) _mm_prefetch((const char *)(raw + PREFETCH_AHEAD + 64 * c), _MM_HINT_NTA);
            uint8_t buf[512];
            const uint8_t *ib = (a->packed ? (unpack_block(raw, D, buf), buf) : raw) + 32 * h;
            __m256i iacc[4][4];
            for (int mm = 0; mm < M; mm++) {
                /* VNNI multiplies c + 128: its block sum starts at -128 * sum(a) */
                iacc[mm][0] = VNNI ? _mm256_set1_epi32(a->asum[(size_t)(m0 + mm) * a->nblk + b]) : _mm256_setzero_si256();
                for (int j = 1; j < NA; j++) iacc[mm][j] = _mm256_setzero_si256();
            }
            for (int c = 0; c < CH; c++) {
                const __m256i idx = _mm256_loadu_si256((const __m256i *)(ib + 64 * c));
                for (int e = 0; e < D; e++) {
                    const __m256i w = NAME(lookup)(T[e], idx, KC);
#if !VNNI
                    const __m256i aw = _mm256_sign_epi8(w, w);   /* |c| (-128 -> 128 as unsigned) */
#endif
                    const int j = (c * D + e) % NA;
                    for (int mm = 0; mm < M; mm++) {
                        int32_t q4;
                        memcpy(&q4, a->xq + ((size_t)(m0 + mm) * a->nblk + b) * 32 + e * SL + 4 * c, 4);
                        const __m256i xv = _mm256_set1_epi32(q4);
#if VNNI
                        iacc[mm][j] = _mm256_dpbusd_avx_epi32(iacc[mm][j], w, xv);
#else
                        const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, w));
                        iacc[mm][j] = _mm256_add_epi32(iacc[mm][j], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
                    }
                }
            }
            for (int mm = 0; mm < M; mm++) {
                __m256i isum = iacc[mm][0];
                for (int j = 1; j < NA; j++) isum = _mm256_add_epi32(isum, iacc[mm][j]);
                const __m256 dv = _mm256_set1_ps(a->d[(size_t)(m0 + mm) * a->nblk + b]);
                gacc[mm] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), dv, gacc[mm]);
            }
        }
        NAME(end_segment)(a, t, h, s, gacc, acc, M);
    }
    NAME(store_half)(a, t, h, m0, acc, M);
}

/* tile t's codes (VNNI: c + 128; AVX2: c) in the layout the row loop multiplies: per block of 32 columns 8 vectors of
   64 bytes (rows 0-7 in the first 32, rows 8-15 in the second), vector q = e * (8 / D) + c holding component e of
   index chunk c; the 4 activation bytes that vector q multiplies are bytes 4q..4q+3 of the block's activations */
INLINE void NAME(decode_tile)(const vq8_args *a, int t, const int D, const int KC, uint8_t *out) {
    const int CH = 8 / D, NS = KC / 16;
    for (int s = 0; s < a->nseg; s++) {
        __m256i T[4][16];
        NAME(load_tables)(a, t, s, D, NS, T);
        for (int b = a->seg_start[s]; b < a->seg_start[s + 1]; b++) {
            const uint8_t *ib = tile_block_idx(a, t, b);
            uint8_t buf[512];
            if (a->packed) { unpack_block(ib, D, buf); ib = buf; }
            uint8_t *ob = out + (size_t)b * 512;
            for (int c = 0; c < CH; c++)
                for (int h = 0; h < 2; h++) {
                    const __m256i idx = _mm256_loadu_si256((const __m256i *)(ib + 64 * c + 32 * h));
                    for (int e = 0; e < D; e++)
                        _mm256_store_si256((__m256i *)(ob + 64 * (e * CH + c) + 32 * h), NAME(lookup)(T[e], idx, KC));
                }
        }
    }
}

/* M activation rows from m0 against half h of tile t, decoded at w: per (vector, row) a dpbusd (AVX2: sign, maddubs,
   madd, add); the same integer sums and float operations per row as tile() */
INLINE void NAME(rows)(const vq8_args *a, int t, int h, const uint8_t *w, int m0, const int M) {
    const size_t xr = xq_at(1, a->nblk, m0);
    __m256 acc[4];
    for (int mm = 0; mm < M; mm++) acc[mm] = _mm256_setzero_ps();
    for (int s = 0; s < a->nseg; s++) {
        __m256 gacc[4];
        for (int mm = 0; mm < M; mm++) gacc[mm] = _mm256_setzero_ps();
        for (int b = a->seg_start[s]; b < a->seg_start[s + 1]; b++) {
            const size_t at = xr + (size_t)b * 8;   /* row m0 + mm at at + mm (rows grouped by 8) */
            const int8_t *xb = a->xq + at * 32;
            const uint8_t *wb = w + (size_t)b * 512 + 32 * h;
            __m256i iacc[4];
            for (int mm = 0; mm < M; mm++)
                iacc[mm] = VNNI ? _mm256_set1_epi32(a->asum[at + mm]) : _mm256_setzero_si256();
            for (int q = 0; q < 8; q++) {
                const __m256i wv = _mm256_load_si256((const __m256i *)(wb + 64 * q));
#if !VNNI
                const __m256i aw = _mm256_sign_epi8(wv, wv);
#endif
                for (int mm = 0; mm < M; mm++) {
                    int32_t q4;
                    memcpy(&q4, xb + 32 * mm + 4 * q, 4);
                    const __m256i xv = _mm256_set1_epi32(q4);
#if VNNI
                    iacc[mm] = _mm256_dpbusd_avx_epi32(iacc[mm], wv, xv);
#else
                    const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
                    iacc[mm] = _mm256_add_epi32(iacc[mm], _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
#endif
                }
            }
            for (int mm = 0; mm < M; mm++) {
                const __m256 dv = _mm256_set1_ps(a->d[at + mm]);
                gacc[mm] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[mm]), dv, gacc[mm]);
            }
        }
        NAME(end_segment)(a, t, h, s, gacc, acc, M);
    }
    NAME(store_half)(a, t, h, m0, acc, M);
}

/* every activation row against tile t, decoded at w */
static void NAME(rows_all)(const vq8_args *a, int t, const uint8_t *w) {
    for (int h = 0; h < 2; h++) {
        if (8 * h >= a->tile_cnt[t]) break;
        int m0 = 0;
        for (; m0 + 4 <= a->m; m0 += 4) NAME(rows)(a, t, h, w, m0, 4);
        if (a->m - m0 >= 2) { NAME(rows)(a, t, h, w, m0, 2); m0 += 2; }
        if (m0 < a->m) NAME(rows)(a, t, h, w, m0, 1);
    }
}

/* many rows (prefill): each tile's codes are looked up once, into buf, for all rows */
INLINE void NAME(tiles_many_dk)(const vq8_args *a, int t0, int t1, const int D, const int KC, uint8_t *buf) {
    for (int t = t0; t < t1; t++) {
        NAME(decode_tile)(a, t, D, KC, buf);
        NAME(rows_all)(a, t, buf);
    }
}

static void NAME(tiles_many)(const vq8_args *a, int t0, int t1, uint8_t *buf) {
    const int D = a->D;
    if (a->k <= 16) NAME(tiles_many_dk)(a, t0, t1, D, 16, buf);
    else if (a->k <= 64) NAME(tiles_many_dk)(a, t0, t1, D, 64, buf);
    else NAME(tiles_many_dk)(a, t0, t1, D, 256, buf);
}

INLINE void NAME(tiles_dk)(const vq8_args *a, int t0, int t1, const int D, const int KC) {
    for (int t = t0; t < t1; t++) {
        prefetch_record_head(a, t);
        for (int h = 0; h < 2; h++) {
            if (8 * h >= a->tile_cnt[t]) break;
            int m0 = 0;
            for (; m0 + 2 <= a->m; m0 += 2) NAME(tile)(a, t, h, m0, 2, D, KC);
            for (; m0 < a->m; m0++) NAME(tile)(a, t, h, m0, 1, D, KC);
        }
    }
}

INLINE void NAME(tiles_d)(const vq8_args *a, int t0, int t1, const int D) {
    if (a->k <= 16) NAME(tiles_dk)(a, t0, t1, D, 16);
    else if (a->k <= 64) NAME(tiles_dk)(a, t0, t1, D, 64);
    else NAME(tiles_dk)(a, t0, t1, D, 256);
}

#include "vq_int8_entry.h"

