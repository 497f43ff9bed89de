"""convert --to gguf without the client: what it refuses, what it writes (read back by the gguf package and by
lorafit's own GGUF reader), and bad GGUF input. llama.cpp's proof is tests/clients (make test-clients)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from safetensors.torch import load_file

from conftest import make_adapter
from helpers import assert_one_line_error, cli, cli_json

CAUSAL = "AutoModelForCausalLM"


def test_what_it_writes(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], CAUSAL, tmp_path / "a", use_rslora=True, rank_pattern={"down_proj": 8})
    code, report = cli_json("convert", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "a.gguf",
                            "--base", bases["llama"])
    assert code == 0, report
    reader = gguf.GGUFReader(str(tmp_path / "a.gguf"))
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    alpha = reader.get_field("adapter.lora.alpha").contents()
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert "blk.1.ffn_down.weight.lora_b" in tensors and "blk.0.attn_q.weight.lora_a" in tensors
    # llama.cpp scales by alpha / rank: alpha/sqrt(r) of rsLoRA is folded so that both ranks get PEFT's scale
    peft = load_file(tmp_path / "a" / "adapter_model.safetensors")
    down_b = peft["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].double().numpy()
    assert alpha == pytest.approx(8 / 4 ** 0.5 * 4)  # the most common module: r 4
    np.testing.assert_allclose(tensors["blk.1.ffn_down.weight.lora_b"] * alpha / 8,
                               down_b * 8 / 8 ** 0.5, rtol=1e-6)  # r 8 via rank_pattern
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight.lora_a"],
                                  peft["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"].numpy())
    code, inspected = cli_json("inspect", tmp_path / "a.gguf")  # lorafit reads GGUF adapters too
    assert code == 0 and inspected["adapter"]["modules"] == 6


@pytest.mark.parametrize(("family", "lora", "why"), [
    ("llama", {"use_dora": True}, "DoRA"),
    ("llama", {"modules_to_save": ["lm_head"]}, "full tensor"),
    ("gpt2", {}, "this base is 'gpt2'"),
])
def test_what_gguf_cannot_hold_is_refused(bases: dict[str, Path], tmp_path: Path, family: str,
                                          lora: dict[str, Any], why: str) -> None:
    make_adapter(bases[family], CAUSAL, tmp_path / "a", **lora)
    code, report = cli_json("convert", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "a.gguf",
                            "--base", bases[family])
    assert code == 1 and not (tmp_path / "a.gguf").exists()
    assert why in next(f for f in report["findings"] if f["code"] == "convert-refused")["message"]


def test_bad_input(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], CAUSAL, tmp_path / "a")
    nameless = tmp_path / "nameless"
    shutil.copytree(tmp_path / "a", nameless)
    config = json.loads((nameless / "adapter_config.json").read_text())
    (nameless / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": None}))
    code, out, err = cli("convert", nameless, "--to", "gguf", "-o", tmp_path / "n.gguf")
    assert_one_line_error(code, out, err, "--to gguf needs --base (the adapter names no base)")
    # without --base, the base the adapter names
    assert cli("convert", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "a.gguf").code == 0
    code, out, err = cli("convert", tmp_path / "a", "--to", "gguf", "-o", tmp_path / "a.gguf", "--base", bases["llama"])
    assert_one_line_error(code, out, err, "a.gguf", "already exists")
    data = (tmp_path / "a.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    code, out, err = cli("inspect", tmp_path / "cut.gguf")
    assert_one_line_error(code, out, err, "cut.gguf", "not a readable GGUF file")
    code, out, err = cli("inspect", bases["llama"] / "model.safetensors")
    assert code == 2
