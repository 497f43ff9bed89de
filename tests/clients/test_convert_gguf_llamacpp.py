"""convert --to gguf, proven by the real client: llama-cpp-python loads a tiny GGUF base written from the tiny HF
model and the converted LoRA, and its logits must equal PEFT's. The base alone must first agree with transformers,
so a wrong row order, scale or name in the adapter shows as a difference far above llama.cpp's own rounding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import llama_cpp
import numpy as np
import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from helpers import cli_json

IDS = [1, 5, 9, 3, 7, 2, 11, 4]
FAMILIES = {
    "llama": (transformers.LlamaConfig, gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (transformers.Qwen2Config, gguf.MODEL_ARCH.QWEN2, False),
}


def _regroup(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's order of q/k rows for llama (written here independently of lorafit)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_base(model: Any, arch: Any, regroup: bool, out: Path) -> None:
    cfg = model.config
    tmap = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("no_vocab")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for key, value in model.state_dict().items():
        data = value.float().numpy()
        if regroup and key.endswith("q_proj.weight"):
            data = _regroup(data, cfg.num_attention_heads)
        if regroup and key.endswith("k_proj.weight"):
            data = _regroup(data, cfg.num_key_value_heads)
        w.add_tensor(tmap.get_name(key, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def base(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(HF base dir, GGUF base file) of one tiny model."""
    config_class, arch, regroup = FAMILIES[request.param]
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp(request.param)
    config = config_class(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(root / "hf")
    _gguf_base(model, arch, regroup, root / "base.gguf")
    return root / "hf", root / "base.gguf"


def _llama_cpp(base_gguf: Path, lora: Path | None) -> np.ndarray:
    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(base_gguf), logits_all=True, n_ctx=64, verbose=False, **kwargs)
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)])


def _peft(hf: Path, out: Path, class_name: str = "AutoModelForCausalLM", **lora: Any) -> tuple[np.ndarray, np.ndarray]:
    """A real PEFT adapter (trained-looking lora_B) saved to `out`: (base logits, PEFT logits) on the causal LM."""
    torch.manual_seed(1)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]}
    trained = get_peft_model(getattr(transformers, class_name).from_pretrained(hf), LoraConfig(**(kwargs | lora)))
    for name, p in trained.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    trained.save_pretrained(out)
    causal = transformers.AutoModelForCausalLM.from_pretrained(hf).eval()
    with torch.no_grad():
        plain = causal(torch.tensor([IDS])).logits[0].numpy()
    from peft import PeftModel

    if class_name != "AutoModelForCausalLM":  # the same trained weights, on the causal LM: lorafit fix's job
        code, report = cli_json("fix", out, "--base", hf, "--class", "AutoModelForCausalLM", "-o", out.parent / "f")
        assert code == 0, report
        out = out.parent / "f"
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(causal, out).eval()(torch.tensor([IDS])).logits[0].numpy()
    return plain, adapted


CASES = {
    "plain": {},
    "rslora": {"use_rslora": True},
    "patterns": {"rank_pattern": {"down_proj": 8}, "alpha_pattern": {"v_proj": 32}},
    "layers": {"layers_to_transform": [1]},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_cpp_applies_the_converted_adapter_as_peft_does(base: tuple[Path, Path], tmp_path: Path,
                                                               case: str) -> None:
    hf, base_gguf = base
    plain, ref = _peft(hf, tmp_path / "peft", **CASES[case])
    assert np.abs(_llama_cpp(base_gguf, None) - plain).max() < 5e-4  # the GGUF base is the HF base
    assert np.abs(ref - plain).max() > 0.1  # the adapter changes the output a lot ...
    code, report = cli_json("convert", tmp_path / "peft", "--to", "gguf", "-o", tmp_path / "a.gguf", "--base", hf)
    assert code == 0, report
    got = _llama_cpp(base_gguf, tmp_path / "a.gguf")
    assert np.abs(got - ref).max() < 2e-3  # ... and llama.cpp with the converted LoRA reproduces PEFT's change


def test_an_adapter_saved_from_another_class_is_landed_first(base: tuple[Path, Path], tmp_path: Path) -> None:
    """Saved from AutoModel (paths layers.N…): convert lands it on the causal LM before naming GGUF tensors."""
    hf, base_gguf = base
    _, ref = _peft(hf, tmp_path / "peft", class_name="AutoModel")
    code, report = cli_json("convert", tmp_path / "peft", "--to", "gguf", "-o", tmp_path / "a.gguf", "--base", hf)
    assert code == 0, report
    assert np.abs(_llama_cpp(base_gguf, tmp_path / "a.gguf") - ref).max() < 2e-3
