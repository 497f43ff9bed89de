"""The valid inputs every fuzz case starts from, made once per process by real transformers, PEFT and lorafit.

A mutation of a real file reaches deeper than a file written by hand: every field but the mutated one is what
the libraries really write, so the command gets past its first checks.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from conftest import load_model, make_adapter, save_base
from helpers import cli


@dataclass(frozen=True)
class Fixtures:
    """Valid inputs (never modified: each case works on a copy) and `scratch`, where the copies go."""

    adapter: Path  # LoRA on q_proj, v_proj, down_proj of a tiny Llama, saved from AutoModelForCausalLM
    base: Path  # the tiny Llama: config.json + one model.safetensors
    sharded: Path  # the same model in two shards + model.safetensors.index.json
    merged: Path  # `lorafit merge adapter --base base`
    merged_sharded: Path  # `lorafit merge adapter --base sharded --max-shard-size 20KB`
    scratch: Path


def _merge(adapter: Path, base: Path, out: Path, *extra: str) -> None:
    result = cli("merge", adapter, "--base", base, "-o", out, *extra, catch=True)
    assert result.code == 0, (result.code, result.output, result.exception)


def build(root: Path, llama_base: Path | None = None) -> Fixtures:
    """Make every fixture below `root`; `llama_base` reuses a tiny Llama saved already (tests' `bases`)."""
    if llama_base is None:
        llama_base = save_base(root / "src", "llama")
    base = root / "llama-base"
    shutil.copytree(llama_base, base)
    sharded = root / "llama-sharded"
    load_model(base, "AutoModelForCausalLM").save_pretrained(sharded, max_shard_size="20KB")
    adapter = root / "adapter"
    make_adapter(base, "AutoModelForCausalLM", adapter, task_type="CAUSAL_LM")
    _merge(adapter, base, root / "merged")
    _merge(adapter, sharded, root / "merged-sharded", "--max-shard-size", "20KB")
    scratch = root / "examples"
    scratch.mkdir()
    return Fixtures(adapter, base, sharded, root / "merged", root / "merged-sharded", scratch)


_SHARED: list[Fixtures] = []


def shared(root: Path, llama_base: Path | None = None) -> Fixtures:
    """The process's one set of fixtures: every fuzz test module asks for it, the first one builds it."""
    if not _SHARED:
        _SHARED.append(build(root, llama_base))
    return _SHARED[0]
