"""Helpers with no hf_vq dependency: atomic writes, the C-kernel builder, module-tree edits, the version."""
