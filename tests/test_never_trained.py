"""An adapter trained on a class without part of the model (WhisperForCausalLM: the decoder only), loaded on the
class with it (WhisperForConditionalGeneration): stock PEFT loads every tensor, and the encoder's new LoRA layers
keep lora_B = 0, so nothing is lost. That is a warning (never-trained-modules), not missing-adapter-weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model

from helpers import cli_json, codes

FULL, DECODER = "WhisperForConditionalGeneration", "WhisperForCausalLM"


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(
        vocab_size=100, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=32, pad_token_id=1, bos_token_id=2, eos_token_id=3, decoder_start_token_id=2)
    transformers.WhisperForConditionalGeneration(cfg).save_pretrained(root / "base")
    for name, init in (("adapter", True), ("adapter-random-init", False)):
        pm = get_peft_model(transformers.WhisperForCausalLM.from_pretrained(root / "base"),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.normal_()
        pm.save_pretrained(root / name)
    return root


def test_decoder_adapter_on_the_full_class_is_a_warning(whisper: Path) -> None:
    code, report = cli_json("check", whisper / "adapter", "--base", whisper / "base", "--class", FULL)
    assert code == 0 and codes(report) == {"never-trained-modules"}, report["findings"]
    (f,) = report["findings"]
    assert f["severity"] == "warning" and f["count"] == 4 and "model.encoder" in f["message"]
    code, report = cli_json("verify", whisper / "adapter", "--base", whisper / "base", "--class", FULL)
    assert code == 0 and codes(report, "error") == set(), report["findings"]
    assert "never-trained-modules" in codes(report)
    # The oracle: stock PEFT leaves the encoder's LoRA inert (lora_B = 0) and loads every decoder tensor.
    pm = PeftModel.from_pretrained(transformers.WhisperForConditionalGeneration.from_pretrained(whisper / "base"),
                                   str(whisper / "adapter"))
    enc_b = [p for n, p in pm.named_parameters() if ".encoder." in n and "lora_B" in n]
    assert len(enc_b) == 4 and all(not p.any() for p in enc_b)


def test_with_random_init_the_untrained_part_changes_outputs_and_stays_an_error(whisper: Path) -> None:
    code, report = cli_json("check", whisper / "adapter-random-init", "--base", whisper / "base", "--class", FULL)
    assert code == 1 and "missing-adapter-weights" in codes(report, "error")
    assert "never-trained-modules" not in codes(report)


def test_the_same_class_lands_with_no_finding(whisper: Path) -> None:
    code, report = cli_json("check", whisper / "adapter", "--base", whisper / "base", "--class", DECODER)
    assert code == 0 and codes(report) == set(), report["findings"]


def test_a_lost_part_of_a_trained_block_stays_an_error() -> None:
    """The heuristic itself: only a named part above every numbered block counts as never trained."""
    from lorafit.diagnose import never_trained

    landed = ["model.decoder.layers.0.self_attn.q_proj", "model.decoder.layers.1.self_attn.q_proj"]
    missing = ["model.encoder.layers.0.self_attn.q_proj",  # a part the adapter never had
               "model.decoder.layers.0.fc1",  # beside landed modules
               "model.decoder.layers.0.mlp.down_proj",  # a part of a trained block
               "model.decoder.layers.5.self_attn.q_proj"]  # a block without tensors
    lost, branches = never_trained(missing, landed)
    assert branches == {"model.encoder": ["model.encoder.layers.0.self_attn.q_proj"]}
    assert lost == missing[1:]
    assert never_trained(missing, []) == (missing, {})  # nothing landed: everything is lost
