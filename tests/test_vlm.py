"""Refactored VLM layouts on a tiny Llava: the old 4.x keys PEFT converts by itself, and real mismatches.

transformers 5 moved `language_model.model.layers` to `model.language_model.layers` and the vision tower
from `vision_tower.vision_model.encoder` to `model.vision_tower.encoder`. An adapter saved before the move
is renamed on load by PEFT (through transformers' conversion mapping), so check must not flag it; an
adapter saved from the head class and loaded on the bare LlavaModel is a real mismatch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

import lorafit
from helpers import cli, cli_json, codes, python

OLD_LAYOUT = [("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.vision_model.")]


def _tiny_llava() -> transformers.LlavaForConditionalGeneration:
    torch.manual_seed(0)
    text = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1)
    vision = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=8, patch_size=4, projection_dim=16)
    cfg = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=63)
    return transformers.LlavaForConditionalGeneration(cfg).eval()


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, PeftModel]:
    root = tmp_path_factory.mktemp("llava")
    base = root / "base"
    _tiny_llava().save_pretrained(base)
    model = transformers.LlavaForConditionalGeneration.from_pretrained(base).eval()
    torch.manual_seed(1)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    new = root / "new-layout"
    pm.save_pretrained(new)
    # The same adapter as transformers 4.x would have saved it.
    old = root / "old-layout"
    old.mkdir()
    (old / "adapter_config.json").write_text((new / "adapter_config.json").read_text())
    renamed = {}
    for key, tensor in load_file(str(new / "adapter_model.safetensors")).items():
        body = key.removeprefix("base_model.model.")
        for now, before in OLD_LAYOUT:
            if body.startswith(now):
                body = before + body[len(now):]
                break
        renamed["base_model.model." + body] = tensor
    save_file(renamed, str(old / "adapter_model.safetensors"), metadata={"format": "pt"})
    return base, old, new, pm


def _same_adapter(model: PeftModel, reference: PeftModel, strip: str = "") -> bool:
    """PEFT's own view of the loaded adapter equals the trained one, tensor for tensor, bit for bit.

    (Not "lora_B is non-zero": these adapters were made with init_lora_weights=False, so a module PEFT
    never loaded holds random values too.)
    """
    got = get_peft_model_state_dict(model)
    want = {k.replace("base_model.model." + strip, "base_model.model."): v
            for k, v in get_peft_model_state_dict(reference).items()}
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("cls", ["LlavaForConditionalGeneration", "LlavaModel"])
def test_old_layout_that_peft_converts_is_not_flagged(llava: tuple[Path, Path, Path, PeftModel], cls: str) -> None:
    """PEFT passes keys through transformers' conversion mapping on load: check must model that, not cry wolf."""
    base, old, _new, pm = llava
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = PeftModel.from_pretrained(getattr(transformers, cls).from_pretrained(base), old)
    assert _same_adapter(stock, pm, strip="" if cls == "LlavaForConditionalGeneration" else "model.")
    assert lorafit.verify(stock, old).ok
    code, report = cli_json("check", old, "--base", base, "--class", cls)
    assert code == 0, report["findings"]
    assert report["alignment"]["rewrite"]["type"] == "load-time-conversion"
    assert report["alignment"]["lands_as_is"] == report["alignment"]["total"] == 6


def test_head_class_adapter_on_bare_vlm(llava: tuple[Path, Path, Path, PeftModel], tmp_path: Path) -> None:
    base, _old, new, pm = llava
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = PeftModel.from_pretrained(transformers.LlavaModel.from_pretrained(base), new)
    assert not _same_adapter(stock, pm, strip="model.")
    assert not lorafit.verify(stock, new).ok
    code, report = cli_json("check", new, "--base", base, "--class", "LlavaModel")
    assert code == 1 and "layout-mismatch" in codes(report, "error")
    out = tmp_path / "fixed"
    code, _, err = cli("fix", new, "--base", base, "--class", "LlavaModel", "-o", out)
    assert code == 0, err
    fixed = PeftModel.from_pretrained(transformers.LlavaModel.from_pretrained(base), out)
    assert _same_adapter(fixed, pm, strip="model.")


def test_two_subtrees_moved_under_different_prefixes() -> None:
    """One refactor, two prefix rules: neither alone lands the adapter."""
    from lorafit.adapter import Entry
    from lorafit.align import align
    from lorafit.tree import ModuleInfo, ModuleTree

    text, vision = ModuleInfo("Linear", 8, 8, {"weight": (8, 8)}), ModuleInfo("Linear", 4, 4, {"weight": (4, 4)})
    modules = {f"model.text.layers.{i}.q_proj": text for i in range(3)}
    modules |= {f"model.vision.layers.{i}.q_proj": vision for i in range(2)}
    tree = ModuleTree("Vlm", modules)
    entries = [Entry(f"text_model.layers.{i}.q_proj", "linear", 8, 8) for i in range(3)]
    entries += [Entry(f"vision_model.enc.layers.{i}.q_proj", "linear", 4, 4) for i in range(2)]
    al = align(entries, tree)
    assert al.as_is.score == 0
    assert al.chosen.score == 5 and not al.ambiguous
    assert set(al.chosen.rewrite.rules) == {("text_model.", "model.text."), ("vision_model.enc.", "model.vision.")}
    assert al.chosen.pairs["vision_model.enc.layers.1.q_proj"] == "model.vision.layers.1.q_proj"


def test_a_warm_check_of_a_converting_model_type_imports_nothing_heavy(llava: tuple[Path, Path, Path, PeftModel],
                                                                       tmp_path: Path) -> None:
    """Llava converts keys on load: PEFT's answer (which needs transformers, PEFT and a meta model) is cached
    with the tree, so the second check of the old-layout adapter imports none of them and says the same."""
    base, old, _new, _pm = llava
    env = {"LORAFIT_CACHE": str(tmp_path / "cache"), "LORAFIT_NO_BLUEPRINTS": "1"}
    script = ("import sys; from lorafit.api.check import check; r = check(sys.argv[1], sys.argv[2], "
              "'LlavaForConditionalGeneration'); print(r.ok, r.alignment['rewrite']['type'], "
              "r.alignment['lands_as_is'], r.target['tree_from'], "
              "sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    cold = python(script, old, base, env=env, check=True).out.strip()
    warm = python(script, old, base, env=env, check=True).out.strip()
    assert cold == "True load-time-conversion 6 meta ['peft', 'torch', 'transformers']"
    assert warm == "True load-time-conversion 6 cache []"


def test_a_first_check_of_a_new_layout_adapter_imports_nothing_heavy(llava: tuple[Path, Path, Path, PeftModel]
                                                                      ) -> None:
    """Llava has a blueprint; none of a new-layout adapter's paths matches what transformers' conversion touches,
    so the first check asks neither PEFT nor transformers, and says what stock PEFT does (it lands)."""
    base, _old, new, _pm = llava
    script = ("import sys; from lorafit.api.check import check; r = check(sys.argv[1], sys.argv[2], "
              "'LlavaForConditionalGeneration'); print(r.ok, r.target['tree_from'], "
              "sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules))")
    out = python(script, new, base, env={"LORAFIT_NO_CACHE": "1"}, check=True).out.strip()
    assert out == "True blueprint []"
