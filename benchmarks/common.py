"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``, so this imports as ``common``)."""


def first_blocks_only(blocks: int) -> dict:
    """module_overrides that leave every decoder block from ``blocks`` on in float (quick sweeps on a CPU)."""
    return {rf"layers\.(?!({'|'.join(map(str, range(blocks)))})\.)": {"skip": True}}
