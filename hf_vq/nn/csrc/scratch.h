/* Per-thread scratch memory that persists across calls (OpenMP's workers and the calling thread keep theirs), so that
   a prefill call does not map and fault in fresh pages every time. Buffers past SCRATCH_KEEP bytes are freed by the
   caller after the call instead (rare, very long prompts on wide layers). */
#ifndef HF_VQ_SCRATCH_H
#define HF_VQ_SCRATCH_H
#include <stdint.h>
#include <stdlib.h>

#define SCRATCH_KEEP ((size_t)16 << 20)
typedef struct { uint8_t *p; size_t cap; } scratch_buf;

/* at least `bytes` bytes (64-byte aligned) of the buffer, or NULL when memory runs out */
static inline uint8_t *scratch_get(scratch_buf *s, size_t bytes) {
    bytes = (bytes + 63) / 64 * 64;
    if (bytes <= s->cap) return s->p;
    free(s->p);
    s->p = (uint8_t *)aligned_alloc(64, bytes);
    s->cap = s->p ? bytes : 0;
    return s->p;
}

static inline void scratch_trim(scratch_buf *s) {
    if (s->cap > SCRATCH_KEEP) { free(s->p); s->p = NULL; s->cap = 0; }
}
#endif
