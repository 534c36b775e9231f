/* Benchmark aid (benchmarks/kernel_speed.py): how fast this machine reads a layer's buffers from memory.
   read_stream returns the wall time in nanoseconds of `count` reads of `bytes` bytes, read i on bufs[i % nbuf]
   (the copies of a layer that a kernel reads, so that every read streams from DRAM), each read split into nthreads
   contiguous parts as the kernels split one row, with the kernels' prefetch (non-temporal, 8 KiB ahead). */
#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <time.h>

#define AHEAD 8192

typedef uint64_t v8u __attribute__((vector_size(64)));

static uint64_t sum_range(const unsigned char *p, size_t n) {
    v8u a = {0}, b = {0}, t;
    size_t o = 0;
    for (; o + 128 <= n; o += 128) {
        __builtin_prefetch(p + o + AHEAD, 0, 0);
        __builtin_prefetch(p + o + AHEAD + 64, 0, 0);
        memcpy(&t, p + o, 64);
        a += t;
        memcpy(&t, p + o + 64, 64);
        b += t;
    }
    uint64_t s = 0;
    for (; o < n; o++) s += p[o];
    a += b;
    for (int i = 0; i < 8; i++) s += a[i];
    return s;
}

volatile uint64_t read_stream_sink;

long long read_stream(const void *const *bufs, int nbuf, long long bytes, int count, int nthreads) {
    struct timespec t0, t1;
    if (nbuf < 1 || count < 1 || bytes < 1 || !timespec_get(&t0, TIME_UTC)) return -1;
    for (int i = 0; i < count; i++) {
        const unsigned char *p = (const unsigned char *)bufs[i % nbuf];
        if (nthreads <= 1) {
            read_stream_sink += sum_range(p, (size_t)bytes);
            continue;
        }
        const size_t part = ((size_t)bytes / nthreads + 63) / 64 * 64;
        #pragma omp parallel for schedule(static) num_threads(nthreads)
        for (int th = 0; th < nthreads; th++) {
            const size_t s = part * th < (size_t)bytes ? part * th : (size_t)bytes;
            const size_t e = s + part < (size_t)bytes ? s + part : (size_t)bytes;
            read_stream_sink += sum_range(p + s, e - s);
        }
    }
    timespec_get(&t1, TIME_UTC);
    return (long long)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
}
