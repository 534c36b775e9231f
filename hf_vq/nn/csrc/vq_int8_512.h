/* Included by vq_int8.c (no include guard: once per instruction set, under its target pragma). */
/* ========================================================================================== 512-bit body
   (included twice: AVX512-VNNI with pshufb lookups, AVX512-VBMI with vpermb / vpermi2b): a zmm holds the 16 rows
   of a tile. Lookups: VBMI KC = 64, 128 or 256 entries in KC / 64 registers; else as the 256-bit body, 16 / 64 /
   256 entries in KC / 16 registers (16-entry subtables in every 128-bit lane). */

#if !VBMI
/* one block's codes (int32 in q0, q1, csrc/q8_block.h) stored de-interleaved, with -128 times their sum */
INLINE void NAME(put_block)(__m512i q0, __m512i q1, int32_t sum, const int D, int8_t *out, int32_t *aout) {
    const __m256i p = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(q0)),
                                              _mm512_cvtepi32_epi8(q1), 1);   /* column order */
    _mm256_storeu_si256((__m256i *)out, vq8_deinterleave(p, D));
    *aout = -128 * sum;
}

/* quantize_acts (the same rounding, as the 256-bit body's quant_block), one block of 32 values in two registers */
INLINE void NAME(quant_block)(const __m512 *v, const int D, int8_t *out, float *dout, int32_t *aout) {
    __m512i q[2];
    int32_t sum;
    q8_block_avx512(v, q, dout, &sum);
    NAME(put_block)(q[0], q[1], sum, D, out, aout);
}

/* quant_block on 4 blocks at once (their max and sum reductions share shuffles) */
INLINE void NAME(quant_block4)(const __m512 *v, const int D, int bs, int8_t *out, float *dout, int32_t *aout) {
    __m512i q[8];
    float dv[4];
    int32_t sum[4];
    q8_block4_avx512(v, q, dv, sum);
    for (int j = 0; j < 4; j++) {
        NAME(put_block)(q[2 * j], q[2 * j + 1], sum[j], D, out + (size_t)32 * bs * j, aout + (size_t)bs * j);
        dout[(size_t)bs * j] = dv[j];
    }
}

INLINE void NAME(quantize_d)(const void *x, int x_bf16, int r0, int r1, int k, int nblk, const int D, int grouped,
                             int8_t *xq, float *d, int32_t *asum) {
    const int full = k / 32, es = x_bf16 ? 2 : 4, bs = grouped ? 8 : 1;
    for (int mm = r0; mm < r1; mm++) {
        const char *xr = (const char *)x + (size_t)mm * k * es;
        const size_t rb = xq_at(grouped, nblk, mm);
        int b = 0;
        for (; b + 4 <= full; b += 4) {
            __m512 v[8];
            for (int j = 0; j < 4; j++) q8_load32_avx512(xr + (size_t)(b + j) * 32 * es, x_bf16, v + 2 * j);
            const size_t at = rb + (size_t)b * bs;
            NAME(quant_block4)(v, D, bs, xq + at * 32, d + at, asum + at);
        }
        for (; b < nblk; b++) {
            const int c0 = b * 32;
            __m512 v[2];
            if (c0 + 32 <= k) {
                q8_load32_avx512(xr + (size_t)c0 * es, x_bf16, v);
            } else {   /* the partial last block: zeros beyond k */
                float tmp[32];
                partial_block(x, x_bf16, k, mm, c0, tmp);
                v[0] = _mm512_loadu_ps(tmp);
                v[1] = _mm512_loadu_ps(tmp + 16);
            }
            const size_t at = rb + (size_t)b * bs;
            NAME(quant_block)(v, D, xq + at * 32, d + at, asum + at);
        }
    }
}

static void NAME(quantize)(const void *x, int x_bf16, int r0, int r1, int k, int nblk, int D, int grouped,
                           int8_t *xq, float *d, int32_t *asum) {
    if (D == 1) NAME(quantize_d)(x, x_bf16, r0, r1, k, nblk, 1, grouped, xq, d, asum);
    else if (D == 2) NAME(quantize_d)(x, x_bf16, r0, r1, k, nblk, 2, grouped, xq, d, asum);
    else NAME(quantize_d)(x, x_bf16, r0, r1, k, nblk, 4, grouped, xq, d, asum);
}
#endif

#if VBMI
/* one chunk of packed indices (48 bytes) -> 64 bytes whose low 6 bits are the indices (vpermb reads only those):
   qword q gathers bytes 6q..6q+5, and byte t of it takes bits 6t.. of that qword. The chunk is read as the 64
   bytes that end where it ends (with a masked 48-byte load, a whole 192 x 576 call took 20% longer from cache and
   25% longer from memory on an AVX-512 AMD EPYC); the 16 bytes before it are always in the record (the scales and
   codebooks come first). */
INLINE __m512i NAME(unpack6)(const uint8_t *p) {
    static const uint8_t spread[64] __attribute__((aligned(64))) = {
        16, 17, 18, 19, 20, 21, 21, 21, 22, 23, 24, 25, 26, 27, 27, 27,
        28, 29, 30, 31, 32, 33, 33, 33, 34, 35, 36, 37, 38, 39, 39, 39,
        40, 41, 42, 43, 44, 45, 45, 45, 46, 47, 48, 49, 50, 51, 51, 51,
        52, 53, 54, 55, 56, 57, 57, 57, 58, 59, 60, 61, 62, 63, 63, 63};
    static const uint8_t shifts[64] __attribute__((aligned(64))) = {
        0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42,
        0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42,
        0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42,
        0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42};
    const __m512i v = _mm512_loadu_si512((const void *)(p - 16));
    return _mm512_multishift_epi64_epi8(_mm512_load_si512((const void *)shifts),
                                        _mm512_permutexvar_epi8(_mm512_load_si512((const void *)spread), v));
}
#endif

/* the codebook byte tables of segment s of tile t, in registers (NT per component) */
INLINE void NAME(load_tables)(const vq8_args *a, int t, int s, const int D, const int NT, __m512i T[4][16]) {
    const uint8_t *tab = seg_tables(a, t, s);
    for (int e = 0; e < D; e++)
        for (int j = 0; j < NT; j++)
            T[e][j] = VBMI ? _mm512_loadu_si512((const void *)(tab + e * a->kp + 64 * j))
                           : _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tab + e * a->kp + 16 * j)));
}

/* the 64 index bytes of chunk c of a block's indices at ib (packed 6 bits each when PACKED: VBMI only) */
INLINE __m512i NAME(chunk_indices)(const uint8_t *ib, int c, const int PACKED) {
#if VBMI
    if (PACKED) return NAME(unpack6)(ib + 48 * c);
#else
    (void)PACKED;
#endif
    return _mm512_loadu_si512((const void *)(ib + 64 * c));
}

INLINE __m512i NAME(lookup)(const __m512i *T, __m512i idx, const int KC) {
#if VBMI
    if (KC == 64) return _mm512_permutexvar_epi8(idx, T[0]);
    if (KC == 128) return _mm512_permutex2var_epi8(T[0], idx, T[1]);
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), _mm512_permutex2var_epi8(T[0], idx, T[1]),
                                  _mm512_permutex2var_epi8(T[2], idx, T[3]));
#else
    if (KC == 16) return _mm512_shuffle_epi8(T[0], idx);
    const __m512i lo = KC == 256 ? _mm512_and_si512(idx, _mm512_set1_epi8(0x0f)) : idx;
    const __mmask64 m4 = _mm512_test_epi8_mask(idx, _mm512_set1_epi8(0x10));
    const __mmask64 m5 = _mm512_test_epi8_mask(idx, _mm512_set1_epi8(0x20));
    __m512i r[16];
    for (int j = 0; j < KC / 16; j++) r[j] = _mm512_shuffle_epi8(T[j], lo);
    for (int j = 0; j < KC / 32; j++) r[j] = _mm512_mask_blend_epi8(m4, r[2 * j], r[2 * j + 1]);
    for (int j = 0; j < KC / 64; j++) r[j] = _mm512_mask_blend_epi8(m5, r[2 * j], r[2 * j + 1]);
    if (KC == 256) {
        const __mmask64 m6 = _mm512_test_epi8_mask(idx, _mm512_set1_epi8(0x40));
        r[0] = _mm512_mask_blend_epi8(m6, r[0], r[1]);
        r[1] = _mm512_mask_blend_epi8(m6, r[2], r[3]);
        r[0] = _mm512_mask_blend_epi8(_mm512_movepi8_mask(idx), r[0], r[1]);
    }
    return r[0];
#endif
}

/* the end of segment s for M rows of tile t: their block sums times the segment's scales, into acc */
INLINE void NAME(end_segment)(const vq8_args *a, int t, int s, const __m512 *gacc, __m512 *acc, const int M) {
    const __m512 sc = _mm512_loadu_ps(tile_scales(a, t, s));
    for (int mm = 0; mm < M; mm++) acc[mm] = _mm512_fmadd_ps(gacc[mm], sc, acc[mm]);
}

/* M rows from m0 of tile t, from their accumulators to y */
INLINE void NAME(store_tile)(const vq8_args *a, int t, int m0, const __m512 *acc, const int M) {
    for (int mm = 0; mm < M; mm++) {
        float v[TILE];
        _mm512_storeu_ps(v, acc[mm]);
        store_rows(a, m0 + mm, t, 0, TILE, v);
    }
}

/* M activation rows from m0 against tile t, looking its codes up per block (few rows); its indices from the record
   (packed when PACKED), or from `unpacked` (the tile's indices in the byte layout, when not NULL) */
INLINE void NAME(tile)(const vq8_args *a, int t, int m0, const int M, const int D, const int KC, const int PACKED,
                       const uint8_t *unpacked) {
    const int CH = 8 / D, SL = 32 / D, NT = VBMI ? KC / 64 : KC / 16;
    const int LINES = PACKED ? (3 * CH + 3) / 4 : CH;   /* cache lines of indices per block (48 or 64 bytes a chunk) */
    const int NA = M == 1 ? 4 : (M == 2 ? 2 : 1);
    __m512 acc[4];
    for (int mm = 0; mm < M; mm++) acc[mm] = _mm512_setzero_ps();
    for (int s = 0; s < a->nseg; s++) {
        __m512i T[4][16];
        NAME(load_tables)(a, t, s, D, NT, T);
        __m512 gacc[4];
        for (int mm = 0; mm < M; mm++) gacc[mm] = _mm512_setzero_ps();
        for (int b = a->seg_start[s]; b < a->seg_start[s + 1]; b++) {
            const uint8_t *ib = unpacked ? unpacked + (size_t)b * (512 / D) : tile_block_idx(a, t, b);
#if !VBMI
            uint8_t buf[512];
#endif
            if (!unpacked) {
                for (int c = 0; c < LINES; c++)
                    _mm_prefetch((const char *)(ib + PREFETCH_AHEAD + 64 * c), _MM_HINT_NTA);
#if !VBMI
                if (a->packed) { unpack_block(ib, D, buf); ib = buf; }
#endif
            }
            __m512i iacc[4][4];
            for (int mm = 0; mm < M; mm++) {
                iacc[mm][0] = _mm512_set1_epi32(a->asum[(size_t)(m0 + mm) * a->nblk + b]);
                for (int j = 1; j < NA; j++) iacc[mm][j] = _mm512_setzero_si512();
            }
            for (int c = 0; c < CH; c++) {
                const __m512i idx = NAME(chunk_indices)(ib, c, PACKED);
                for (int e = 0; e < D; e++) {
                    const __m512i w = NAME(lookup)(T[e], idx, KC);
                    const int j = (c * D + e) % NA;
                    for (int mm = 0; mm < M; mm++) {
                        int32_t q4;
                        memcpy(&q4, a->xq + ((size_t)(m0 + mm) * a->nblk + b) * 32 + e * SL + 4 * c, 4);
                        iacc[mm][j] = _mm512_dpbusd_epi32(iacc[mm][j], w, _mm512_set1_epi32(q4));
                    }
                }
            }
            for (int mm = 0; mm < M; mm++) {
                __m512i isum = iacc[mm][0];
                for (int j = 1; j < NA; j++) isum = _mm512_add_epi32(isum, iacc[mm][j]);
                const __m512 dv = _mm512_set1_ps(a->d[(size_t)(m0 + mm) * a->nblk + b]);
                gacc[mm] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), dv, gacc[mm]);
            }
        }
        NAME(end_segment)(a, t, s, gacc, acc, M);
    }
    NAME(store_tile)(a, t, m0, acc, M);
}

/* tile t's codes (c + 128) in the layout the row loop multiplies: per block of 32 columns 8 vectors of 64 bytes,
   vector q = e * (8 / D) + c holding component e of index chunk c (16 rows x 4 vectors); the 4 activation bytes
   that vector q multiplies are bytes 4q..4q+3 of the block's de-interleaved activations */
INLINE void NAME(decode_tile)(const vq8_args *a, int t, const int D, const int KC, const int PACKED, uint8_t *out) {
    const int CH = 8 / D, NT = VBMI ? KC / 64 : KC / 16;
    for (int s = 0; s < a->nseg; s++) {
        __m512i T[4][16];
        NAME(load_tables)(a, t, s, D, NT, T);
        for (int b = a->seg_start[s]; b < a->seg_start[s + 1]; b++) {
            const uint8_t *ib = tile_block_idx(a, t, b);
#if !VBMI
            uint8_t buf[512];
            if (a->packed) { unpack_block(ib, D, buf); ib = buf; }
#endif
            uint8_t *ob = out + (size_t)b * 512;
            for (int c = 0; c < CH; c++) {
                const __m512i idx = NAME(chunk_indices)(ib, c, PACKED);
                for (int e = 0; e < D; e++)
                    _mm512_store_si512((void *)(ob + 64 * (e * CH + c)), NAME(lookup)(T[e], idx, KC));
            }
        }
    }
}

/* M activation rows from m0 against tile t, decoded at w: a load and a dpbusd per (vector, row), the same integer
   sums and the same float operations per row as tile() (the last tile of an odd count, and rows past a multiple of
   4: rows2 below takes the rest) */
INLINE void NAME(rows)(const vq8_args *a, int t, const uint8_t *w, int m0, const int M) {
    const size_t xr = xq_at(1, a->nblk, m0);
    __m512 acc[8];
    for (int mm = 0; mm < M; mm++) acc[mm] = _mm512_setzero_ps();
    for (int s = 0; s < a->nseg; s++) {
        __m512 gacc[8];
        for (int mm = 0; mm < M; mm++) gacc[mm] = _mm512_setzero_ps();
        for (int b = a->seg_start[s]; b < a->seg_start[s + 1]; b++) {
            const size_t at = xr + (size_t)b * 8;   /* row m0 + mm at at + mm (rows grouped by 8) */
            const int8_t *xb = a->xq + at * 32;
            const uint8_t *wb = w + (size_t)b * 512;
            __m512i iacc[8];
            for (int mm = 0; mm < M; mm++) iacc[mm] = _mm512_set1_epi32(a->asum[at + mm]);
            for (int q = 0; q < 8; q++) {
                const __m512i wv = _mm512_load_si512((const void *)(wb + 64 * q));
                for (int mm = 0; mm < M; mm++) {
                    int32_t q4;
                    memcpy(&q4, xb + 32 * mm + 4 * q, 4);
                    iacc[mm] = _mm512_dpbusd_epi32(iacc[mm], wv, _mm512_set1_epi32(q4));
                }
            }
            for (int mm = 0; mm < M; mm++) {
                const __m512 dv = _mm512_set1_ps(a->d[at + mm]);
                gacc[mm] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[mm]), dv, gacc[mm]);
            }
        }
        NAME(end_segment)(a, t, s, gacc, acc, M);
    }
    NAME(store_tile)(a, t, m0, acc, M);
}

/* 4 rows from m0 (a multiple of 4) against tiles t and t + 1, decoded at w and w + wstride: each broadcast of 4
   activation bytes feeds two dpbusd; the integer, block and segment sums of the 8 (tile, row) pairs take 24
   registers. Per row the same operations as rows(). */
INLINE void NAME(rows2)(const vq8_args *a, int t, const uint8_t *w, size_t wstride, int m0) {
    const size_t xr = xq_at(1, a->nblk, m0);
    __m512 acc[2][4];
    for (int i = 0; i < 2; i++)
        for (int mm = 0; mm < 4; mm++) acc[i][mm] = _mm512_setzero_ps();
    for (int s = 0; s < a->nseg; s++) {
        __m512 gacc[2][4];
        for (int i = 0; i < 2; i++)
            for (int mm = 0; mm < 4; mm++) gacc[i][mm] = _mm512_setzero_ps();
        for (int b = a->seg_start[s]; b < a->seg_start[s + 1]; b++) {
            const size_t at = xr + (size_t)b * 8;
            const int8_t *xb = a->xq + at * 32;
            const uint8_t *wb = w + (size_t)b * 512;
            __m512i iacc[2][4];
            for (int mm = 0; mm < 4; mm++) iacc[0][mm] = iacc[1][mm] = _mm512_set1_epi32(a->asum[at + mm]);
            for (int q = 0; q < 8; q++) {
                const __m512i w0 = _mm512_load_si512((const void *)(wb + 64 * q));
                const __m512i w1 = _mm512_load_si512((const void *)(wb + wstride + 64 * q));
                for (int mm = 0; mm < 4; mm++) {
                    int32_t q4;
                    memcpy(&q4, xb + 32 * mm + 4 * q, 4);
                    const __m512i xv = _mm512_set1_epi32(q4);
                    iacc[0][mm] = _mm512_dpbusd_epi32(iacc[0][mm], w0, xv);
                    iacc[1][mm] = _mm512_dpbusd_epi32(iacc[1][mm], w1, xv);
                }
            }
            for (int mm = 0; mm < 4; mm++) {
                const __m512 dv = _mm512_set1_ps(a->d[at + mm]);
                for (int i = 0; i < 2; i++) gacc[i][mm] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[i][mm]), dv, gacc[i][mm]);
            }
        }
        for (int i = 0; i < 2; i++) NAME(end_segment)(a, t + i, s, gacc[i], acc[i], 4);
    }
    for (int i = 0; i < 2; i++) NAME(store_tile)(a, t + i, m0, acc[i], 4);
}

/* every activation row against tile t, decoded at w */
static void NAME(rows_all)(const vq8_args *a, int t, const uint8_t *w) {
    int m0 = 0;
    for (; m0 + 8 <= a->m; m0 += 8) NAME(rows)(a, t, w, m0, 8);
    if (a->m - m0 >= 4) { NAME(rows)(a, t, w, m0, 4); m0 += 4; }
    if (a->m - m0 >= 2) { NAME(rows)(a, t, w, m0, 2); m0 += 2; }
    if (m0 < a->m) NAME(rows)(a, t, w, m0, 1);
}

/* many rows (prefill): each tile's codes are looked up once, into buf (two tiles), for all rows */
INLINE void NAME(tiles_many_dk)(const vq8_args *a, int t0, int t1, const int D, const int KC, const int PACKED,
                                uint8_t *buf) {
    int t = t0;
    const size_t tb = (size_t)a->nblk * 512;
    for (; t + 2 <= t1; t += 2) {
        NAME(decode_tile)(a, t, D, KC, PACKED, buf);
        NAME(decode_tile)(a, t + 1, D, KC, PACKED, buf + tb);
        int m0 = 0;
        for (; m0 + 4 <= a->m; m0 += 4) NAME(rows2)(a, t, buf, tb, m0);
        for (int i = 0; i < 2; i++) {
            const uint8_t *w = buf + i * tb;
            int r = m0;
            if (a->m - r >= 2) { NAME(rows)(a, t + i, w, r, 2); r += 2; }
            if (r < a->m) NAME(rows)(a, t + i, w, r, 1);
        }
    }
    for (; t < t1; t++) {
        NAME(decode_tile)(a, t, D, KC, PACKED, buf);
        NAME(rows_all)(a, t, buf);
    }
}

INLINE void NAME(tiles_many_d)(const vq8_args *a, int t0, int t1, const int D, uint8_t *buf) {
#if VBMI
    if (a->packed) NAME(tiles_many_dk)(a, t0, t1, D, 64, 1, buf);
    else if (a->k <= 64) NAME(tiles_many_dk)(a, t0, t1, D, 64, 0, buf);
    else if (a->k <= 128) NAME(tiles_many_dk)(a, t0, t1, D, 128, 0, buf);
    else NAME(tiles_many_dk)(a, t0, t1, D, 256, 0, buf);
#else
    if (a->k <= 16) NAME(tiles_many_dk)(a, t0, t1, D, 16, 0, buf);
    else if (a->k <= 64) NAME(tiles_many_dk)(a, t0, t1, D, 64, 0, buf);
    else NAME(tiles_many_dk)(a, t0, t1, D, 256, 0, buf);
#endif
}

static void NAME(tiles_many)(const vq8_args *a, int t0, int t1, uint8_t *buf) {
    if (a->D == 1) NAME(tiles_many_d)(a, t0, t1, 1, buf);
    else if (a->D == 2) NAME(tiles_many_d)(a, t0, t1, 2, buf);
    else NAME(tiles_many_d)(a, t0, t1, 4, buf);
}

/* tile t's packed indices -> the byte layout in buf (nblk * 512 / D bytes) */
INLINE void NAME(unpack_tile)(const vq8_args *a, int t, const int D, uint8_t *buf) {
    for (int b = 0; b < a->nblk; b++) {
        const uint8_t *src = tile_block_idx(a, t, b);
        uint8_t *dst = buf + (size_t)b * (512 / D);
#if VBMI
        for (int c = 0; c < 8 / D; c++) _mm512_storeu_si512((void *)(dst + 64 * c), NAME(unpack6)(src + 48 * c));
#else
        unpack_block(src, D, dst);
#endif
    }
}

INLINE void NAME(tiles_dk)(const vq8_args *a, int t0, int t1, const int D, const int KC, const int PACKED) {
    /* several row groups on packed indices: a tile is unpacked once for all of them */
    uint8_t *buf = a->packed && a->m > 4 ? scratch_get(&tls_tiles, (size_t)a->nblk * (512 / D)) : NULL;
    for (int t = t0; t < t1; t++) {
        prefetch_record_head(a, t);
        int m0 = 0;
        if (buf) {
            NAME(unpack_tile)(a, t, D, buf);
            for (; m0 + 4 <= a->m; m0 += 4) NAME(tile)(a, t, m0, 4, D, KC, 0, buf);
            if (a->m - m0 >= 2) { NAME(tile)(a, t, m0, 2, D, KC, 0, buf); m0 += 2; }
            if (m0 < a->m) NAME(tile)(a, t, m0, 1, D, KC, 0, buf);
            continue;
        }
        for (; m0 + 4 <= a->m; m0 += 4) NAME(tile)(a, t, m0, 4, D, KC, PACKED, NULL);
        if (a->m - m0 >= 2) { NAME(tile)(a, t, m0, 2, D, KC, PACKED, NULL); m0 += 2; }
        if (m0 < a->m) NAME(tile)(a, t, m0, 1, D, KC, PACKED, NULL);
    }
}

/* the packed layout as a constant where VBMI unpacks it in registers; the other path unpacks into a buffer */
INLINE void NAME(tiles_d)(const vq8_args *a, int t0, int t1, const int D) {
#if VBMI
    if (a->packed) NAME(tiles_dk)(a, t0, t1, D, 64, 1);   /* packed layers have <= 64 entries */
    else if (a->k <= 64) NAME(tiles_dk)(a, t0, t1, D, 64, 0);
    else if (a->k <= 128) NAME(tiles_dk)(a, t0, t1, D, 128, 0);
    else NAME(tiles_dk)(a, t0, t1, D, 256, 0);
#else
    if (a->k <= 16) NAME(tiles_dk)(a, t0, t1, D, 16, 0);
    else if (a->k <= 64) NAME(tiles_dk)(a, t0, t1, D, 64, 0);
    else NAME(tiles_dk)(a, t0, t1, D, 256, 0);
#endif
}

#include "vq_int8_entry.h"
