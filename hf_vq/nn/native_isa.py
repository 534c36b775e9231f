"""The run-time instruction-set choice of a native C kernel library: what the CPU reports, and ``HF_VQ_NATIVE_ISA``,
which forces one path for testing (a path this CPU lacks becomes the best one it has)."""

from __future__ import annotations

from hf_vq.utils.env import getenv

ENV = "HF_VQ_NATIVE_ISA"


class IsaChoice:
    def __init__(self, library, names: dict[str, int], supported_symbol: str, best_symbol: str):
        """names: ISA name -> the C code's number ("auto" is 0); the symbols are the library's ``int f(int isa)``
        and ``int f(void)``."""
        self.library, self.names = library, names
        self.numbers = {v: k for k, v in names.items()}
        self.supported_symbol, self.best_symbol = supported_symbol, best_symbol
        self._requested: dict[str, int] = {}

    def supported(self, name: str) -> bool:
        lib = self.library.load()
        return lib is not None and bool(getattr(lib, self.supported_symbol)(self.names[name]))

    def best(self) -> str:
        lib = self.library.load()
        return "none" if lib is None else self.numbers[getattr(lib, self.best_symbol)()]

    def requested(self) -> int:
        """HF_VQ_NATIVE_ISA as the C code's number (0: the best this CPU has)."""
        name = getenv(ENV, "auto")
        isa = self._requested.get(name)
        if isa is None:
            if name not in self.names:
                raise ValueError(f"{ENV}={name!r}: expected one of {sorted(self.names)}")
            isa = self._requested[name] = self.names[name] if self.names[name] and self.supported(name) else 0
        return isa
