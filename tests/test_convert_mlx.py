"""convert --to mlx, proven by the real client: mlx-lm loads the tiny HF base and the converted adapter, and its
logits must equal PEFT's on the same tokens. A wrong scale, a missed transpose or a skipped layer moves them by
far more than the tolerance (each case asserts the adapter's own effect is large). Back to PEFT, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx  # the real client: mlx and mlx-cpu are pinned in requirements.lock
import numpy as np
import pytest
import torch
import transformers
from mlx_lm.tuner.utils import load_adapters
from mlx_lm.utils import load_model
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from helpers import assert_one_line_error, cli, cli_json, snapshot
from lorafit.api.runtimes import check_runtimes

IDS = [[1, 5, 9, 3, 7, 2, 11, 4]]
FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "qwen2": lambda: transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(request.param) / "base"
    transformers.AutoModelForCausalLM.from_config(FAMILIES[request.param]()).save_pretrained(out)
    # transformers 5 writes rope_theta inside rope_parameters; mlx-lm 0.32 reads the top-level key and otherwise
    # takes its own default (1e6 for Qwen2), so the base itself would differ at later positions.
    config = json.loads((out / "config.json").read_text())
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    (out / "config.json").write_text(json.dumps(config))
    return out


def _peft(base: Path, out: Path, class_name: str = "AutoModelForCausalLM", **lora: Any) -> np.ndarray:
    """A real PEFT adapter with trained-looking lora_B, saved to `out`; returns PEFT's logits on IDS (of the model
    it was trained on)."""
    torch.manual_seed(1)
    model = getattr(transformers, class_name).from_pretrained(base)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM"}
    pm = get_peft_model(model, LoraConfig(**(kwargs | lora)))
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    pm.save_pretrained(out)
    with torch.no_grad():
        output = pm.eval()(torch.tensor(IDS))
    return (output.logits if hasattr(output, "logits") else output.last_hidden_state)[0].numpy()


def _mlx_logits(base: Path, adapter: Path | None) -> np.ndarray:
    model, _ = load_model(base)
    if adapter is not None:
        model = load_adapters(model, str(adapter))
    return np.array(model(mx.array(IDS))[0])


CASES = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"down_proj": 8}, "alpha_pattern": {"v_proj": 32}},
    "lower-layers": {"layers_to_transform": [0, 1]},
    "one-layer": {"layers_to_transform": [1], "target_modules": ["q_proj", "o_proj", "gate_proj"]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mlx_lm_applies_the_converted_adapter_as_peft_does(base: Path, tmp_path: Path, case: str) -> None:
    ref = _peft(base, tmp_path / "peft", **CASES[case])
    before = snapshot(tmp_path / "peft")
    code, report = cli_json("convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx", "--base", base)
    assert code == 0 and report["result"]["written"], report
    assert snapshot(tmp_path / "peft") == before  # the input is never modified
    base_logits = _mlx_logits(base, None)
    assert np.abs(ref - base_logits).max() > 0.05  # the adapter changes the output a lot ...
    got = _mlx_logits(base, tmp_path / "mlx")
    assert np.abs(got - ref).max() < 2e-5  # ... and mlx-lm with the converted adapter reproduces PEFT's change
    # the converted adapter is what --runtime mlx accepts, against the same base
    assert check_runtimes(tmp_path / "mlx", ["mlx"], base=base).ok


def test_an_adapter_saved_from_another_class_is_landed_with_the_base(base: Path, tmp_path: Path) -> None:
    """Saved from AutoModel, its paths are layers.N…: without --base that is refused; with it, convert lands them on
    the base's class (model.layers.N…), and mlx-lm applies the adapter as PEFT does on the causal LM."""
    _peft(base, tmp_path / "peft", class_name="AutoModel", task_type=None)
    code, report = cli_json("convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx")
    assert code == 1 and "pass --base to land them" in report["findings"][-1]["message"]
    code, report = cli_json("convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx", "--base", base)
    assert code == 0, report
    code, fixed = cli_json("fix", tmp_path / "peft", "--base", base, "--class", "AutoModelForCausalLM",
                           "-o", tmp_path / "fixed")
    assert code == 0, fixed
    causal = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        ref = PeftModel.from_pretrained(causal, tmp_path / "fixed").eval()(torch.tensor(IDS)).logits[0].numpy()
    assert np.abs(_mlx_logits(base, tmp_path / "mlx") - ref).max() < 2e-5


def test_round_trip_to_peft_is_bit_exact(base: Path, tmp_path: Path) -> None:
    ref = _peft(base, tmp_path / "peft")
    cli("convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx")
    code, report = cli_json("convert", tmp_path / "mlx", "--to", "peft", "-o", tmp_path / "back")
    assert code == 0, report
    original = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        got = PeftModel.from_pretrained(model, tmp_path / "back").eval()(torch.tensor(IDS)).logits[0].numpy()
    np.testing.assert_array_equal(got, ref)


def test_mlx_lower_layers_round_trip_keeps_the_layers(base: Path, tmp_path: Path) -> None:
    """mlx-lm counts num_layers from the top: an adapter on layer 1 of 3 covers layers 1-2, layer 2 with zeros."""
    ref = _peft(base, tmp_path / "peft", layers_to_transform=[1])
    cli("convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx", "--base", base)
    assert json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())["num_layers"] == 2
    cli("convert", tmp_path / "mlx", "--to", "peft", "-o", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "adapter_config.json").read_text())["layers_to_transform"] == [1, 2]
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        got = PeftModel.from_pretrained(model, tmp_path / "back").eval()(torch.tensor(IDS)).logits[0].numpy()
    assert np.abs(got - ref).max() < 2e-5


@pytest.mark.parametrize(("lora", "why"), [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "full tensor"),
    ({"target_modules": ["q_proj", "embed_tokens"]}, "non-linear modules"),
    ({"layers_to_transform": [0]}, "pass --base"),
])
def test_what_mlx_cannot_hold_is_refused_and_nothing_is_written(base: Path, tmp_path: Path, lora: dict[str, Any],
                                                                 why: str) -> None:
    _peft(base, tmp_path / "peft", **lora)
    code, report = cli_json("convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx")
    assert code == 1 and not (tmp_path / "mlx").exists()
    refused = next(f for f in report["findings"] if f["code"] == "convert-refused")
    assert why in refused["message"]


def test_ollama_ignores_an_mlx_adapters_scale(base: Path, tmp_path: Path) -> None:
    _peft(base, tmp_path / "peft")
    cli("convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx")
    report = check_runtimes(tmp_path / "mlx", ["ollama", "vllm"])
    scale = next(f for f in report.findings if f.code == "runtime-scale")
    assert scale.runtime and scale.runtime.startswith("ollama") and "ignores lora_parameters.scale 2" in scale.message
    assert any(f.code == "runtime-format" and (f.runtime or "").startswith("vllm") for f in report.findings)


def test_bad_mlx_adapters_are_one_line_errors(base: Path, tmp_path: Path) -> None:
    _peft(base, tmp_path / "peft")
    cli("convert", tmp_path / "peft", "--to", "mlx", "-o", tmp_path / "mlx")
    cfg = tmp_path / "mlx" / "adapter_config.json"
    config = json.loads(cfg.read_text())
    del config["num_layers"]
    cfg.write_text(json.dumps(config))
    code, out, err = cli("inspect", tmp_path / "mlx")
    assert_one_line_error(code, out, err, "adapter_config.json", "num_layers")
    weights = tmp_path / "mlx" / "adapters.safetensors"
    config["num_layers"] = 3
    cfg.write_text(json.dumps(config))
    weights.write_bytes(weights.read_bytes()[:100])
    code, out, err = cli("convert", tmp_path / "mlx", "--to", "peft", "-o", tmp_path / "back")
    assert_one_line_error(code, out, err, "adapters.safetensors")
    assert not (tmp_path / "back").exists()
    code, out, err = cli("convert", tmp_path / "peft", "--to", "gguf2", "-o", tmp_path / "x")
    assert_one_line_error(code, out, err, "unknown --to 'gguf2'; known: mlx, gguf, peft")
