"""Constants shared by the AIMET encodings writer and reader."""

import re

VERSIONS = ("0.6.1", "1.0.0")
ENC_TYPES = ("PER_TENSOR", "PER_CHANNEL", "PER_BLOCK", "LPBQ", "VECTOR")
# sim.onnx.export names Linear weights "<module>.weight_0": transposed MatMul initializers [in, out]. Their block
# arrays (PER_BLOCK scale/offset, LPBQ per_block_int_scale) are flattened block-major [n_blocks, C_out]; see
# tests/test_blockwise.py::test_lpbq_reference_llama_block_major_layout (AIMET's tiny-Llama LPBQ file).
_ONNX_SUFFIX = re.compile(r"^(.*\.weight)_(?:dup_)?\d+$")
