/* VQ (GPTVQ) GEMM with int8 activations (hf_vq/nn/kernel_native_vq.py owns the build and the weight layout).

   The weight is w[r, v*D + e] = s[r, seg] * c[r, v, e], where c is the integer code of component e of the codebook
   entry idx[r, v] (codebook of the row block of r and the column block of v; 4- or 8-bit codebooks, so
   c in [-128, 127]) and s = codebook scale * normalization scale, constant over a segment: a run of 32-column blocks
   with one codebook and one normalization block. The activations are quantized to int8 in blocks of 32 columns with
   one fp32 scale d each (llama.cpp's Q8_0): x[m, j] ~ d[m, b] * a[m, j]. Then
       y[m, r] = bias[r] + sum_seg s[r, seg] * sum_{b in seg} d[m, b] * (<c + 128, a[m, b]>  -  128 * A[m, b]),
       A[m, b] = sum_j a[m, 32b + j],
   where <u, a> is an unsigned x signed int8 dot product (AVX512-VNNI / AVX-VNNI dpbusd, AVX2 maddubs) summed in
   int32 over a block (exact; the offset 128 is removed in integers by starting the block's sum at -128 A).

   Layout: one vector lane per output row, 16 rows per tile (as csrc/affine_gemm.c). A tile never straddles two row
   blocks (row blocks are padded to whole tiles with zero rows), so its 16 rows share one codebook per column
   block. Each tile is one record, so that a call reads one stream (a cold call of a small layer spent a good share
   of its time on the misses of separate scale and codebook arrays): its scales [nseg, 16] fp32, the codebooks of
   its row block [ncb, D, kp] (component e of every entry, as c + 128; kp = 64 or 256), then per block of 32
   columns (32 / D vectors) 8 / D chunks of 64 index bytes (one byte per vector): byte 4i + u of chunk c is the
   index of row i, vector 32b / D + 4c + u; the record is padded to a multiple of 64 bytes. A lookup turns an index chunk into the 64 code bytes of component e:
   AVX512-VBMI vpermb (64 entries; vpermi2b 128, two of them and a blend 256), else pshufb on 16-entry subtables and
   blends on the index bits. The activations of a block are de-interleaved by component (stream e holds columns
   32b + D t + e), so the 4 bytes of one stream that lane i needs for chunk c are the same for all rows: one
   broadcast, and one dpbusd per (chunk, component) computes 16 rows x 4 vectors, with row sums in their own lanes
   (no horizontal reductions).

   Packed indices (packed = 1, layers of <= 64 codebook entries): each chunk of 64 index bytes is stored in 48
   bytes, 6 bits per index: bytes 6q..6q+5 hold indices 8q..8q+7 of the chunk at bits 6t (little-endian), so a
   6-bit-index layer reads 3 bits per weight of indices instead of 4 (2D vectors). AVX512-VBMI unpacks a chunk with
   one vpermb and one vpmultishiftqb (the table lookup reads the low 6 bits only); the other paths unpack a block
   into a buffer first (kernel_native_vq.py packs only where the best path is VBMI).

   Many activation rows (prefill, from DECODE_ROWS on): a tile's codes are looked up once per call, into a per-thread
   scratch buffer that persists across calls, ordered so that vector q of a block multiplies activation bytes
   4q..4q+3; each row then costs a dpbusd per vector. AVX-512 runs two tiles x 4 rows per pass (each broadcast of
   activation bytes feeds two dpbusd; 8 independent chains), on activations grouped by 8 rows (xq_at).
   The integer sums are exact and every row gets the same float operations in the same order as with the per-row
   lookups of fewer rows, so the results do not depend on the row count.

   Each instruction-set path is compiled with its own target attribute and chosen at run time from what the CPU
   reports (isa 0), or forced (isa > 0) to test a fallback. */
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#if defined(__x86_64__) || defined(__i386__)
#define VQ8_X86 1
#include <immintrin.h>
#else
#define VQ8_X86 0
#endif

#define TILE 16
#define INLINE static inline __attribute__((always_inline))
/* the indices are read as one stream; prefetching it this far ahead as non-temporal keeps a decode token's weights
   from evicting what the rest of the token works on */
#define PREFETCH_AHEAD 8192
/* from this many activation rows on, a call decodes each tile's codes once for all rows (see decode_tile) */
#define DECODE_ROWS 8

enum { ISA_AUTO = 0, ISA_SCALAR = 1, ISA_AVX2 = 2, ISA_AVXVNNI = 3, ISA_AVX512VNNI = 4, ISA_AVX512VBMI = 5 };

typedef struct {
    const uint8_t *data;       /* [ntiles, rec_bytes]: the tile records */
    size_t rec_bytes; int tab_off, idx_off;   /* record size; offsets of its codebooks and indices */
    int D; int k; int kp; int nblk; int ncb;
    int packed; int blk_bytes;  /* packed indices (see above); bytes of indices per tile and block */
    const int32_t *seg_start;  /* [nseg + 1], in blocks of 32 columns */
    const int32_t *seg_cb;     /* [nseg], column block of the codebook */
    int nseg;
    const int32_t *tile_r0, *tile_cnt;   /* [ntiles]: first row, rows (<= 16) */
    const int8_t *xq;          /* [m, nblk, D, 32 / D] */
    const float *d;            /* [m, nblk] */
    const int32_t *asum;       /* [m, nblk], times -128 */
    int grouped;               /* the layout of xq, d and asum (xq_at): grouped by 8 rows for the many-row path */
    int *oom;                  /* set when a thread found no memory for its scratch */
    int n; int m;
    const float *bias;
    void *y; int y_bf16;
} vq8_args;

#include "bf16.h"
#include "q8_block.h"

/* lanes [first, first + count) of tile t (count <= rows left in the tile), activation row mm */
static inline void store_rows(const vq8_args *a, int mm, int t, int first, int count, const float *v) {
    const int left = a->tile_cnt[t] - first;
    const int cnt = left < count ? left : count;
    const int r0 = a->tile_r0[t] + first;
    const size_t at = (size_t)mm * a->n + r0;
    for (int i = 0; i < cnt; i++) {
        const float yv = v[i] + (a->bias ? a->bias[r0 + i] : 0.f);
        if (a->y_bf16) ((uint16_t *)a->y)[at + i] = f32_to_bf16(yv);
        else ((float *)a->y)[at + i] = yv;
    }
}

INLINE const uint8_t *tile_block_idx(const vq8_args *a, int t, int b) {
    return a->data + (size_t)t * a->rec_bytes + a->idx_off + (size_t)b * a->blk_bytes;
}

INLINE const float *tile_scales(const vq8_args *a, int t, int s) {
    return (const float *)(a->data + (size_t)t * a->rec_bytes) + (size_t)s * TILE;
}

/* Where the running prefetch (PREFETCH_AHEAD past each block's indices) skips: the scales and codebooks at the head
   of the record PREFETCH_AHEAD past this tile's start. Called at the start of each tile. */
INLINE void prefetch_record_head(const vq8_args *a, int t) {
#if VQ8_X86
    const char *p = (const char *)(a->data + (size_t)t * a->rec_bytes) + PREFETCH_AHEAD;
    for (int o = 0; o < a->idx_off; o += 64) _mm_prefetch(p + o, _MM_HINT_NTA);
#else
    (void)a; (void)t;
#endif
}

/* the packed indices of one tile and block (8 / D chunks of 48 bytes) -> the byte layout (8 / D chunks of 64) */
static inline void unpack_block(const uint8_t *src, int D, uint8_t *dst) {
    for (int q = 0; q < 64 / D; q++) {
        uint64_t v = 0;
        for (int i = 0; i < 6; i++) v |= (uint64_t)src[6 * q + i] << (8 * i);
        for (int t = 0; t < 8; t++) dst[8 * q + t] = (uint8_t)((v >> (6 * t)) & 63);
    }
}

/* the indices of tile t, block b in the byte layout: in place, or unpacked into buf (512 bytes) */
static inline const uint8_t *block_indices(const vq8_args *a, int t, int b, uint8_t *buf) {
    const uint8_t *ib = tile_block_idx(a, t, b);
    if (!a->packed) return ib;
    unpack_block(ib, a->D, buf);
    return buf;
}

INLINE const uint8_t *seg_tables(const vq8_args *a, int t, int s) {
    return a->data + (size_t)t * a->rec_bytes + a->tab_off + (size_t)a->seg_cb[s] * (a->D * a->kp);
}

/* per-thread scratch that persists across calls (the tiles' decoded codes; a call's quantized activations) */
#include "scratch.h"
static _Thread_local scratch_buf tls_tiles, tls_acts;

/* The quantized activations: one 32-byte block, one scale and one sum per (row, block of 32 columns), at the same
   index in xq (times 32), d and asum. Row-major (block b of row r at r * nblk + b) for few rows; for many rows
   (`grouped`) rows are grouped by 8, block-major within a group: block b of row r at (r / 8 * nblk + b) * 8 + r % 8,
   so that the 8 rows one pass multiplies sit side by side (constant offsets from one pointer). */
INLINE size_t xq_at(int grouped, int nblk, int r) {
    return grouped ? ((size_t)(r >> 3) * nblk << 3) + (r & 7) : (size_t)r * nblk;
}

/* ------------------------------------------------------------------------------------------ scalar path */
static void tiles_scalar(const vq8_args *a, int t0, int t1) {
    const int D = a->D, CH = 8 / D, SL = 32 / D;
    for (int t = t0; t < t1; t++) {
        for (int mm = 0; mm < a->m; mm++) {
            float acc[TILE] = {0.f};
            for (int s = 0; s < a->nseg; s++) {
                const uint8_t *tab = seg_tables(a, t, s);
                float gacc[TILE] = {0.f};
                for (int b = a->seg_start[s]; b < a->seg_start[s + 1]; b++) {
                    uint8_t buf[512];
                    const uint8_t *ib = block_indices(a, t, b, buf);
                    const int8_t *xb = a->xq + ((size_t)mm * a->nblk + b) * 32;
                    const int32_t base = a->asum[(size_t)mm * a->nblk + b];
                    const float d = a->d[(size_t)mm * a->nblk + b];
                    for (int i = 0; i < TILE; i++) {
                        int32_t dot = base;
                        for (int c = 0; c < CH; c++)
                            for (int u = 0; u < 4; u++) {
                                const int id = ib[64 * c + 4 * i + u];
                                for (int e = 0; e < D; e++) dot += tab[e * a->kp + id] * xb[e * SL + 4 * c + u];
                            }
                        gacc[i] += (float)dot * d;
                    }
                }
                const float *sc = tile_scales(a, t, s);
                for (int i = 0; i < TILE; i++) acc[i] += sc[i] * gacc[i];
            }
            store_rows(a, mm, t, 0, TILE, acc);
        }
    }
}

#if VQ8_X86
/* 32 int8 codes in column order -> de-interleaved by component (stream e: columns D t + e) */
__attribute__((target("avx2"), always_inline))
static inline __m256i vq8_deinterleave(__m256i q, const int D) {
    if (D == 2) {
        q = _mm256_shuffle_epi8(q, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                    0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
        return _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
    }
    if (D == 4) {
        q = _mm256_shuffle_epi8(q, _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                                    0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
        return _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    }
    return q;
}

/* the partial last block of activation row mm from column c0: its columns below k, zeros beyond */
static void partial_block(const void *x, int x_bf16, int k, int mm, int c0, float *tmp) {
    for (int j = 0; j < 32; j++)
        tmp[j] = c0 + j >= k ? 0.f : x_bf16 ? bf16_to_f32(((const uint16_t *)x)[(size_t)mm * k + c0 + j])
                                            : ((const float *)x)[(size_t)mm * k + c0 + j];
}

/* ------------------------------------------------------------------------------------------ 256-bit paths */
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NAME(x) x##_avx2
#define VNNI 0
#include "vq_int8_256.h"
#undef NAME
#undef VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")
#define NAME(x) x##_avxvnni
#define VNNI 1
#include "vq_int8_256.h"
#undef NAME
#undef VNNI
#pragma GCC pop_options

/* ------------------------------------------------------------------------------------------ 512-bit paths */
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define NAME(x) x##_avx512vnni
#define VBMI 0
#include "vq_int8_512.h"
#undef NAME
#undef VBMI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi")
#define NAME(x) x##_avx512vbmi
#define VBMI 1
#include "vq_int8_512.h"
#undef NAME
#undef VBMI
#pragma GCC pop_options

static int cpu_has(int isa) {
    __builtin_cpu_init();
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const int avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                       __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                       __builtin_cpu_supports("avx512vnni");
    switch (isa) {
        case ISA_SCALAR: return 1;
        case ISA_AVX2: return avx2;
        case ISA_AVXVNNI: return avx2 && __builtin_cpu_supports("avxvnni");
        case ISA_AVX512VNNI: return avx2 && avx512;
        case ISA_AVX512VBMI: return avx2 && avx512 && __builtin_cpu_supports("avx512vbmi");
        default: return 0;
    }
}
#else
static int cpu_has(int isa) { return isa == ISA_SCALAR; }
#endif

int vq8_isa_supported(int isa) { return cpu_has(isa); }

int vq8_best_isa(void) {
    for (int isa = ISA_AVX512VBMI; isa > ISA_SCALAR; isa--)
        if (cpu_has(isa)) return isa;
    return ISA_SCALAR;
}

int vq8_tile_rows(void) { return TILE; }

/* Activations -> int8 blocks of 32 columns (scale d = max|x| / 127, so |a| <= 127), de-interleaved by component
   within each block, and -128 * (sum of the block's int8 values). Columns from k on are zeros. Rows r0..r1-1 of x;
   block b of row r at index xq_at(grouped, nblk, r) + b * (grouped ? 8 : 1) (see xq_at). */
static void quantize_acts(const void *x, int x_bf16, int r0, int r1, int k, int nblk, int D, int grouped, int8_t *xq,
                          float *d, int32_t *asum) {
    const int SL = 32 / D;
    for (int mm = r0; mm < r1; mm++) {
        const size_t rb = xq_at(grouped, nblk, mm), bs = grouped ? 8 : 1;
        const float *xf = (const float *)x + (size_t)mm * k;
        const uint16_t *xh = (const uint16_t *)x + (size_t)mm * k;
        for (int b = 0; b < nblk; b++) {
            float v[32], amax = 0.f;
            const int c0 = b * 32, cnt = k - c0 < 32 ? k - c0 : 32;
            if (x_bf16)
                for (int j = 0; j < cnt; j++) v[j] = bf16_to_f32(xh[c0 + j]);
            else
                memcpy(v, xf + c0, sizeof(float) * (size_t)cnt);
            for (int j = cnt; j < 32; j++) v[j] = 0.f;
            for (int j = 0; j < 32; j++) amax = fabsf(v[j]) > amax ? fabsf(v[j]) : amax;
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            int8_t q[32];
            int32_t s = 0;
            for (int j = 0; j < 32; j++) {
                const float r = v[j] * id;   /* round half away from zero, without a libm call */
                const int qi = (int)(r + (r >= 0.f ? 0.5f : -0.5f));
                q[j] = (int8_t)(qi > 127 ? 127 : (qi < -127 ? -127 : qi));
                s += q[j];
            }
            const size_t at = rb + b * bs;
            int8_t *out = xq + at * 32;
            if (D == 1) memcpy(out, q, 32);
            else
                for (int e = 0; e < D; e++)
                    for (int t = 0; t < SL; t++) out[e * SL + t] = q[D * t + e];
            asum[at] = -128 * s;
            d[at] = amax / 127.f;
        }
    }
}

typedef void (*tiles_fn)(const vq8_args *, int, int);
typedef void (*quant_fn)(const void *, int, int, int, int, int, int, int, int8_t *, float *, int32_t *);

/* A prepared layer (kernel_native_vq.py keeps one per layer, so that a call passes one pointer, not 16 values). */
typedef struct {
    const uint8_t *data;
    const int32_t *seg_start, *seg_cb, *tile_r0, *tile_cnt;
    int32_t n, k, D, kbook, kp, nblk, ncb, nseg, ntiles, packed;
} vq8_layer;

/* the record of a tile: scales, codebooks, indices, padded to 64 bytes (as kernel_native_vq.py builds it) */
static inline size_t record_bytes(const vq8_layer *L, int *tab_off, int *idx_off) {
    *tab_off = L->nseg * TILE * 4;
    *idx_off = *tab_off + L->ncb * L->D * L->kp;
    const size_t bytes = (size_t)*idx_off + (size_t)L->nblk * ((L->packed ? 384 : 512) / L->D);
    return (bytes + 63) / 64 * 64;
}

/* The kernels prefetch the records PREFETCH_AHEAD bytes ahead of where they read. The first that many bytes of a
   call (or of a task) are requested here, before the activations are quantized, so that their memory latency
   overlaps that work instead of stalling the first tiles (a cold decode call of a small layer is mostly that
   latency). */
static void prefetch_head(const vq8_layer *L, int t0, int t1, int isa) {
#if VQ8_X86
    if (isa == ISA_SCALAR) return;
    int tab_off, idx_off;
    const size_t rec = record_bytes(L, &tab_off, &idx_off), bytes = (size_t)(t1 - t0) * rec;
    const char *p = (const char *)(L->data + (size_t)t0 * rec);
    for (size_t o = 0; o < bytes && o < PREFETCH_AHEAD; o += 64) _mm_prefetch(p + o, _MM_HINT_NTA);
#else
    (void)L; (void)t0; (void)t1; (void)isa;
#endif
}

/* y [m, n] = x [m, k] @ W^T + bias, x and y fp32 (or both bf16 when bf16). Returns the instruction set used
   (1 scalar, 2 AVX2, 3 AVX-VNNI, 4 AVX512-VNNI, 5 AVX512-VBMI), or -1 for arguments it cannot take. */
int vq8_gemm_layer(const vq8_layer *L, const void *x, int bf16, int m, void *y, const float *bias, int nthreads,
                   int isa) {
    const int n = L->n, k = L->k, D = L->D, nblk = L->nblk, ntiles = L->ntiles, nseg = L->nseg;
    if (m < 1 || n < 1 || k < 1 || nblk * 32 < k || nseg < 1 || ntiles < 1) return -1;
    if (!(D == 1 || D == 2 || D == 4) || L->kbook < 1 || L->kbook > 256 || L->kp < L->kbook || L->kp % 64 != 0)
        return -1;
    if (L->kbook > 64 && L->kp < 256) return -1;   /* the 16-entry-subtable lookups read 256 bytes */
    if (L->packed && L->kbook > 64) return -1;      /* 6 bits per packed index */
    if (L->seg_start[0] != 0 || L->seg_start[nseg] != nblk) return -1;
    if (isa == ISA_AUTO) isa = vq8_best_isa();
    if (!cpu_has(isa)) return -1;
    const int grouped = m >= DECODE_ROWS && isa != ISA_SCALAR;   /* the many-row path */
    int oom = 0;
    if (nthreads < 1) nthreads = 1;
    prefetch_head(L, 0, ntiles, isa);
    /* small calls (decode) keep the quantized activations on the stack */
    enum { STACK_BLOCKS = 256 };
    int8_t xq_s[STACK_BLOCKS * 32] __attribute__((aligned(64)));
    float d_s[STACK_BLOCKS];
    int32_t asum_s[STACK_BLOCKS];
    const size_t nb = (size_t)(grouped ? (m + 7) / 8 * 8 : m) * nblk;
    const int heap = nb > STACK_BLOCKS;
    /* larger ones in this thread's scratch: int8 values, then the scales, then the sums */
    uint8_t *acts = heap ? scratch_get(&tls_acts, nb * (32 + sizeof(float) + sizeof(int32_t))) : NULL;
    if (heap && !acts) return -1;
    int8_t *xq = heap ? (int8_t *)acts : xq_s;
    float *d = heap ? (float *)(acts + nb * 32) : d_s;
    int32_t *asum = heap ? (int32_t *)(acts + nb * (32 + sizeof(float))) : asum_s;
    quant_fn qf = quantize_acts;
#if VQ8_X86
    if (isa >= ISA_AVX512VNNI) qf = quantize_avx512vnni;
    else if (isa >= ISA_AVX2) qf = quantize_avx2;   /* every path above scalar has AVX2 and FMA */
#endif
    int tab_off, idx_off;
    const size_t rec = record_bytes(L, &tab_off, &idx_off);
    vq8_args a = {L->data, rec, tab_off, idx_off, D, L->kbook, L->kp, nblk, L->ncb, L->packed != 0,
                  (L->packed ? 384 : 512) / D, L->seg_start, L->seg_cb, nseg, L->tile_r0, L->tile_cnt, xq, d, asum,
                  grouped, &oom, n, m, bias, y, bf16};
    tiles_fn fn = tiles_scalar;
#if VQ8_X86
    if (isa == ISA_AVX2) fn = tiles_avx2;
    else if (isa == ISA_AVXVNNI) fn = tiles_avxvnni;
    else if (isa == ISA_AVX512VNNI) fn = tiles_avx512vnni;
    else if (isa == ISA_AVX512VBMI) fn = tiles_avx512vbmi;
#endif
    /* a small call costs less than waking the OpenMP pool (a second runtime beside torch's): one thread */
    if (nthreads == 1 || ntiles == 1 || (double)n * k * m < 262144.0) {   /* as affine_gemm.c */
        qf(x, bf16, 0, m, k, nblk, D, grouped, xq, d, asum);
        fn(&a, 0, ntiles);
    } else {
        /* a few tiles per task: even shares without a scheduling cost per tile */
        int per = ntiles / (4 * nthreads) > 1 ? ntiles / (4 * nthreads) : 1;
        if (grouped && per % 2) per++;   /* the many-row path takes tiles in pairs */
        if (m == 1) per = (ntiles + nthreads - 1) / nthreads;   /* as affine_gemm.c: one run of tiles per thread */
        const int ntasks = (ntiles + per - 1) / per;
        /* many rows (prefill): the threads quantize a share of the rows each first (fewer are not worth the
           barrier between the two loops) */
        const int qpar = m >= 64;
        if (!qpar) qf(x, bf16, 0, m, k, nblk, D, grouped, xq, d, asum);
        #pragma omp parallel num_threads(nthreads)
        {
            if (qpar) {
                #pragma omp for schedule(static)
                for (int r = 0; r < m; r++) qf(x, bf16, r, r + 1, k, nblk, D, grouped, xq, d, asum);
            }
            #pragma omp for schedule(dynamic, 1)
            for (int t = 0; t < ntasks; t++) {
                const int t0 = t * per, t1 = (t + 1) * per < ntiles ? (t + 1) * per : ntiles;
                if (t) prefetch_head(L, t0, t1, isa);   /* a task's first bytes, as the call's */
                fn(&a, t0, t1);
            }
        }
    }
    if (heap) scratch_trim(&tls_acts);
    return oom ? -1 : isa;
}

/* the same with every field of the layer as an argument (the torch.compile custom op, which holds tensors) */
int vq8_gemm(const void *x, int bf16, int m, void *y, const float *bias, int nthreads, int isa, int n, int k,
             int D, int kbook, int kp, int nblk, int ncb, int nseg, int ntiles, int packed, const uint8_t *data,
             const int32_t *seg_start, const int32_t *seg_cb, const int32_t *tile_r0, const int32_t *tile_cnt) {
    const vq8_layer L = {data, seg_start, seg_cb, tile_r0, tile_cnt, n, k, D, kbook, kp, nblk, ncb, nseg, ntiles,
                         packed};
    return vq8_gemm_layer(&L, x, bf16, m, y, bias, nthreads, isa);
}

/* The projection ABI of hf_vq's native layer kernels (csrc/decode_layer.c calls a layer through it): one row. */
int vq8_projection(const void *ctx, const void *x, int bf16, void *y, const float *bias, int nthreads, int isa) {
    return vq8_gemm_layer((const vq8_layer *)ctx, x, bf16, 1, y, bias, nthreads, isa);
}

