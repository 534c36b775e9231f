"""Moved to :mod:`hf_vq.formats`. ``hf_vq.quant.affine``, ``.blockwise`` and ``.packing`` stay importable as the
very same modules, so old imports keep working."""

import sys

from hf_vq.formats import affine, blockwise, packing

for _module in (affine, blockwise, packing):
    sys.modules[f"{__name__}.{_module.__name__.rpartition('.')[2]}"] = _module
