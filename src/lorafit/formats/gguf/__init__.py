"""The GGUF LoRA format (llama.cpp, Ollama): read to inspect and to re-check what `convert --to gguf` wrote."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ...adapter import Adapter
from ...align import Landing
from ...errors import LorafitError
from ...findings import Finding
from ...tree import ModuleTree
from .. import register_format


class GgufFormat:
    name = "gguf"

    def sniff(self, path: Path) -> bool:
        return path.suffix == ".gguf" and path.is_file()

    def read(self, spec: str | Path, subfolder: str | None = None) -> Adapter:
        from .reader import read_adapter

        return read_adapter(spec, subfolder)

    def targeting(self, adapter: Adapter) -> Callable[[str], bool]:
        names = set(adapter.modules)
        return lambda path: path in names

    def adapter_rules(self, adapter: Adapter) -> list[Finding]:
        return []

    def landing_rules(self, adapter: Adapter, tree: ModuleTree, landing: Landing, hint: str | None) -> list[Finding]:
        return []

    def write(self, adapter: Adapter, landing: Landing, tree: ModuleTree, out_dir: Path,
              source_desc: str | None = None, follow_symlinks: bool = True) -> dict[str, str]:
        raise LorafitError("fix writes PEFT adapters; a GGUF adapter is written by lorafit convert --to gguf from "
                           "the PEFT adapter", adapter.path)


register_format(GgufFormat())
