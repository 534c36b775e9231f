"""Storage formats: affine and blockwise/LPBQ grids, bit packing, the VQ layout and AIMET encoding entries.
Tensors in, tensors out: no nn.Module, no transformers."""
