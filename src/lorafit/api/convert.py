"""convert: an adapter in another format, exactly, or a refusal that says why and writes nothing.

PEFT -> mlx-lm and mlx-lm -> PEFT: formats/mlx/writer.py. PEFT -> GGUF (llama.cpp, Ollama): formats/gguf/writer.py,
after landing the adapter on the base's own class as check does. Outputs are written atomically and read back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapter import Adapter
from ..diagnose import plural, verb
from ..errors import LorafitError
from ..fileio.manifest import write_manifest
from ..fileio.outputs import OutputDir
from ..findings import Finding
from ..formats import ensure_adapter
from ..formats.mlx import layer_key
from ..formats.peft.reader import strip_root
from ..report import Report
from .check import adapter_summary

TARGETS = ("mlx", "gguf", "peft")


def _refusals(a: Adapter, to: str) -> list[str]:
    """What PEFT -> mlx-lm or GGUF cannot carry exactly."""
    why = []
    what = {"mlx": "mlx-lm", "gguf": "a GGUF LoRA"}.get(to, to)
    if any(m.has_dora for m in a.modules.values()):
        why.append(f"DoRA magnitudes ({what} applies plain LoRA)")
    if any(m.has_bias for m in a.modules.values()):
        why.append(f"lora_B biases ({what} has none)")
    if a.extras:
        full = plural(len(a.extras), "full tensor")
        why.append(f"{full} (modules_to_save or saved embeddings), which {what} cannot hold")
    odd = [m.path for m in a.modules.values() if m.kind != "linear"]
    if odd:
        why.append(f"LoRA on {len(odd)} non-linear modules (embeddings, convolutions or MoE parameters), e.g. "
                   f"{odd[0]}")
    outside = [m.path for m in a.modules.values() if m.kind == "linear" and layer_key(strip_root(m.path)) is None]
    if outside and to == "mlx":
        why.append(f"{plural(len(outside), 'module')} outside the decoder layers (mlx-lm wraps model.layers only), "
                   f"e.g. {outside[0]}")
    if a.unrooted_keys or a.incomplete:
        why.append("keys PEFT itself would not load (run lorafit check)")
    return why


def _model_dir(base: str | Path) -> Any:
    """The base's directory and config.json (targets.transformers.resolve.ModelDir), read once for convert."""
    from ..targets.transformers.resolve import open_model_dir

    return open_model_dir(base)


def _num_layers(md: Any) -> int | None:
    """The base's decoder layer count (mlx-lm counts num_layers from the top), when a base was given."""
    if md is None:
        return None
    config = md.config
    text = config.get("text_config")
    n = (text if isinstance(text, dict) else config).get("num_hidden_layers")
    return n if isinstance(n, int) else None


def convert(adapter: Adapter | str | Path, to: str, out: str | Path, base: str | Path | None = None,
            force: bool = False) -> Report:
    """Write `adapter` in the format `to` ("mlx" or "peft") to `out`, exactly, or refuse and write nothing.

    Args:
        base: the base model; for PEFT -> mlx-lm its num_hidden_layers, when the adapter's layers_to_transform
            leaves its top layers out (mlx-lm counts num_layers from the top).
    Returns:
        a Report (command "convert"); not ok, and nothing written, when the adapter cannot be converted exactly.
    Raises:
        LorafitError: unreadable input, unknown target format, OUT exists without force.
    """
    if to not in TARGETS:
        raise LorafitError(f"unknown --to {to!r}; known: {', '.join(TARGETS)}")
    a = ensure_adapter(adapter)
    out = Path(out)
    report = Report("convert", adapter=adapter_summary(a, None), result={"written": False, "out": str(out), "to": to})
    if a.format == to:
        raise LorafitError(f"the adapter is already in the {to} format", a.path)
    if to == "gguf" and base is None:
        if not a.base_model:
            raise LorafitError("--to gguf needs --base (the adapter names no base): the GGUF tensor names and "
                               "llama.cpp's row order come from the base's architecture")
        base = a.base_model  # the base the adapter names, as for check
    if to == "peft" and a.format != "mlx":
        raise LorafitError(f"--to peft converts mlx-lm adapters; this one is {a.format}", a.path)
    why = _refusals(a, to)
    partial = a.format == "peft" and a.config.get("layers_to_transform") is not None
    if to == "mlx" and partial and base is None:
        why.append("layers_to_transform is set, so the base's layer count is needed (mlx-lm counts num_layers from "
                   "the top layer): pass --base")
    md = _model_dir(base) if base is not None and to != "peft" and not why else None  # config.json read once
    paths = _landing(a, md, why) if md is not None else None
    if to == "mlx" and not why:
        _mlx_layers(a, paths, why)
    gguf_plan = _gguf_plan(a, md, paths, why) if to == "gguf" and not why else None
    if why:
        report.findings.append(Finding("convert-refused", f"cannot convert to {to} exactly: {'; '.join(why)}"))
        return report
    done = _write(a, to, out, force, md, paths, gguf_plan)
    report.findings.append(Finding("converted", f"wrote {out} ({to})"))
    report.result |= {"written": True, **done}
    return report


def _write(a: Adapter, to: str, out: Path, force: bool, md: Any, paths: dict[str, str] | None,
           gguf_plan: Any) -> dict[str, Any]:
    """Write atomically, reading the output back as its own format before it is put in place."""
    from ..fileio.outputs import OutputFile
    from ..formats.gguf import reader as gguf_reader
    from ..formats.gguf import writer as gguf_writer
    from ..formats.mlx import reader as mlx_reader
    from ..formats.mlx import writer as mlx_writer
    from ..formats.peft import reader as peft_reader

    if to == "gguf":
        with OutputFile(out, force=force, protect=[a.path]) as tmp_file:
            done = gguf_writer.write(a, gguf_plan, tmp_file)
            _same_count(len(gguf_reader.read_adapter(tmp_file).modules), done["modules"], tmp_file)
        return done
    with OutputDir(out, force=force, protect=[a.path]) as tmp:
        if to == "mlx":
            done = mlx_writer.to_mlx(a, tmp, _num_layers(md), paths)
            _same_count(len(mlx_reader.read_adapter(tmp).modules), len(a.modules) + done["zero_cells"], tmp)
        else:
            done = mlx_writer.to_peft(a, tmp)
            _same_count(len(peft_reader.read_adapter(tmp).modules), len(a.modules), tmp)
        write_manifest(tmp)
    return done


def _same_count(found: int, expected: int, where: Path) -> None:
    if found != expected:
        raise LorafitError(f"the written adapter holds {found} LoRA modules, expected {expected}", where)


def _landing(a: Adapter, md: Any, why: list[str]) -> dict[str, str] | None:
    """Adapter module path -> module path in the base's own class (the class a runtime loads), as check lands it;
    appends to `why` when it does not land completely."""
    from .check import run_check_for_checkpoint

    checked = run_check_for_checkpoint(a, md.path, None, None)
    landing = checked.alignment.chosen
    if not landing.complete or checked.alignment.ambiguous:
        errors = ", ".join(f.code for f in checked.report.errors())
        why.append(f"the adapter does not land completely on {checked.tree.class_name} ({errors}; run lorafit check)")
        return None
    return dict(landing.pairs)


def _mlx_layers(a: Adapter, paths: dict[str, str] | None, why: list[str]) -> None:
    """mlx-lm's language models keep their decoder layers under model.layers."""
    stems = {k[0] for m in a.modules.values() if (k := layer_key((paths or {}).get(m.path) or strip_root(m.path)))}
    if stems and stems != {"model.layers"}:
        why.append(f"the module paths lie under {', '.join(sorted(stems))}, not model.layers where mlx-lm's models "
                   "keep their layers (saved from another class?): pass --base to land them on the base's class")


def _gguf_plan(a: Adapter, md: Any, paths: dict[str, str] | None, why: list[str]) -> Any:
    """Each landed module's GGUF tensor name; appends to `why` what stops an exact conversion."""
    from ..formats.gguf import writer

    if paths is None or md is None:
        return None
    p = writer.plan(a, paths, md.config)
    if isinstance(p, str):
        why.append(p)
        return None
    if p.unmapped:
        has = verb(len(p.unmapped), 'has', 'have')
        why.append(f"{plural(len(p.unmapped), 'module')} {has} no GGUF tensor in llama.cpp's name map (vision "
                   f"towers or heads), e.g. {p.unmapped[0]}")
        return None
    return p
