"""The PEFT format: adapter_config.json + adapter_model.safetensors (or .bin), keys under base_model.model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ...adapter import Adapter
from ...align import Landing
from ...findings import Finding
from ...tree import ModuleTree
from .. import register_format
from .reader import CONFIG_NAME


class PeftFormat:
    """PeftModel.save_pretrained's layout, read and written as PEFT does."""

    name = "peft"

    def sniff(self, path: Path) -> bool:
        return (path / CONFIG_NAME).is_file() or path.name == CONFIG_NAME

    def read(self, spec: str | Path, subfolder: str | None = None) -> Adapter:
        from .reader import read_adapter

        return read_adapter(spec, subfolder)

    def targeting(self, adapter: Adapter) -> Callable[[str], bool]:
        from .targeting import is_targeted

        config = adapter.config
        return lambda path: is_targeted(config, path)

    def adapter_rules(self, adapter: Adapter) -> list[Finding]:
        from .rules import adapter_rules

        return adapter_rules(adapter)

    def landing_rules(self, adapter: Adapter, tree: ModuleTree, landing: Landing, hint: str | None) -> list[Finding]:
        from .rules import landing_rules

        return landing_rules(adapter, tree, landing, hint)

    def write(self, adapter: Adapter, landing: Landing, tree: ModuleTree, out_dir: Path,
              source_desc: str | None = None, follow_symlinks: bool = True) -> dict[str, str]:
        from .writer import write_adapter

        return write_adapter(adapter, landing, tree, out_dir, source_desc, follow_symlinks)


register_format(PeftFormat())
