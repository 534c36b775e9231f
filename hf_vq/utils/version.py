"""The package version (one place; hf_vq.__version__ and the files hf_vq writes read it)."""

__version__ = "0.1.0"
