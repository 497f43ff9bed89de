"""Every family people fine-tune, every usual head class, every (trained on, loaded as) pair, against stock PEFT.

For each family a scaled-down config is saved as a base; for each head class a real PEFT adapter is trained on it
(random non-zero B, the task_type PEFT pairs with that class). Then for every class pair, stock PEFT really loads
the adapter (PeftModel.from_pretrained on <class>.from_pretrained) and lorafit checks it from config and headers.

The oracle: lorafit says ok exactly when stock PEFT holds every saved tensor (LoRA factors, trained heads) bit for
bit and raises nothing;
where lorafit says `fix` mends it, the fixed adapter loads completely with stock PEFT.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers.models.auto import modeling_auto

import lorafit
from helpers import adapter_tensors

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0)
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": SMALL, "mistral": SMALL, "qwen2": SMALL, "qwen3": dict(SMALL, head_dim=8),
    "gemma2": dict(SMALL, head_dim=8), "phi3": SMALL, "olmo2": SMALL,
    "mixtral": dict(SMALL, num_local_experts=3, num_experts_per_tok=2),
    "qwen3_moe": dict(SMALL, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2, head_dim=8),
    "gpt2": dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, pad_token_id=0),
    "gpt_neox": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, pad_token_id=0),
    "falcon": dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0),
    "opt": dict(vocab_size=96, hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32, pad_token_id=1),
    "bert": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4),
    "roberta": dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    pad_token_id=1),
    "t5": dict(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, decoder_start_token_id=0),
    "bart": dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, pad_token_id=1),
}
# The head classes an adapter is usually trained as, and the task_type PEFT pairs with each.
HEADS = [("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
         ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
         ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"), (None, "MODEL_MAPPING_NAMES")]
ATTENTION = ["q_proj", "v_proj", "query", "value", "c_attn", "q", "v", "query_key_value", "qkv_proj", "o_proj"]
# MoE families also train their experts: PEFT 0.21 turns these names into target_parameters on fused experts.
EXPERTS = {"qwen3_moe": ["gate_proj", "up_proj", "down_proj"], "mixtral": ["w1", "w2", "w3"]}


def heads(model_type: str) -> list[tuple[str | None, str]]:
    """(task_type, class name) of each usual head class transformers has for the model type."""
    out = []
    for task, table in HEADS:
        name = getattr(modeling_auto, table).get(model_type)
        if isinstance(name, str) and hasattr(transformers, name) and (task, name) not in out:
            out.append((task, name))
    return out


def _targets(model: torch.nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    return [t for t in ATTENTION if t in names][:2]


def _load(cls: str, base: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(transformers, cls).from_pretrained(str(base))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    model_type = request.param
    root = tmp_path_factory.mktemp(model_type)
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **FAMILIES[model_type])
    classes = heads(model_type)
    getattr(transformers, classes[-1][1])(config).save_pretrained(root / "base")
    adapters: dict[str, Path] = {}
    for task, cls in classes:
        torch.manual_seed(1)
        model = _load(cls, root / "base")
        targets = _targets(model) + EXPERTS.get(model_type, [])
        pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        pm.save_pretrained(root / cls)
        adapters[cls] = root / cls
    return {"model_type": model_type, "base": root / "base", "classes": [c for _, c in classes],
            "adapters": adapters}


def stock_lands_everything(adapter: Path, base: Path, cls: str) -> bool:
    """Stock PEFT loads the adapter onto `cls` without raising and holds every saved tensor (LoRA factors and
    modules_to_save heads), bit for bit."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pm = PeftModel.from_pretrained(_load(cls, base), str(adapter))
    except Exception:
        return False
    held = get_peft_model_state_dict(pm)
    saved = adapter_tensors(adapter)
    return all(k in held and torch.equal(held[k], v.to(held[k].dtype)) for k, v in saved.items())


def test_every_class_pair_agrees_with_stock_peft(family: dict[str, Any], tmp_path: Path) -> None:
    disagree, refused = [], 0
    for trained in family["classes"]:
        adapter = family["adapters"][trained]
        for loaded in family["classes"]:
            stock = stock_lands_everything(adapter, family["base"], loaded)
            report = lorafit.check(adapter, family["base"], loaded)
            if report.ok != stock:
                codes = sorted({f.code for f in report.findings if f.severity == "error"})
                disagree.append(f"{trained} -> {loaded}: lorafit ok={report.ok} {codes}, stock lands all={stock}")
                continue
            if report.ok:
                continue
            refused += 1
            out = tmp_path / f"{trained}-{loaded}"
            fixed = lorafit.fix(adapter, family["base"], out, class_name=loaded)
            if fixed.ok and not stock_lands_everything(out, family["base"], loaded):
                disagree.append(f"{trained} -> {loaded}: fix wrote an adapter stock PEFT does not fully load")
    assert not disagree, "\n".join(disagree)
    assert refused, "every pair landed: the matrix tested no mismatch"  # the head class vs the bare backbone
