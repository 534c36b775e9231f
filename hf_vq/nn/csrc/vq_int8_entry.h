/* Included at the end of vq_int8_256.h and vq_int8_512.h (no include guard: once per instruction set): the body's
   entry point. Many rows go through the tiles decoded once per call; fewer run per block with the vector dimension
   and table size as constants, so the chunk and component loops unroll. */
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
