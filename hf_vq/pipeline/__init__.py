"""Calibration pipeline: data, the block runner, the activation store, and one driver per method.

Importing the package registers every driver in :mod:`hf_vq.pipeline.registry`.
"""

from hf_vq.pipeline import adascale, gptq, gptvq, quantsim  # noqa: F401  (register their algorithms)
from hf_vq.pipeline.registry import ALGORITHMS, calibration_samples, register_algorithm, run

__all__ = ["ALGORITHMS", "calibration_samples", "register_algorithm", "run"]
