"""lorafit merge is bit-identical to PEFT's merge_and_unload(): every layer kind on Llama, GPT-2, OPT and BERT.

Real PEFT is the oracle: each case merges with stock PEFT and compares every tensor bit for bit.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors.torch import load_file

from conftest import HEAD_CLASS, load_model, make_adapter, save_base
from helpers import cli, codes
from lorafit import merge

BF16 = torch.bfloat16


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit equality (torch.equal alone calls -0.0 equal to 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def merged_files(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every shard in `out`, by name."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def oracle(base: Path, cls: str, adapter: Path, safe: bool = False, dtype: torch.dtype | None = None) -> Any:
    """PEFT's own merge: from_pretrained, PeftModel.from_pretrained, merge_and_unload."""
    kw = {"dtype": dtype} if dtype is not None else {}
    model = getattr(transformers, cls).from_pretrained(str(base), **kw).eval()
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload(safe_merge=safe)


def assert_bit_exact(out: Path, merged_model: Any, cls: str) -> None:
    """The files hold the oracle's tensors bit for bit, and loading them with `cls` gives the oracle's state dict."""
    want = merged_model.state_dict()
    prefix = merged_model.base_model_prefix
    files = merged_files(out)
    for name, t in files.items():
        key = name if name in want else name.removeprefix(prefix + ".")
        if key not in want:
            continue  # a head the oracle's class does not have (merged onto AutoModel): checked as unchanged elsewhere
        assert same_bits(t, want[key]), f"{name} differs from PEFT's merge"
    got = load_model(out, cls).state_dict()
    assert got.keys() == want.keys()
    bad = [k for k in want if not same_bits(got[k], want[k])]
    assert not bad, f"loaded tensors differ from PEFT's merge: {bad}"


def perturb(pm: Any, out: Path, *names: str) -> None:
    """Give trained-looking values to parameters PEFT initialises as copies (modules_to_save, DoRA magnitude)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if any(x in n for x in names):
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=g).to(p.dtype))
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.dtype))
    pm.save_pretrained(out)


@pytest.fixture(scope="session")
def base_of(tmp_path_factory: pytest.TempPathFactory, bases: dict[str, Path]) -> Callable[..., Path]:
    """base_of(family, dtype=None, **config overrides) -> a saved tiny base, made once per variant."""
    made: dict[str, Path] = {}

    def get(family: str, dtype: torch.dtype | None = None, **overrides: Any) -> Path:
        tag = f"{family}-{str(dtype).removeprefix('torch.')}-" + "-".join(f"{k}{v}" for k, v in overrides.items())
        if tag not in made:
            if dtype is None and not overrides:
                made[tag] = bases[family]
            else:
                root = tmp_path_factory.mktemp(tag)
                path = save_base(root, family, **overrides)
                if dtype is not None:
                    load_model(path, HEAD_CLASS[family]).to(dtype).save_pretrained(path)
                made[tag] = path
        return made[tag]

    return get


# (id, family, base dtype, config overrides, LoRA kwargs, parameters to perturb)
CASES: list[tuple[str, str, torch.dtype | None, dict[str, Any], dict[str, Any], tuple[str, ...]]] = [
    ("llama-fp32", "llama", None, {}, {}, ()),
    ("llama-bf16", "llama", BF16, {}, {}, ()),
    ("llama-dora", "llama", BF16, {}, {"use_dora": True}, ("lora_magnitude_vector",)),
    ("llama-rslora-patterns", "llama", BF16, {},
     {"use_rslora": True, "rank_pattern": {"v_proj": 8}, "alpha_pattern": {"down_proj": 32}}, ()),
    ("llama-embedding-mts", "llama", BF16, {},
     {"target_modules": ["embed_tokens", "q_proj"], "modules_to_save": ["lm_head"]}, ("modules_to_save",)),
    ("llama-lora-bias", "llama", BF16, {"attention_bias": True}, {"lora_bias": True, "target_modules": ["q_proj"]},
     ()),
    ("llama-tied-both-sides", "llama", BF16, {"tie_word_embeddings": True},
     {"target_modules": ["embed_tokens", "lm_head", "q_proj"]}, ()),
    ("llama-tied-mts", "llama", BF16, {"tie_word_embeddings": True},
     {"target_modules": ["embed_tokens", "v_proj"], "modules_to_save": ["lm_head"]}, ("modules_to_save",)),
    ("gpt2-fp32", "gpt2", None, {}, {}, ()),
    ("gpt2-bf16-dora", "gpt2", BF16, {}, {"use_dora": True}, ("lora_magnitude_vector",)),
    ("gpt2-tied-embedding-dora", "gpt2", BF16, {}, {"target_modules": ["wte", "c_attn"], "use_dora": True},
     ("lora_magnitude_vector",)),
    ("gpt2-tied-mts", "gpt2", None, {}, {"target_modules": ["c_fc"], "modules_to_save": ["lm_head"]},
     ("modules_to_save",)),
    ("gpt2-lora-bias", "gpt2", BF16, {}, {"lora_bias": True}, ()),
    ("gpt2-bias-all", "gpt2", None, {}, {"bias": "all"}, ("bias",)),
    ("opt-tied-embedding", "opt", BF16, {}, {"target_modules": ["embed_tokens", "q_proj", "fc2"]}, ()),
    ("opt-tied-mts", "opt", None, {}, {"modules_to_save": ["lm_head"]}, ("modules_to_save",)),
    ("bart-shared-embedding", "bart", BF16, {}, {"target_modules": ["embed_tokens", "q_proj"]}, ()),
    ("bert-fp32", "bert", None, {}, {}, ()),
    ("bert-bf16-dora-mts", "bert", BF16, {}, {"use_dora": True, "modules_to_save": ["classifier"]},
     ("lora_magnitude_vector", "modules_to_save")),
    ("bert-fp16-lora-bias", "bert", torch.float16, {}, {"lora_bias": True}, ()),
]


@pytest.mark.parametrize("safe", [False, True], ids=["unsafe", "safe"])
@pytest.mark.parametrize(("family", "dtype", "overrides", "lora", "touch"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_merge_is_bit_identical_to_peft(tmp_path: Path, base_of: Callable[..., Path], family: str,
                                        dtype: torch.dtype | None, overrides: dict[str, Any], lora: dict[str, Any],
                                        touch: tuple[str, ...], safe: bool) -> None:
    base = base_of(family, dtype, **overrides)
    cls = HEAD_CLASS[family]
    pm = make_adapter(base, cls, tmp_path / "adapter", **lora)
    if touch:
        perturb(pm, tmp_path / "adapter", *touch)
    report = merge(tmp_path / "adapter", base, tmp_path / "out", safe_merge=safe)
    assert report.ok, report.dumps()
    assert report.result["written"] and report.result["tensors_changed"] > 0
    peft_merged = oracle(base, cls, tmp_path / "adapter", safe=safe)
    assert_bit_exact(tmp_path / "out", peft_merged, cls)
    # PEFT unties only when a modules_to_save copy replaces one side; a LoRA on either side changes both.
    untied = not peft_merged.config.tie_word_embeddings and load_model(base, cls).config.tie_word_embeddings
    assert ("weights-untied" in report.codes()) == untied
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] == peft_merged.config.tie_word_embeddings


def test_merge_of_adapter_saved_in_bf16(tmp_path: Path, bases: dict[str, Path]) -> None:
    """PEFT upcasts a bf16-saved adapter to fp32 before merging; lorafit must do the same."""
    pm = make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a")
    pm.to(BF16).save_pretrained(tmp_path / "a")
    assert merge(tmp_path / "a", bases["llama"], tmp_path / "out").ok
    assert_bit_exact(tmp_path / "out", oracle(bases["llama"], "AutoModelForCausalLM", tmp_path / "a"),
                     "AutoModelForCausalLM")


def test_merge_of_bin_adapter(tmp_path: Path, bases: dict[str, Path]) -> None:
    pm = make_adapter(bases["gpt2"], "AutoModelForCausalLM", tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    pm.save_pretrained(tmp_path / "a", safe_serialization=False)
    assert (tmp_path / "a" / "adapter_model.bin").exists()
    assert merge(tmp_path / "a", bases["gpt2"], tmp_path / "out").ok
    assert_bit_exact(tmp_path / "out", oracle(bases["gpt2"], "AutoModelForCausalLM", tmp_path / "a"),
                     "AutoModelForCausalLM")


def test_saved_embedding_base_layer_is_loaded_then_merged(tmp_path: Path, bases: dict[str, Path]) -> None:
    """save_embedding_layers=True stores the (trained) base embedding: PEFT loads it, then merges the LoRA on it."""
    pm = make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a", target_modules=["embed_tokens", "q_proj"])
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.base_layer.weight.add_(0.5)
    pm.save_pretrained(tmp_path / "a", save_embedding_layers=True)
    report = merge(tmp_path / "a", bases["llama"], tmp_path / "out")
    assert report.ok, report.dumps()
    row = next(r for r in report.modules if r["path"] == "model.embed_tokens.weight")
    assert row["replaced_by"] and row["modules"] == ["model.embed_tokens"]
    assert_bit_exact(tmp_path / "out", oracle(bases["llama"], "AutoModelForCausalLM", tmp_path / "a"),
                     "AutoModelForCausalLM")


def test_adapter_saved_for_automodel_lands_on_causal_lm_checkpoint(tmp_path: Path, bases: dict[str, Path]) -> None:
    """Trained on LlamaModel (paths `layers.…`), merged into a LlamaForCausalLM checkpoint (`model.layers.…`)."""
    make_adapter(bases["llama"], "AutoModel", tmp_path / "a")
    report = merge(tmp_path / "a", bases["llama"], tmp_path / "out")
    assert report.ok, report.dumps()
    assert report.result["rewrite"] != "as saved" and report.result["modules_merged"] == 6
    files = merged_files(tmp_path / "out")
    assert "model.layers.0.self_attn.q_proj.weight" in files and "lm_head.weight" in files
    assert_bit_exact(tmp_path / "out", oracle(bases["llama"], "AutoModel", tmp_path / "a"), "AutoModel")


def test_class_automodel_merges_a_causal_lm_adapter(tmp_path: Path, bases: dict[str, Path]) -> None:
    """--class AutoModel: the tree lacks `model.`; tensor names keep the checkpoint's prefix."""
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a")
    report = merge(tmp_path / "a", bases["llama"], tmp_path / "out", class_name="AutoModel")
    assert report.ok and report.result["modules_merged"] == 6, report.dumps()
    assert_bit_exact(tmp_path / "out", oracle(bases["llama"], "AutoModelForCausalLM", tmp_path / "a"),
                     "AutoModelForCausalLM")


def test_dtype_casts_like_from_pretrained(tmp_path: Path, bases: dict[str, Path]) -> None:
    make_adapter(bases["gpt2"], "AutoModelForCausalLM", tmp_path / "a")
    report = merge(tmp_path / "a", bases["gpt2"], tmp_path / "out", dtype="bf16")
    assert report.ok and report.result["dtype"] == "bfloat16"
    assert {t.dtype for t in merged_files(tmp_path / "out").values()} == {BF16}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert_bit_exact(tmp_path / "out", oracle(bases["gpt2"], "AutoModelForCausalLM", tmp_path / "a", dtype=BF16),
                     "AutoModelForCausalLM")


def test_sharded_base_and_output(tmp_path: Path, bases: dict[str, Path]) -> None:
    """A sharded base is streamed shard by shard; a small --max-shard-size writes shards and an index."""
    sharded = tmp_path / "sharded" / "llama-base"
    load_model(bases["llama"], "AutoModelForCausalLM").save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    (sharded / "tokenizer_config.json").write_text("{}\n")
    (sharded / "original").mkdir()
    (sharded / "original" / "consolidated.pth").write_bytes(b"not copied")
    make_adapter(sharded, "AutoModelForCausalLM", tmp_path / "a", use_dora=True)
    report = merge(tmp_path / "a", sharded, tmp_path / "out", max_shard_size="10KB", workers=3)
    assert report.ok and report.result["shards"] > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in (tmp_path / "out").glob("*.safetensors")}
    assert {"config.json", "generation_config.json", "tokenizer_config.json"} <= set(report.result["files_copied"])
    assert not (tmp_path / "out" / "original").exists()
    assert_bit_exact(tmp_path / "out", oracle(sharded, "AutoModelForCausalLM", tmp_path / "a"),
                     "AutoModelForCausalLM")


def test_refuses_on_error_finding_and_force_merges(tmp_path: Path, base_of: Callable[..., Path],
                                                    bases: dict[str, Path]) -> None:
    """An adapter for another model (shapes disagree): nothing written, exit 1; --force writes, findings kept."""
    other = base_of("llama", None, hidden_size=32)
    make_adapter(other, "AutoModelForCausalLM", tmp_path / "a")
    args = ["merge", tmp_path / "a", "--base", bases["llama"], "-o", tmp_path / "out", "--json"]
    result = cli(*args)
    assert result.code == 1, result.output
    data = json.loads(result.out)
    assert data["command"] == "merge" and not data["ok"] and not data["result"]["written"]
    assert "shape-mismatch" in codes(data)
    assert not (tmp_path / "out").exists()
    forced = cli(*args, "--force")
    assert forced.code == 1 and (tmp_path / "out" / "model.safetensors").exists()
    assert json.loads(forced.out)["result"]["written"]


def test_cli_merge_json_summary(tmp_path: Path, bases: dict[str, Path]) -> None:
    make_adapter(bases["bert"], "AutoModelForSequenceClassification", tmp_path / "a")
    result = cli("merge", tmp_path / "a", "--base", bases["bert"], "-o", tmp_path / "out", "--safe-merge", "--json")
    assert result.code == 0, result.output
    data = json.loads(result.out)
    assert data["schema"] == "lorafit.report/1" and data["ok"]
    assert data["result"]["safe_merge"] and data["result"]["tensors_changed"] == 4
    assert [f["code"] for f in data["findings"]] == ["merged"]
    existing = cli("merge", tmp_path / "a", "--base", bases["bert"], "-o", tmp_path / "out")
    assert existing.code == 2 and "--overwrite" in existing.err
    # --force means "despite error findings" only; replacing OUT is --overwrite
    assert cli("merge", tmp_path / "a", "--base", bases["bert"], "-o", tmp_path / "out", "--force").code == 2
    replaced = cli("merge", tmp_path / "a", "--base", bases["bert"], "-o", tmp_path / "out", "--overwrite")
    assert replaced.code == 0, replaced.output
