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
#if !defined(VQ8_BODY_256) && !defined(VQ8_BODY_512)
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
/* ------------------------------------------------------------------------------------------ 256-bit paths */
#define VQ8_BODY_256
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define NAME(x) x##_avx2
#define VNNI 0
#include __FILE__
#undef NAME
#undef VNNI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avxvnni")
#define NAME(x) x##_avxvnni
#define VNNI 1
#include __FILE__
#undef NAME
#undef VNNI
#pragma GCC pop_options
#undef VQ8_BODY_256

/* ------------------------------------------------------------------------------------------ 512-bit paths */
#define VQ8_BODY_512
#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")
#define NAME(x) x##_avx512vnni
#define VBMI 0
#include __FILE__
#undef NAME
#undef VBMI
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi")
#define NAME(x) x##_avx512vbmi
#define VBMI 1
#include __FILE__
#undef NAME
#undef VBMI
#pragma GCC pop_options
#undef VQ8_BODY_512

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

#elif defined(VQ8_BODY_256)
/* ========================================================================================== 256-bit body
   (included twice: AVX2 with maddubs, AVX-VNNI with dpbusd). A ymm holds 8 rows: half h of a 16-row tile.
   Lookups: KC = 16 (one pshufb), 64 (4 pshufb, 3 blends) or 256 (16 pshufb, 15 blends) table entries. */

/* 32 int8 codes in column order -> de-interleaved by component (stream e: columns D t + e) */
INLINE __m256i NAME(deinterleave)(__m256i q, const int D) {
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
    _mm256_storeu_si256((__m256i *)out, NAME(deinterleave)(p, D));
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
                for (int j = 0; j < 32; j++)
                    tmp[j] = c0 + j >= k ? 0.f : x_bf16 ? bf16_to_f32(((const uint16_t *)x)[(size_t)mm * k + c0 + j])
                                                        : ((const float *)x)[(size_t)mm * k + c0 + j];
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

/* one tile half, M activation rows from m0 */
INLINE void NAME(tile)(const vq8_args *a, int t, int h, int m0, const int M, const int D, const int KC) {
    const int CH = 8 / D, SL = 32 / D, NS = KC / 16;
    const int NA = M == 1 ? 4 : 2;   /* independent integer accumulator chains per activation row */
    __m256 acc[4];
    for (int mm = 0; mm < M; mm++) acc[mm] = _mm256_setzero_ps();
    for (int s = 0; s < a->nseg; s++) {
        const uint8_t *tab = seg_tables(a, t, s);
        __m256i T[4][16];
        for (int e = 0; e < D; e++)
            for (int j = 0; j < NS; j++) {
                T[e][j] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tab + e * a->kp + 16 * j)));
                /* AVX2 multiplies signed codes (maddubs would saturate on c + 128) */
                if (!VNNI) T[e][j] = _mm256_xor_si256(T[e][j], _mm256_set1_epi8((char)0x80));
            }
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
        const __m256 sc = _mm256_loadu_ps(tile_scales(a, t, s) + 8 * h);
        for (int mm = 0; mm < M; mm++) acc[mm] = _mm256_fmadd_ps(gacc[mm], sc, acc[mm]);
    }
    for (int mm = 0; mm < M; mm++) {
        float v[8];
        _mm256_storeu_ps(v, acc[mm]);
        store_rows(a, m0 + mm, t, 8 * h, 8, v);
    }
}

/* tile t's codes (VNNI: c + 128; AVX2: c) in the layout the row loop multiplies: per block of 32 columns 8 vectors of
   64 bytes (rows 0-7 in the first 32, rows 8-15 in the second), vector q = e * (8 / D) + c holding component e of
   index chunk c; the 4 activation bytes that vector q multiplies are bytes 4q..4q+3 of the block's activations */
INLINE void NAME(decode_tile)(const vq8_args *a, int t, const int D, const int KC, uint8_t *out) {
    const int CH = 8 / D, NS = KC / 16;
    for (int s = 0; s < a->nseg; s++) {
        const uint8_t *tab = seg_tables(a, t, s);
        __m256i T[4][16];
        for (int e = 0; e < D; e++)
            for (int j = 0; j < NS; j++) {
                T[e][j] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(tab + e * a->kp + 16 * j)));
                if (!VNNI) T[e][j] = _mm256_xor_si256(T[e][j], _mm256_set1_epi8((char)0x80));
            }
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
        const __m256 sc = _mm256_loadu_ps(tile_scales(a, t, s) + 8 * h);
        for (int mm = 0; mm < M; mm++) acc[mm] = _mm256_fmadd_ps(gacc[mm], sc, acc[mm]);
    }
    for (int mm = 0; mm < M; mm++) {
        float v[8];
        _mm256_storeu_ps(v, acc[mm]);
        store_rows(a, m0 + mm, t, 8 * h, 8, v);
    }
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

/* vector dimension and table size as constants, so the chunk and component loops unroll */
static void NAME(tiles)(const vq8_args *a, int t0, int t1) {
    if (a->grouped) {   /* many rows */
        uint8_t *buf = scratch_get(&tls_tiles, (size_t)a->nblk * 1024);
        if (buf) NAME(tiles_many)(a, t0, t1, buf);
        else *a->oom = 1;
        return;
    }
    if (a->D == 1) NAME(tiles_d)(a, t0, t1, 1);
    else if (a->D == 2) NAME(tiles_d)(a, t0, t1, 2);
    else NAME(tiles_d)(a, t0, t1, 4);
}

#else
/* ========================================================================================== 512-bit body
   (included twice: AVX512-VNNI with pshufb lookups, AVX512-VBMI with vpermb / vpermi2b): a zmm holds the 16 rows
   of a tile. Lookups: VBMI KC = 64, 128 or 256 entries in KC / 64 registers; else as the 256-bit body, 16 / 64 /
   256 entries in KC / 16 registers (16-entry subtables in every 128-bit lane). */

#if !VBMI
/* 32 int8 codes in column order -> de-interleaved by component (stream e: columns D t + e) */
INLINE __m256i NAME(deinterleave)(__m256i q, const int D) {
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

/* quantize_acts (the same rounding, as the 256-bit body's quant_block), one block of 32 values in two registers */
INLINE void NAME(quant_block)(__m512 v0, __m512 v1, const int D, int8_t *out, float *dout, int32_t *aout) {
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const __m512 idv = _mm512_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    const __m512 v[2] = {v0, v1};
    __m512i q[2];
    for (int i = 0; i < 2; i++) {
        const __m512 r = _mm512_mul_ps(v[i], idv);
        const __m512 h = _mm512_or_ps(_mm512_and_ps(r, _mm512_set1_ps(-0.f)), _mm512_set1_ps(0.5f));
        q[i] = _mm512_cvttps_epi32(_mm512_add_ps(r, h));
        q[i] = _mm512_min_epi32(_mm512_max_epi32(q[i], _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
    }
    const int32_t sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
    const __m256i p = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(q[0])),
                                              _mm512_cvtepi32_epi8(q[1]), 1);   /* column order */
    _mm256_storeu_si256((__m256i *)out, NAME(deinterleave)(p, D));
    *aout = -128 * sum;
    *dout = amax / 127.f;
}

/* 32 bf16 or fp32 values from p */
INLINE void NAME(load32)(const void *p, int x_bf16, __m512 *v) {
    if (x_bf16) {
        const __m512i h = _mm512_loadu_si512(p);
        v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
        v[1] = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
    } else {
        v[0] = _mm512_loadu_ps(p);
        v[1] = _mm512_loadu_ps((const float *)p + 16);
    }
}

/* per 128-bit lane j, the reduction (max or add) of register j's 16 values in each of its 4 elements */
#define VQ8_REDUCE4(T, OP, SHUF, PERM, r)                                                                        \
    do {                                                                                                          \
        const T s1 = OP(SHUF(r[0], r[1], 0x44), SHUF(r[0], r[1], 0xEE));                                         \
        const T s2 = OP(SHUF(r[2], r[3], 0x44), SHUF(r[2], r[3], 0xEE));                                         \
        r[0] = OP(SHUF(s1, s2, 0x88), SHUF(s1, s2, 0xDD));                                                       \
        r[0] = OP(r[0], PERM(r[0], 0x4E));                                                                       \
        r[0] = OP(r[0], PERM(r[0], 0xB1));                                                                       \
    } while (0)

/* quant_block on 4 blocks at once: their horizontal max and sum reductions share shuffles */
INLINE void NAME(quant_block4)(const __m512 *v, const int D, int bs, int8_t *out, float *dout, int32_t *aout) {
    __m512 mx[4];
    for (int j = 0; j < 4; j++) mx[j] = _mm512_max_ps(_mm512_abs_ps(v[2 * j]), _mm512_abs_ps(v[2 * j + 1]));
    VQ8_REDUCE4(__m512, _mm512_max_ps, _mm512_shuffle_f32x4, _mm512_permute_ps, mx);
    const __m512 amax = mx[0];   /* block j's max in lane j */
    const __mmask16 pos = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __m512 id4 = _mm512_maskz_div_ps(pos, _mm512_set1_ps(127.f), amax);
    __m512i sums[4];
    for (int j = 0; j < 4; j++) {
        const __m512 idv = _mm512_shuffle_f32x4(id4, id4, 0x55 * j);
        __m512i q[2];
        for (int i = 0; i < 2; i++) {
            const __m512 r = _mm512_mul_ps(v[2 * j + i], idv);
            const __m512 h = _mm512_or_ps(_mm512_and_ps(r, _mm512_set1_ps(-0.f)), _mm512_set1_ps(0.5f));
            q[i] = _mm512_cvttps_epi32(_mm512_add_ps(r, h));
            q[i] = _mm512_min_epi32(_mm512_max_epi32(q[i], _mm512_set1_epi32(-127)), _mm512_set1_epi32(127));
        }
        sums[j] = _mm512_add_epi32(q[0], q[1]);
        __m256i p = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtepi32_epi8(q[0])),
                                            _mm512_cvtepi32_epi8(q[1]), 1);
        _mm256_storeu_si256((__m256i *)(out + (size_t)32 * bs * j), NAME(deinterleave)(p, D));
    }
    VQ8_REDUCE4(__m512i, _mm512_add_epi32, _mm512_shuffle_i32x4, _mm512_shuffle_epi32, sums);
    const __m512i first = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
    int32_t av[4];
    float dv[4];
    _mm_storeu_si128((__m128i *)av, _mm512_castsi512_si128(
        _mm512_mullo_epi32(_mm512_permutexvar_epi32(first, sums[0]), _mm512_set1_epi32(-128))));
    _mm_storeu_ps(dv, _mm512_castps512_ps128(_mm512_permutexvar_ps(first, _mm512_div_ps(amax, _mm512_set1_ps(127.f)))));
    for (int j = 0; j < 4; j++) { aout[(size_t)bs * j] = av[j]; dout[(size_t)bs * j] = dv[j]; }
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
            for (int j = 0; j < 4; j++) NAME(load32)(xr + (size_t)(b + j) * 32 * es, x_bf16, v + 2 * j);
            const size_t at = rb + (size_t)b * bs;
            NAME(quant_block4)(v, D, bs, xq + at * 32, d + at, asum + at);
        }
        for (; b < nblk; b++) {
            const int c0 = b * 32;
            __m512 v0, v1;
            if (c0 + 32 <= k) {
                if (x_bf16) {
                    const __m512i h = _mm512_loadu_si512((const void *)((const uint16_t *)x + (size_t)mm * k + c0));
                    v0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
                    v1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
                } else {
                    v0 = _mm512_loadu_ps((const float *)x + (size_t)mm * k + c0);
                    v1 = _mm512_loadu_ps((const float *)x + (size_t)mm * k + c0 + 16);
                }
            } else {   /* the partial last block: zeros beyond k */
                float tmp[32];
                for (int j = 0; j < 32; j++)
                    tmp[j] = c0 + j >= k ? 0.f : x_bf16 ? bf16_to_f32(((const uint16_t *)x)[(size_t)mm * k + c0 + j])
                                                        : ((const float *)x)[(size_t)mm * k + c0 + j];
                v0 = _mm512_loadu_ps(tmp);
                v1 = _mm512_loadu_ps(tmp + 16);
            }
            const size_t at = rb + (size_t)b * bs;
            NAME(quant_block)(v0, v1, D, xq + at * 32, d + at, asum + at);
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
   qword q gathers bytes 6q..6q+5, and byte t of it takes bits 6t.. of that qword */
INLINE __m512i NAME(unpack6)(const uint8_t *p) {
    static const uint8_t spread[64] __attribute__((aligned(64))) = {
        0, 1, 2, 3, 4, 5, 5, 5, 6, 7, 8, 9, 10, 11, 11, 11,
        12, 13, 14, 15, 16, 17, 17, 17, 18, 19, 20, 21, 22, 23, 23, 23,
        24, 25, 26, 27, 28, 29, 29, 29, 30, 31, 32, 33, 34, 35, 35, 35,
        36, 37, 38, 39, 40, 41, 41, 41, 42, 43, 44, 45, 46, 47, 47, 47};
    static const uint8_t shifts[64] __attribute__((aligned(64))) = {
        0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42,
        0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42,
        0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42,
        0, 6, 12, 18, 24, 30, 36, 42, 0, 6, 12, 18, 24, 30, 36, 42};
    const __m512i v = _mm512_maskz_loadu_epi8(0xffffffffffffull, p);
    return _mm512_multishift_epi64_epi8(_mm512_load_si512((const void *)shifts),
                                        _mm512_permutexvar_epi8(_mm512_load_si512((const void *)spread), v));
}
#endif

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
        const uint8_t *tab = seg_tables(a, t, s);
        __m512i T[4][16];
        for (int e = 0; e < D; e++)
            for (int j = 0; j < NT; j++)
                T[e][j] = VBMI ? _mm512_loadu_si512((const void *)(tab + e * a->kp + 64 * j))
                               : _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tab + e * a->kp + 16 * j)));
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
#if VBMI
                const __m512i idx = PACKED ? NAME(unpack6)(ib + 48 * c) : _mm512_loadu_si512((const void *)(ib + 64 * c));
#else
                const __m512i idx = _mm512_loadu_si512((const void *)(ib + 64 * c));
#endif
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
        const __m512 sc = _mm512_loadu_ps(tile_scales(a, t, s));
        for (int mm = 0; mm < M; mm++) acc[mm] = _mm512_fmadd_ps(gacc[mm], sc, acc[mm]);
    }
    for (int mm = 0; mm < M; mm++) {
        float v[TILE];
        _mm512_storeu_ps(v, acc[mm]);
        store_rows(a, m0 + mm, t, 0, TILE, v);
    }
}

/* tile t's codes (c + 128) in the layout the row loop multiplies: per block of 32 columns 8 vectors of 64 bytes,
   vector q = e * (8 / D) + c holding component e of index chunk c (16 rows x 4 vectors); the 4 activation bytes
   that vector q multiplies are bytes 4q..4q+3 of the block's de-interleaved activations */
INLINE void NAME(decode_tile)(const vq8_args *a, int t, const int D, const int KC, const int PACKED, uint8_t *out) {
    const int CH = 8 / D, NT = VBMI ? KC / 64 : KC / 16;
    for (int s = 0; s < a->nseg; s++) {
        const uint8_t *tab = seg_tables(a, t, s);
        __m512i T[4][16];
        for (int e = 0; e < D; e++)
            for (int j = 0; j < NT; j++)
                T[e][j] = VBMI ? _mm512_loadu_si512((const void *)(tab + e * a->kp + 64 * j))
                               : _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(tab + e * a->kp + 16 * j)));
        for (int b = a->seg_start[s]; b < a->seg_start[s + 1]; b++) {
            const uint8_t *ib = tile_block_idx(a, t, b);
#if !VBMI
            uint8_t buf[512];
            if (a->packed) { unpack_block(ib, D, buf); ib = buf; }
#endif
            uint8_t *ob = out + (size_t)b * 512;
            for (int c = 0; c < CH; c++) {
#if VBMI
                const __m512i idx = PACKED ? NAME(unpack6)(ib + 48 * c) : _mm512_loadu_si512((const void *)(ib + 64 * c));
#else
                const __m512i idx = _mm512_loadu_si512((const void *)(ib + 64 * c));
#endif
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
        const __m512 sc = _mm512_loadu_ps(tile_scales(a, t, s));
        for (int mm = 0; mm < M; mm++) acc[mm] = _mm512_fmadd_ps(gacc[mm], sc, acc[mm]);
    }
    for (int mm = 0; mm < M; mm++) {
        float v[TILE];
        _mm512_storeu_ps(v, acc[mm]);
        store_rows(a, m0 + mm, t, 0, TILE, v);
    }
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
        for (int i = 0; i < 2; i++) {
            const __m512 sc = _mm512_loadu_ps(tile_scales(a, t + i, s));
            for (int mm = 0; mm < 4; mm++) acc[i][mm] = _mm512_fmadd_ps(gacc[i][mm], sc, acc[i][mm]);
        }
    }
    for (int i = 0; i < 2; i++)
        for (int mm = 0; mm < 4; mm++) {
            float v[TILE];
            _mm512_storeu_ps(v, acc[i][mm]);
            store_rows(a, m0 + mm, t + i, 0, TILE, v);
        }
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

static void NAME(tiles)(const vq8_args *a, int t0, int t1) {
    if (a->grouped) {   /* many rows */
        uint8_t *buf = scratch_get(&tls_tiles, (size_t)a->nblk * 1024);
        if (buf) NAME(tiles_many)(a, t0, t1, buf);
        else *a->oom = 1;
        return;
    }
    if (a->D == 1) NAME(tiles_d)(a, t0, t1, 1);
    else if (a->D == 2) NAME(tiles_d)(a, t0, t1, 2);
    else NAME(tiles_d)(a, t0, t1, 4);
}
#endif
