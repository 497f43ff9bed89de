"""The GGUF LoRA format (llama.cpp, Ollama): read to inspect and to re-check what `convert --to gguf` wrote."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from ...adapter import Adapter
from ...errors import LorafitError
from .. import ReadOnlyFormat, register_format


def gguf_package() -> ModuleType:
    """The gguf package, or a LorafitError saying how to install it (it is an optional dependency)."""
    try:
        import gguf
    except ImportError:
        raise LorafitError("GGUF needs the gguf package: pip install 'lorafit[gguf]' (or pip install gguf)") from None
    return gguf


class GgufFormat(ReadOnlyFormat):
    name = "gguf"

    def sniff(self, path: Path) -> bool:
        return path.suffix == ".gguf" and path.is_file()

    def read(self, spec: str | Path, subfolder: str | None = None) -> Adapter:
        from .reader import read_adapter

        return read_adapter(spec, subfolder)

    def targeting(self, adapter: Adapter) -> Callable[[str], bool]:
        names = set(adapter.modules)
        return lambda path: path in names


register_format(GgufFormat())
