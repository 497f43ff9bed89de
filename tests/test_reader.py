"""The adapter reader and `inspect`: what PEFT saved, read back exactly as PEFT itself sees it.

Oracle: the live PeftModel that saved the adapter (its layers' r, lora_alpha, scaling, tensors), and
PeftModel.from_pretrained on the saved directory.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file

import lorafit
from conftest import load_model, make_adapter
from helpers import cli, cli_json, codes
from lorafit.errors import AdapterNotFoundError
from lorafit.formats import read_adapter

PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- helpers

def lora_layers(pm: PeftModel) -> dict[str, LoraLayer]:
    """PEFT's LoRA layers by module path in the saved layout (without base_model.model.)."""
    return {name.removeprefix(PEFT_PREFIX): mod for name, mod in pm.named_modules()
            if isinstance(mod, LoraLayer) and "default" in mod.r}


def edit_config(path: Path, **changes: Any) -> None:
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


def edit_tensors(path: Path, fn: Any) -> None:
    """Rewrite adapter_model.safetensors through fn(state_dict) -> state_dict, keeping PEFT's metadata."""
    weights = path / "adapter_model.safetensors"
    sd = load_file(str(weights))
    save_file(fn(sd), str(weights), metadata={"format": "pt"})


def assert_matches_peft(adapter: lorafit.adapter.Adapter, pm: PeftModel) -> None:
    """Every module's r, alpha and scaling are the ones PEFT gave the layer."""
    layers = lora_layers(pm)
    assert set(adapter.modules) == set(layers)
    for path, layer in layers.items():
        m = adapter.modules[path]
        assert (m.rank, m.config_rank) == (layer.r["default"], layer.r["default"]), path
        assert m.alpha == layer.lora_alpha["default"], path
        assert m.scaling == layer.scaling["default"], path


# ----------------------------------------------------------------------------- formats and locations

def test_reads_safetensors_bit_for_bit(bases: dict[str, Path], tmp_path: Path) -> None:
    pm = make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    assert adapter.weights_path.name == "adapter_model.safetensors"
    assert adapter.config["peft_type"] == "LORA"
    assert_matches_peft(adapter, pm)
    expected = get_peft_model_state_dict(pm)
    got = adapter.state_dict()
    assert set(got) == set(expected)
    for key, t in expected.items():
        assert torch.equal(got[key], t), key
    for path, layer in lora_layers(pm).items():
        m = adapter.modules[path]
        assert (m.in_features, m.out_features) == (layer.in_features, layer.out_features)
        assert m.kind == "linear" and not m.has_dora and not m.has_bias
    assert adapter.extras == [] and adapter.incomplete == {} and adapter.unrooted_keys == []


def test_reads_bin_with_weights_only(bases: dict[str, Path], tmp_path: Path) -> None:
    pm = make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "st")
    pm.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    adapter = read_adapter(tmp_path / "bin")
    assert adapter.weights_path.name == "adapter_model.bin"
    assert_matches_peft(adapter, pm)
    reference = read_adapter(tmp_path / "st")
    assert {k: (i.shape, i.dtype) for k, i in adapter.infos.items()} == \
           {k: (i.shape, i.dtype) for k, i in reference.infos.items()}
    for key in reference.infos:
        assert torch.equal(adapter.tensor(key), reference.tensor(key)), key
    assert lorafit.inspect(adapter).findings == []


def test_named_adapter_in_subdirectory(bases: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(bases["llama"], "AutoModelForCausalLM")
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False),
                        adapter_name="other")
    pm.save_pretrained(tmp_path / "out")
    sub = tmp_path / "out" / "other"
    assert (sub / "adapter_config.json").exists()  # PEFT's layout for adapter_name != "default"
    for spec, kw in [(tmp_path / "out", {}), (tmp_path / "out", {"subfolder": "other"}), (sub, {}),
                     (sub / "adapter_model.safetensors", {})]:
        adapter = read_adapter(spec, **kw)
        assert adapter.path == sub
        assert set(adapter.modules) == {f"model.layers.{i}.self_attn.q_proj" for i in (0, 1)}
    code, out, _ = cli("inspect", tmp_path / "out", "--json")
    assert code == 0 and json.loads(out)["adapter"]["path"] == str(sub)


def test_parent_with_several_adapters_is_an_error(bases: dict[str, Path], tmp_path: Path) -> None:
    model = load_model(bases["llama"], "AutoModelForCausalLM")
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="first")
    pm.add_adapter("second", LoraConfig(r=2, target_modules=["v_proj"]))
    pm.save_pretrained(tmp_path / "out")
    with pytest.raises(AdapterNotFoundError, match="several adapters.*first, second"):
        read_adapter(tmp_path / "out")
    assert read_adapter(tmp_path / "out", subfolder="second").modules["model.layers.0.self_attn.v_proj"].rank == 2
    code, out, err = cli("inspect", tmp_path / "out")
    assert code == 2 and out == ""
    assert "first, second" in err and str(tmp_path / "out") in err and len(err.strip().splitlines()) == 1


def _fake_hub_cache(cache: Path, repo_id: str, adapter_dir: Path) -> Path:
    """Lay out `adapter_dir` the way huggingface_hub caches a snapshot: blobs, snapshots/<hash>, refs/main."""
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in adapter_dir.iterdir():
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_hub_id_resolves_through_the_local_cache_named_by_env(bases: dict[str, Path], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch, env: str) -> None:
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a")
    cache = tmp_path / "hf" / ("hub" if env == "HF_HOME" else "cache")
    snap = _fake_hub_cache(cache, "org/tiny-lora", tmp_path / "a")
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    # Set after huggingface_hub was imported: the reader must still honour it.
    monkeypatch.setenv(env, str(cache if env == "HF_HUB_CACHE" else tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)  # no local directory called org/tiny-lora
    adapter = read_adapter("org/tiny-lora")
    assert adapter.path == snap
    assert set(adapter.modules) == set(read_adapter(tmp_path / "a").modules)
    code, out, _ = cli("inspect", "org/tiny-lora", "--json")
    assert code == 0 and json.loads(out)["adapter"]["path"] == str(snap)
    with pytest.raises(AdapterNotFoundError, match="no cached hub snapshot"):
        read_adapter("org/not-cached")


def test_hub_id_of_the_base_model_resolves_through_the_same_cache(bases: dict[str, Path], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # `check --base ORG/NAME` must find the base where `inspect ORG/NAME` finds an adapter.
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a")
    snap = _fake_hub_cache(tmp_path / "hub", "org/tiny-llama", bases["llama"])
    for name in ("HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LORAFIT_CACHE", str(tmp_path / "lorafit-cache"))
    monkeypatch.chdir(tmp_path)
    report = lorafit.check(tmp_path / "a", "org/tiny-llama", "AutoModelForCausalLM")
    assert report.ok, [f.code for f in report.findings]
    assert report.target is not None and report.target["class"] == "LlamaForCausalLM"
    assert snap.exists()


# ----------------------------------------------------------------------------- rank, alpha, scaling

def test_rank_and_alpha_patterns_resolve_as_peft_does(bases: dict[str, Path], tmp_path: Path) -> None:
    pm = make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a", r=4, lora_alpha=8,
                      rank_pattern={"model.layers.0.self_attn.q_proj": 6, "q_proj": 2, r"layers\.1\.mlp\..*": 3},
                      alpha_pattern={"down_proj": 3, r"model\.layers\.1\.self_attn\.v_proj": 5.5})
    adapter = read_adapter(tmp_path / "a")
    assert_matches_peft(adapter, pm)
    # Every pattern mattered somewhere: the test would not notice a reader that ignores them otherwise.
    assert {m.rank for m in adapter.modules.values()} == {2, 3, 4, 6}
    assert {m.alpha for m in adapter.modules.values()} == {3.0, 5.5, 8.0}
    # And as PEFT reads the saved config back (order of pattern keys as saved).
    reloaded = PeftModel.from_pretrained(load_model(bases["llama"], "AutoModelForCausalLM"), str(tmp_path / "a"))
    assert_matches_peft(adapter, reloaded)
    rows = {r["path"]: r for r in lorafit.inspect(adapter).modules}
    for path, layer in lora_layers(pm).items():
        assert rows[path]["r"] == layer.r["default"] and rows[path]["alpha"] == layer.lora_alpha["default"]


@pytest.mark.parametrize("r", [3, 4])
def test_rslora_scaling(bases: dict[str, Path], tmp_path: Path, r: int) -> None:
    pm = make_adapter(bases["gpt2"], "AutoModelForCausalLM", tmp_path / "a", r=r, lora_alpha=8, use_rslora=True)
    adapter = read_adapter(tmp_path / "a")
    assert_matches_peft(adapter, pm)
    assert all(m.scaling == 8 / r**0.5 for m in adapter.modules.values())


# ----------------------------------------------------------------------------- kinds of modules and tensors

def test_dora_magnitudes_are_detected(bases: dict[str, Path], tmp_path: Path) -> None:
    pm = make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a", use_dora=True)
    adapter = read_adapter(tmp_path / "a")
    layers = lora_layers(pm)
    assert set(adapter.modules) == set(layers)
    for path, layer in layers.items():
        m = adapter.modules[path]
        assert m.has_dora
        assert torch.equal(adapter.tensor(m.keys["magnitude"]), layer.lora_magnitude_vector["default"].weight)
    assert "dora-mismatch" not in codes(lorafit.inspect(adapter))


def test_dora_on_an_embedding_is_read(bases: dict[str, Path], tmp_path: Path) -> None:
    # An Embedding's DoRA magnitude is 1-D and its path contains "embeddings": a valid PEFT adapter.
    pm = make_adapter(bases["bert"], "AutoModelForSequenceClassification", tmp_path / "a",
                      target_modules=["word_embeddings", "query"], use_dora=True)
    adapter = read_adapter(tmp_path / "a")
    emb = adapter.modules["bert.embeddings.word_embeddings"]
    assert emb.kind == "embedding" and emb.has_dora
    layer = lora_layers(pm)["bert.embeddings.word_embeddings"]
    assert torch.equal(adapter.tensor(emb.keys["magnitude"]), layer.lora_magnitude_vector["default"].weight)


def test_modules_to_save_tensors_are_extras(bases: dict[str, Path], tmp_path: Path) -> None:
    pm = make_adapter(bases["bert"], "AutoModelForSequenceClassification", tmp_path / "a", task_type="SEQ_CLS")
    assert "classifier" in pm.peft_config["default"].modules_to_save  # PEFT added the head by itself
    adapter = read_adapter(tmp_path / "a")
    extras = {(x.module, x.param): x for x in adapter.extras}
    assert set(extras) == {("classifier", "weight"), ("classifier", "bias")}
    head = pm.base_model.model.classifier.modules_to_save["default"]
    for (_, param), x in extras.items():
        assert x.kind == "modules_to_save"
        assert torch.equal(adapter.tensor(x.key), getattr(head, param))
    assert all(m.kind == "linear" for m in adapter.modules.values())
    assert {f.code for f in lorafit.inspect(adapter).findings} == set()


def test_embedding_lora(bases: dict[str, Path], tmp_path: Path) -> None:
    pm = make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a", target_modules=["embed_tokens", "q_proj"])
    adapter = read_adapter(tmp_path / "a")
    emb = adapter.modules["model.embed_tokens"]
    base = lora_layers(pm)["model.embed_tokens"].get_base_layer()
    assert emb.kind == "embedding"
    assert (emb.in_features, emb.out_features, emb.rank) == (base.num_embeddings, base.embedding_dim, 4)
    assert {x.kind for x in adapter.extras} == {"embedding_base"}  # PEFT saved the embedding layer itself
    assert adapter.modules["model.layers.0.self_attn.q_proj"].kind == "linear"


def test_gpt2_conv1d_in_out(bases: dict[str, Path], tmp_path: Path) -> None:
    pm = make_adapter(bases["gpt2"], "AutoModelForCausalLM", tmp_path / "a")
    adapter = read_adapter(tmp_path / "a")
    layers = lora_layers(pm)
    assert set(adapter.modules) == set(layers)
    for path, layer in layers.items():
        w = layer.get_base_layer().weight  # Conv1D stores [in, out]
        m = adapter.modules[path]
        assert m.kind == "linear"
        assert (m.in_features, m.out_features) == (w.shape[0], w.shape[1]) == (layer.in_features, layer.out_features)
    assert adapter.modules["transformer.h.0.attn.c_attn"].out_features == 48


def test_lora_bias_is_read(bases: dict[str, Path], tmp_path: Path) -> None:
    pm = make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a", lora_bias=True)
    adapter = read_adapter(tmp_path / "a")
    for path, layer in lora_layers(pm).items():
        assert torch.equal(adapter.tensor(adapter.modules[path].keys["bias"]), layer.lora_B["default"].bias)
    assert "bias-mismatch" not in codes(lorafit.inspect(adapter))


# ----------------------------------------------------------------------------- health

def test_untrained_adapter_has_no_effect(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a", init_lora_weights=True)
    report = lorafit.inspect(tmp_path / "a")
    f = next(f for f in report.findings if f.code == "adapter-no-effect")
    assert f.severity == "error" and f.count == 6 and not report.ok
    assert "lora-b-zero" not in codes(report)
    code, data = cli_json("inspect", tmp_path / "a")
    assert code == 1 and data["ok"] is False


def test_some_zero_lora_b(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a")
    zeroed = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]

    def zero(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd[f"{PEFT_PREFIX}{zeroed[0]}.lora_B.weight"].zero_()
        sd[f"{PEFT_PREFIX}{zeroed[1]}.lora_B.weight"].fill_(-0.0)  # negative zero is zero too
        return sd

    edit_tensors(tmp_path / "a", zero)
    report = lorafit.inspect(tmp_path / "a")
    f = next(f for f in report.findings if f.code == "lora-b-zero")
    assert sorted(f.keys) == sorted(zeroed) and f.severity == "warning"
    assert "adapter-no-effect" not in codes(report)
    code, data = cli_json("inspect", tmp_path / "a")
    assert code == 0
    health = {r["path"]: r["health"] for r in data["modules"]}
    assert health[zeroed[0]] != "ok" and health["model.layers.0.self_attn.v_proj"] == "ok"


@pytest.mark.parametrize(("dtype", "value", "label"), [
    (torch.float32, float("nan"), "NaN"), (torch.bfloat16, float("inf"), "Inf"), (torch.float16, float("-inf"), "Inf"),
    (torch.bfloat16, None, "Inf/NaN"),
])
def test_non_finite_is_a_finding_not_a_crash(bases: dict[str, Path], tmp_path: Path, dtype: torch.dtype,
                                             value: float | None, label: str) -> None:
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a")
    key = f"{PEFT_PREFIX}model.layers.1.self_attn.v_proj.lora_A.weight"

    def poison(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sd = {k: v.to(dtype) for k, v in sd.items()}
        if value is None:  # both kinds in one tensor
            sd[key][1, 2], sd[key][0, 0] = float("nan"), float("-inf")
        else:
            sd[key][1, 2] = value
        return sd

    edit_tensors(tmp_path / "a", poison)
    report = lorafit.inspect(tmp_path / "a")
    f = next(f for f in report.findings if f.code == "non-finite")
    assert f.keys == [key] and label in f.message and f.severity == "error"
    code, out, err = cli("inspect", tmp_path / "a")
    assert code == 1 and "non-finite" in out and "Traceback" not in out + err
    code, data = cli_json("inspect", tmp_path / "a")
    assert code == 1 and data["ok"] is False
    assert [x["code"] for x in data["findings"]] == ["non-finite"]


def test_non_finite_in_a_bin(bases: dict[str, Path], tmp_path: Path) -> None:
    pm = make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "st")
    pm.save_pretrained(tmp_path / "a", safe_serialization=False)
    sd = torch.load(tmp_path / "a" / "adapter_model.bin", weights_only=True)
    key = f"{PEFT_PREFIX}model.layers.0.mlp.down_proj.lora_B.weight"
    sd[key][0, 0] = float("nan")
    torch.save(sd, tmp_path / "a" / "adapter_model.bin")
    report = lorafit.inspect(tmp_path / "a")
    assert [f.keys for f in report.findings if f.code == "non-finite"] == [[key]]
    assert cli("inspect", tmp_path / "a").code == 1


# ----------------------------------------------------------------------------- config <-> tensors

@pytest.fixture
def llama_adapter(bases: dict[str, Path], tmp_path: Path) -> Path:
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a")
    assert lorafit.inspect(tmp_path / "a").findings == []  # clean to start with
    return tmp_path / "a"


def test_rank_mismatch(bases: dict[str, Path], llama_adapter: Path) -> None:
    edit_config(llama_adapter, r=8)
    report = lorafit.inspect(llama_adapter)
    f = next(f for f in report.findings if f.code == "rank-mismatch")
    assert f.count == 6 and "r=4" in f.keys[0] and "r=8" in f.keys[0]
    # PEFT agrees that this adapter cannot load.
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(load_model(bases["llama"], "AutoModelForCausalLM"), str(llama_adapter))


def test_rank_pattern_mismatch(llama_adapter: Path) -> None:
    edit_config(llama_adapter, rank_pattern={"v_proj": 2})
    f = next(f for f in lorafit.inspect(llama_adapter).findings if f.code == "rank-mismatch")
    assert f.count == 2 and all("v_proj" in k for k in f.keys)


def test_dora_flag_without_magnitudes(llama_adapter: Path) -> None:
    edit_config(llama_adapter, use_dora=True)
    f = next(f for f in lorafit.inspect(llama_adapter).findings if f.code == "dora-mismatch")
    assert f.count == 6 and f.severity == "error"


@pytest.mark.parametrize(("flag", "code"), [("use_dora", "dora-mismatch"), ("lora_bias", "bias-mismatch")])
def test_tensors_without_their_config_flag(bases: dict[str, Path], tmp_path: Path, flag: str, code: str) -> None:
    """DoRA magnitudes or LoRA biases saved, the flag that makes PEFT load them switched off."""
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a", **{flag: True})
    edit_config(tmp_path / "a", **{flag: False})
    f = next(f for f in lorafit.inspect(tmp_path / "a").findings if f.code == code)
    assert f.count == 6


def test_modules_to_save_not_saved(llama_adapter: Path) -> None:
    edit_config(llama_adapter, modules_to_save=["lm_head"])
    f = next(f for f in lorafit.inspect(llama_adapter).findings if f.code == "modules-to-save-not-saved")
    assert f.keys == ["lm_head"] and f.severity == "warning"


def test_unknown_config_field(llama_adapter: Path) -> None:
    edit_config(llama_adapter, frobnicate_lora=True)
    report = lorafit.inspect(llama_adapter)
    assert [f.keys for f in report.findings if f.code == "unknown-config-field"] == [["frobnicate_lora"]]


def test_lora_bias_flag_without_bias(llama_adapter: Path) -> None:
    edit_config(llama_adapter, lora_bias=True)
    f = next(f for f in lorafit.inspect(llama_adapter).findings if f.code == "bias-mismatch")
    assert f.count == 0 and "True" in f.message


def test_module_missing_lora_b_is_incomplete(llama_adapter: Path) -> None:
    gone = f"{PEFT_PREFIX}model.layers.0.self_attn.v_proj.lora_B.weight"
    edit_tensors(llama_adapter, lambda sd: {k: v for k, v in sd.items() if k != gone})
    adapter = read_adapter(llama_adapter)
    assert adapter.incomplete == {"model.layers.0.self_attn.v_proj": ["A"]}
    assert "model.layers.0.self_attn.v_proj" not in adapter.modules and len(adapter.modules) == 5
    f = next(f for f in lorafit.inspect(adapter).findings if f.code == "incomplete-module")
    assert f.keys == ["model.layers.0.self_attn.v_proj (has A)"]


def test_lora_a_and_b_of_different_rank(llama_adapter: Path) -> None:
    key = f"{PEFT_PREFIX}model.layers.1.self_attn.q_proj.lora_B.weight"
    edit_tensors(llama_adapter, lambda sd: sd | {key: sd[key][:, :2].contiguous()})
    f = next(f for f in lorafit.inspect(llama_adapter).findings if f.code == "rank-inconsistent")
    assert f.keys == ["model.layers.1.self_attn.q_proj: lora_A rank 4, lora_B rank 2"]


def test_keys_without_peft_prefix(llama_adapter: Path) -> None:
    edit_tensors(llama_adapter, lambda sd: {k.removeprefix(PEFT_PREFIX): v for k, v in sd.items()})
    adapter = read_adapter(llama_adapter)
    assert len(adapter.modules) == 6 and len(adapter.unrooted_keys) == 12
    f = next(f for f in lorafit.inspect(adapter).findings if f.code == "unprefixed-keys")
    assert f.count == 12


# ----------------------------------------------------------------------------- JSON

def test_inspect_json_schema(bases: dict[str, Path], tmp_path: Path) -> None:
    make_adapter(bases["llama"], "AutoModelForCausalLM", tmp_path / "a")
    edit_config(tmp_path / "a", r=8, frobnicate_lora=1)
    code, data = cli_json("inspect", tmp_path / "a")
    assert code == 1
    assert {"ok", "findings", "adapter", "modules"} <= set(data)
    assert data["ok"] is False
    assert codes(data) == {"rank-mismatch", "unknown-config-field"}
    for f in data["findings"]:
        assert {"code", "severity", "message", "keys", "hint"} <= set(f)
        assert f["severity"] in ("error", "warning", "info") and isinstance(f["keys"], list) and f["message"]
    assert data["adapter"]["path"] == str(tmp_path / "a") and data["adapter"]["modules"] == 6
    assert data["adapter"]["r"] == 8 and data["adapter"]["peft_type"] == "LORA"
    rows = {m["path"]: m for m in data["modules"]}
    assert len(rows) == 6
    q = rows["model.layers.0.self_attn.q_proj"]
    assert (q["kind"], q["r"], q["in"], q["out"]) == ("linear", 4, 16, 16)
    shutil.rmtree(tmp_path / "a")
